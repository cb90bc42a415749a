"""The built dataset: answers re-derived from the exported masks, traces, masks, inputs, spatial splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely

from model.data.splits import footprint_lonlat, overlapping_pairs
from model.data.store import georef_from_json, load_mask, load_records, load_tiles, read_georef
from model.data.trace import SEG, parse_target
from model.data.verify import check_record
from model.prompting import MEASURED_ANSWER, strip_measured_answer
from worker import measure as M
from worker import resolve as R

KINDS = {"res", "l1", "l2", "cap"}
KEYS = {"id", "kind", "task", "images", "question", "answer", "target", "seg_masks", "split"}


def _all(root: Path) -> list[dict]:
    return load_records(root, "train") + load_records(root, "val")


def test_every_answer_recomputes_from_its_masks(built: Path) -> None:
    tiles = {t["id"]: t for t in load_tiles(built)}
    recs = _all(built)
    assert len(recs) > 300
    problems = [p for r in recs for p in check_record(built, r, tiles[r["scene"]])]
    assert problems == []
    checked = Counter(r["check"]["op"] for r in recs)
    for op in ("coverage", "area", "count", "exists", "location", "larger_of", "destroyed"):
        assert checked[op] > 0, f"no record exercised {op}: {checked}"


def test_check_record_catches_a_wrong_answer(built: Path) -> None:
    """Negative control: tampering with a stored answer or a distractor is reported."""
    rec = next(r for r in load_records(built, "train") if r["check"]["op"] == "coverage" and r.get("choices"))
    bad = json.loads(json.dumps(rec))
    bad["check"]["value_text"] = "99.9%"
    assert check_record(built, bad)
    wrong_letter = json.loads(json.dumps(rec))
    wrong_letter["answer"] = next(c[0] for c in rec["choices"] if c[0] != rec["answer"])
    assert check_record(built, wrong_letter)
    close = json.loads(json.dumps(rec))
    value = float(rec["check"]["value_text"].rstrip("%"))
    other = next(i for i, c in enumerate(close["choices"]) if c[0] != rec["answer"])
    close["choices"][other] = f"{close['choices'][other][0]}. {value * 1.05 + 0.1:.1f}%"
    assert any("closer than" in p for p in check_record(built, close))


def test_records_have_the_documented_fields(built: Path) -> None:
    for r in _all(built):
        assert KEYS <= set(r), r["id"]
        assert r["kind"] in KINDS
        assert r["images"] and all((built / im["path"]).is_file() for im in r["images"])
        if r.get("choices"):
            assert [c[:3] for c in r["choices"]] == [f"{L}. " for L in "ABCD"[: len(r["choices"])]]
            assert r["answer"] in "ABCD"[: len(r["choices"])]
            assert len(r["choices"]) in (2, 3, 4)


def test_inputs_cover_optical_sar_pairs_change_and_series(built: Path) -> None:
    roles = Counter(tuple(im["role"] for im in r["images"]) for r in _all(built))
    assert roles[("optical",)] and roles[("sar",)] and roles[("optical", "sar")] and roles[("t0", "t1")]
    assert any(len(k) > 2 and k[0] == "t0" for k in roles), f"no series longer than two: {roles}"
    kinds = Counter((r["kind"], r["task"]) for r in _all(built))
    for task in ("existence", "counting", "localization", "area", "coverage", "adjacency", "distance"):
        assert kinds[("l1", task)] or kinds[("l2", task)], task
    for task in ("comparison", "ranking", "multistep", "semantic"):
        assert kinds[("l2", task)], task
    assert kinds[("res", "res")] and kinds[("cap", "caption")]
    res = next(r for r in _all(built) if r["kind"] == "res")
    assert res["question"].startswith(("Please segment the", "Segment the")) and res["target"] == SEG


def test_traces_parse_and_every_seg_has_a_mask_on_its_image_grid(built: Path) -> None:
    for r in _all(built):
        parsed = parse_target(r["target"])
        assert parsed.n_seg == len(r["seg_masks"]) >= 1, r["id"]
        if r["kind"] != "res":
            assert parsed.answer == r["answer"]
            assert "<think>" not in parsed.answer and SEG not in parsed.answer
        for s in r["seg_masks"]:
            mask = load_mask(built / s["path"])
            img = read_georef(built / r["images"][s["image"]]["path"])
            assert mask.dtype == bool and img is not None
            import rasterio

            with rasterio.open(built / r["images"][s["image"]]["path"]) as ds:
                assert mask.shape == (ds.height, ds.width), r["id"]


@pytest.mark.parametrize("target", [
    "no tags at all", "<think>a [SEG]</think>", "<think>x</think><answer></answer>",
    "<think>x</think><answer>[SEG]</answer>", "<think><think>x</think><answer>A</answer>",
])
def test_parse_target_rejects_malformed(target: str) -> None:
    with pytest.raises(ValueError):
        parse_target(target)


def test_grounding_spans_are_what_the_worker_injects(built: Path) -> None:
    """The span stored with each [SEG] equals worker.measure.grounding_text on that mask and image, followed,
    where the record's masks so far resolve its question, by the worker's measured answer of them."""
    recs = [r for r in _all(built) if r["kind"] in ("l1", "l2")][:120]
    tiles = {t["id"]: t for t in load_tiles(built)}
    noted = 0
    for r in recs:
        steps = []
        valid = tiles[r["scene"]]["valid"]
        valid = None if valid is None else load_mask(built / valid)
        images = [R.MeasuredImage(im["role"], read_georef(built / im["path"]), valid) for im in r["images"]]
        for k, s in enumerate(r["seg_masks"]):
            georef = read_georef(built / r["images"][s["image"]]["path"])
            mask = load_mask(built / s["path"])
            m = M.measure_mask(mask, georef)
            assert strip_measured_answer(s["grounding"]) == M.grounding_text(m)
            steps.append(R.MeasuredStep(k, s["label"], s["image"], mask if valid is None else mask & valid))
            if "measured answer" in s["grounding"]:
                noted += 1
                assert s["grounding"] == R.span_with_answer(M.grounding_text(m), r["question"], r["choices"], steps,
                                                            images)
    assert noted >= 10


def test_the_last_measured_answer_of_a_record_is_its_answer(built: Path) -> None:
    """Training teaches the model to take the letter of the last note: it must always be the true one."""
    recs = [r for r in _all(built) if any(MEASURED_ANSWER.search(s["grounding"] or "") for s in r["seg_masks"])]
    assert len(recs) >= 20 and {r["task"] for r in recs} >= {"coverage", "area", "counting"}
    for r in recs:
        letters = [m.group(1) for m in (MEASURED_ANSWER.search(s["grounding"] or "") for s in r["seg_masks"]) if m]
        assert letters[-1] == r["answer"], r["id"]


def test_train_and_val_tiles_do_not_share_ground(built: Path) -> None:
    tiles = [t for t in load_tiles(built) if t["origin"] != "procedural"]
    blocks: dict[str, set[str]] = {}
    for t in tiles:
        blocks.setdefault(t["block"], set()).add(t["split"])
    assert all(len(v) == 1 for v in blocks.values()), blocks
    feet = {sp: [(t["id"], footprint_lonlat(georef_from_json(t["georef"]), tuple(t["shape"])))
                 for t in tiles if t["split"] == sp] for sp in ("train", "val")}
    assert feet["train"] and feet["val"]
    assert overlapping_pairs(feet["train"], feet["val"]) == []
    # the check itself can fail: a val tile moved onto a train tile's ground is reported
    tid, tp = feet["train"][0]
    width = tp.bounds[2] - tp.bounds[0]
    touching = shapely.affinity.translate(tp, width, 0)  # shares an edge only: not shared ground
    half = shapely.affinity.translate(tp, width / 2, 0)
    assert overlapping_pairs(feet["train"], [("moved", half)])
    assert not overlapping_pairs([(tid, tp)], [("touching", touching)])


def test_sizes_stay_compact(built: Path) -> None:
    meta = json.loads((built / "build.json").read_text())
    images = list((built / "images").glob("*.tif"))
    assert meta["bytes"] < 15e6 and images
    assert np.mean([p.stat().st_size for p in images]) < 200_000


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    from model.data import procedural
    from model.data.build import synthesize

    outs = []
    for run in range(2):
        rng = np.random.default_rng(11)
        scenes = [procedural.landcover(rng, 0), procedural.settlement(rng, 1)]
        scenes[0].split, scenes[1].split = "train", "val"
        synthesize(scenes, tmp_path / f"run{run}", 40, 20, rng, log=lambda *_: None)
        outs.append([(tmp_path / f"run{run}" / f).read_text() for f in ("train.jsonl", "val.jsonl", "tiles.json")])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("cls,one", [("water", "water body"), ("building", "building"), ("tree", "tree cluster"),
                                     ("forest", "forest patch"), ("cropland", "field")])
def test_one_object_of_a_class_is_a_real_singular(cls: str, one: str) -> None:
    from model.data.l1 import count_answer
    from model.data.scene import object_text

    assert object_text(cls) == one
    assert count_answer(1, cls) == f"1 {one}"


def test_no_label_or_question_carries_a_broken_singular(built: Path) -> None:
    for r in _all(built):
        texts = [r["question"], r["target"]] + [m["label"] for m in r.get("seg_masks", [])]
        assert not any("bodie " in t + " " or "patche " in t + " " for t in texts), r["id"]
