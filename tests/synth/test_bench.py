"""TerraScope-Bench: generation from held-back tiles, JSONL round trip, scoring, option extraction, parquet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.bench import cli
from model.bench import evaluate as E
from model.bench.extract import extract_choice
from model.bench.format import TASKS, BenchFormatError, read_bench, write_bench
from model.bench.generate import generate
from model.bench.official import check_columns, task_code
from model.data import numbers as N
from model.data.store import load_mask, load_tiles, read_georef, write_mask
from worker import measure as M

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests/fixtures/terrascope-official-tiny/checkpoint"


@pytest.fixture(scope="module")
def bench(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "val" / "bench.jsonl"
    generate(built, "val", out, seed=0)
    return out


def test_bench_uses_only_held_back_real_tiles(bench: Path, built: Path) -> None:
    items = read_bench(bench)
    assert len(items) >= 20
    assert {i.task for i in items} <= set(TASKS) and {"CA", "AQ", "COUNT", "CR", "BCE"} <= {i.task for i in items}
    val = {t["id"]: t for t in load_tiles(built, "val") if t["origin"] in ("real", "edited")}
    for it in items:
        scene = it.id.split("/")[1]
        assert scene in val, it.id
        assert it.sensor == val[scene]["sensor"]  # the imagery, for IoU by platform
        assert len(it.choices) == (2 if it.task in ("CR", "BRD") else 4)
        assert it.answer in it.letters and it.gt_masks
        texts = [N.option_text(c) for c in it.choices]
        assert len(set(texts)) == len(texts)
        if it.task in ("CA", "AQ", "DM", "COUNT", "BCE"):
            assert N.well_separated([N.parse_number(t) for t in texts]), it.choices


def test_bench_answers_match_their_masks(bench: Path) -> None:
    for it in read_bench(bench):
        right = N.option_text(it.choices[it.letters.index(it.answer)])
        georef = read_georef(it.images[0].path)
        gt = load_mask(it.gt_masks[0].path)
        m = M.measure_mask(gt, georef)
        if it.task == "CA":
            assert right == N.fmt_pct(m.coverage_pct)
        elif it.task == "AQ":
            assert right == N.fmt_area(m.area_m2, right.split()[-1])
        elif it.task == "COUNT":
            assert right == str(m.count)
        elif it.task == "BCE" and "%" not in right:
            before, after = load_mask(it.gt_masks[0].path), load_mask(it.gt_masks[1].path)
            assert right == str(M.change(before, after, georef).destroyed_count)


def test_worker_measured_choice_recovers_every_answer_from_the_ground_truth(bench: Path) -> None:
    """worker/resolve.py, given the ground-truth masks with their labels, names every bench answer: the
    worker's measuring rules and the bench's answers agree, so a wrong measured choice is a mask error.
    (A before/after item's masks are the t0 buildings, the t1 buildings, then the change mask on t1.)"""
    from worker.raster import read_raster
    from worker.resolve import MeasuredImage, MeasuredStep, measured_choice

    items = read_bench(bench)
    wrong = []
    for it in items:
        roles = E.worker_roles([im.role for im in it.images])
        images = [MeasuredImage(role, read_raster(str(im.path))[1]) for im, role in zip(it.images, roles)]
        steps = [MeasuredStep(k + 1, gt.label, min(k, len(images) - 1), load_mask(gt.path).astype(bool))
                 for k, gt in enumerate(it.gt_masks)]
        got = measured_choice(it.question, [N.option_text(c) for c in it.choices], steps, images)
        if got is None or got["choice"] != it.answer:
            wrong.append((it.id, it.answer, got and got.get("message")))
    assert not wrong, wrong
    assert {it.task for it in items} >= {"CA", "AQ", "COUNT", "CR", "BCE"}


def test_bench_jsonl_round_trip(bench: Path, tmp_path: Path) -> None:
    items = read_bench(bench)
    again = tmp_path / "copy" / "bench.jsonl"
    shutil.copytree(bench.parent, again.parent)
    write_bench(again, read_bench(again))
    assert again.read_text() == bench.read_text()
    lines = [json.loads(x) for x in bench.read_text().splitlines()]
    assert all(not Path(im["path"]).is_absolute() for x in lines for im in x["images"])
    assert [i.to_json(bench.parent) for i in items] == lines


@pytest.mark.parametrize(("text", "letter"), [
    ("<think>...</think><answer>B</answer>", "B"),
    ("<think>x</think><answer> c) 12 ha</answer>", "C"),
    ("<think>x</think><answer>The answer is D.</answer>", "D"),
    ("<think>x</think><answer>Developed land</answer>", "D"),  # official pattern: no word boundary
    ("<answer>option a</answer>", "A"),  # the official fallback is case-insensitive
    ("B", "B"),
    ("I think it is B", "I THINK IT IS B"),
    ("", ""),
])
def test_option_extraction(text: str, letter: str) -> None:
    assert extract_choice(text) == letter


def _tiny_bench(tmp: Path) -> Path:
    """Four hand-made questions with ground-truth masks; answers and IoUs are known in advance."""
    img = tmp / "img.tif"
    shutil.copyfile(REPO / "tests/data/fair_zanzibar/OAM-319295-270960-19.tif", img)
    gt = np.zeros((8, 8), bool)
    gt[:4] = True
    write_mask(tmp / "gt.png", gt)
    rows = []
    for i, (task, n) in enumerate([("CA", 4), ("CA", 4), ("COUNT", 4), ("BRD", 2)]):
        rows.append({"id": f"q{i}", "task": task, "images": [{"path": "img.tif", "role": "optical"}],
                     "question": "?", "choices": [f"{L}. {k}" for k, L in enumerate("ABCD"[:n])], "answer": "B",
                     "gt_masks": [{"path": "gt.png", "label": "y" if i == 2 else "x"}]})
    (tmp / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    half = np.zeros((8, 8), bool)
    half[:2] = True  # IoU 0.5 with gt
    write_mask(tmp / "p_half.png", half)
    write_mask(tmp / "p_full.png", gt)
    # measured_choice (the worker's done.measured_choice): q0 right, q1 right, q2 none (wrong), q3 wrong
    rec = [
        {"id": "q0", "grounding": True, "text": "<think>a [SEG]</think><answer>B</answer>",
         "masks": [{"path": "p_full.png", "image": 0}],
         "measured_choice": {"choice": "B", "quantity": "coverage"}},                     # right, IoU 1
        {"id": "q1", "grounding": True, "text": "<answer>A. 0</answer>",
         "masks": [{"path": "p_half.png", "image": 0}],
         "measured_choice": {"choice": "B", "quantity": "coverage"}},                     # wrong, IoU 0.5
        {"id": "q2", "grounding": True, "text": "<answer>the answer is B</answer>", "masks": []},  # right, IoU 0
        {"id": "q3", "grounding": True, "text": "<answer>C</answer>",
         "masks": [{"path": "p_half.png", "image": 0}, {"path": "p_full.png", "image": 0}],
         "measured_choice": {"choice": "A", "quantity": "adjacency"}},                    # wrong, IoU 1
        {"id": "q0", "grounding": False, "text": "<answer>A</answer>", "masks": [],
         "measured_choice": {"choice": "B"}},  # not grounded: never part of the measured mode
    ]
    (tmp / "rec.jsonl").write_text("\n".join(json.dumps(r) for r in rec) + "\n")
    return tmp / "bench.jsonl"


def test_scoring_recorded_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _tiny_bench(tmp_path)
    out = tmp_path / "report"
    assert cli.main([str(path), "--recorded", str(tmp_path / "rec.jsonl"), "--json", "--ground", "--out",
                     str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"macro_accuracy", "per_task", "mean_iou", "n", "measured"}
    assert last["n"] == 4
    assert last["per_task"] == {"CA": 0.5, "BRD": 0.0, "COUNT": 1.0}
    assert last["macro_accuracy"] == pytest.approx(0.5)
    assert last["mean_iou"] == pytest.approx((1.0 + 0.5 + 0.0 + 1.0) / 4)
    res = json.loads((out / "results.json").read_text())["runs"]["grounded"]
    assert res["iou_correct"] == pytest.approx(0.5) and res["iou_incorrect"] == pytest.approx(0.75)
    # IoU per ground-truth label: "x" masks got 1, 0.5 and 1; the one "y" mask had no prediction
    assert res["per_label_iou"] == {"x": pytest.approx(2.5 / 3), "y": 0.0}
    assert res["label_counts"] == {"x": 3, "y": 1}
    assert "| x | 3 | 0.833 |" in (out / "report.md").read_text()
    assert (out / "plot.png").stat().st_size > 10_000 and "| CA (coverage percentage) | 2 |" in \
        (out / "report.md").read_text()
    # the measured mode: the worker's measured choices of the grounded run, unresolved questions wrong
    assert last["measured"] == {"macro_accuracy": pytest.approx(1 / 3), "per_task": {"CA": 1.0, "BRD": 0.0, "COUNT": 0.0},
                                "resolved": 3, "n": 4}
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["measured"]["resolved"] == 3 and results["runs"]["grounded"]["resolved"] is None
    assert [p["measured_choice"] for p in results["predictions"]] == ["B", "B", None, "A"]
    report = (out / "report.md").read_text()
    assert "accuracy % (measured)" in report and "| CA (coverage percentage) | 2 | 50.0 | 100.0 |" in report
    assert "measured: macro 33.3 %" in report and "3 of 4 resolved" in report


def test_measured_choice_is_recorded_and_replayed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """record_outputs keeps done.measured_choice; RecordedAnswerer gives it back; no recording -> no measured mode."""
    path = _tiny_bench(tmp_path)
    items = read_bench(path)
    preds = E.run(items, E.RecordedAnswerer(tmp_path / "rec.jsonl"), [True])
    E.record_outputs(tmp_path / "again" / "outputs.jsonl", preds)
    again = E.run(items, E.RecordedAnswerer(tmp_path / "again" / "outputs.jsonl"), [True])
    assert [p.measured_choice for p, _ in again] == ["B", "B", None, "A"]
    assert [p.measured_quantity for p, _ in again] == ["coverage", "coverage", None, "adjacency"]
    summary = E.summarize(E.measured_predictions([p for p, _ in again]), measured=True)
    assert summary.per_task == {"CA": 1.0, "BRD": 0.0, "COUNT": 0.0} and summary.resolved == 3
    assert cli.main([str(path), "--recorded", str(tmp_path / "rec.jsonl"), "--json", "--no-ground"]) == 0
    captured = capsys.readouterr()
    assert "measured" not in json.loads(captured.out.strip().splitlines()[-1])
    assert "accuracy % (measured)" not in captured.err


def test_both_grounding_modes_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _tiny_bench(tmp_path)
    assert cli.main([str(path), "--recorded", str(tmp_path / "rec.jsonl"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "accuracy % (grounded)" in captured.err and "accuracy % (not grounded)" in captured.err
    assert "accuracy % (measured)" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["macro_accuracy"] == pytest.approx(0.5)


def test_mask_iou_is_split_by_the_imagery_platform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's building target is about aerial tiles: the report splits each label's IoU by platform."""
    from model.bench.format import platform

    assert [platform(s) for s in ("aerial RGB", "drone RGB", "WorldView-2 pan", "Sentinel-2 L2A",
                                  "synthetic 0.5 m aerial", None)] == \
        ["aerial", "aerial", "satellite", "satellite", "synthetic", "unknown"]
    path = _tiny_bench(tmp_path)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for row, sensor in zip(rows, ("aerial RGB", "WorldView-2 pan", None, "drone RGB")):
        if sensor:
            row["sensor"] = sensor
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report"
    assert cli.main([str(path), "--recorded", str(tmp_path / "rec.jsonl"), "--ground", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["runs"]["grounded"]
    # "x": q0 (aerial, IoU 1), q1 (satellite, 0.5), q3 (drone = aerial, 1); "y": q2, no sensor
    assert res["platform_label_iou"] == {"x": {"aerial": [1.0, 2], "satellite": [0.5, 1]}, "y": {"unknown": [0.0, 1]}}
    report = (out / "report.md").read_text()
    assert "| ground-truth label | aerial: masks, IoU | satellite: masks, IoU |" in report
    assert "| x | 2, 1.000 | 1, 0.500 |" in report and "| y |" not in report.split("by the imagery")[1]


@pytest.mark.parametrize(("patch", "message"), [
    ({"answer": "E"}, "not one of the choices"), ({"sensor": 3}, "'sensor' must be a string"), ({"task": "XX"}, "is not one of"),
    ({"choices": ["A. 1"]}, "2-4 strings"), ({"images": []}, "'images' is empty"),
    ({"images": [{"path": "missing.tif"}]}, "not found"), ({"choices": ["B. 1", "A. 2"]}, "lettered A, B"),
])
def test_bad_bench_lines_are_named(tmp_path: Path, patch: dict, message: str) -> None:
    path = _tiny_bench(tmp_path)
    row = json.loads(path.read_text().splitlines()[0]) | patch
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(BenchFormatError, match=message):
        read_bench(path)


def test_official_layout_checks() -> None:
    check_columns(["image", "task_type", "question", "candidates", "answer", "extra"])
    with pytest.raises(BenchFormatError, match=r"missing column\(s\) \['candidates'\]"):
        check_columns(["image", "task_type", "question", "options", "answer"])
    assert task_code("coverage_percentage") == "CA" and task_code("boundary_detection") == "BRD"
    assert task_code("distance_measurement") == "DM" and task_code("building_change_estimation") == "BCE"
    with pytest.raises(BenchFormatError, match="unknown official task_type"):
        task_code("scene_classification")


def test_official_parquet_is_read(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, format="PNG")
    table = pa.table({"image": [{"bytes": buf.getvalue(), "path": "x.png"}], "task_type": ["coverage_percentage"],
                      "question": ["What share is water?"],
                      "candidates": [json.dumps({"A": "58%", "B": "80%", "C": "68%", "D": "65%"})], "answer": ["A"]})
    pq.write_table(table, tmp_path / "b.parquet")
    from model.bench.official import read_official

    (item,) = read_official(tmp_path / "b.parquet", tmp_path / "img")
    assert item.task == "CA" and item.choices[0] == "A. 58%" and item.answer == "A" and item.images[0].path.is_file()
    pq.write_table(table.rename_columns(["img", "task_type", "question", "candidates", "answer"]), tmp_path / "c.parquet")
    with pytest.raises(BenchFormatError, match="missing column"):
        read_official(tmp_path / "c.parquet", tmp_path / "img2")


def test_questions_go_through_the_real_worker(bench: Path) -> None:
    """End to end with the official tiny random checkpoint: the ask path runs and returns a scored answer."""
    item = next(i for i in read_bench(bench) if i.task == "CA")
    ans = E.WorkerAnswerer(str(TINY), [item.images[0].path.parent], device="cpu", max_new_tokens=6)
    try:
        raw = ans.answer(item, grounding=True, injection="box")
    finally:
        ans.close()
    assert raw.error is None and raw.text
    pred = E.score(item, raw, True, "box")
    assert pred.choice == extract_choice(raw.text) and pred.iou is not None
    # the measured choice comes from the worker's done event: a letter with its quantity, or nothing
    assert (raw.measured is None) == (pred.measured_choice is None)
    if raw.measured is not None:
        assert pred.measured_choice in item.letters and pred.measured_quantity == raw.measured["quantity"]
