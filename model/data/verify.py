"""Re-derive a stored record's answer from its exported masks and georeferencing, independently of synthesis.

Reads the 1-bit mask PNGs and the image GeoTIFF's own georeferencing (as the worker would), calls
``worker.measure`` directly and formats with the shared number formatters. ``check_record`` returns a
list of problems (empty = the record is consistent); the synthesis tests run it over a built dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.data import numbers as N
from model.data.facts import location_phrase
from model.data.numbers import LETTERS, option_text
from model.data.trace import SEG, check_image_order, parse_target
from worker import measure as M


def _valid(root: Path, tile: dict | None, shape: tuple[int, int]) -> np.ndarray:
    from model.data.store import load_mask

    if tile is None or tile.get("valid") is None:
        return np.ones(shape, bool)
    return load_mask(root / tile["valid"])


def recompute(root: Path, rec: dict, tile: dict | None = None) -> str | None:
    """The answer value text recomputed from the record's masks; None for ops without a value (RES)."""
    from model.data.store import load_mask, read_georef

    chk = rec["check"]
    op = chk["op"]
    masks = [load_mask(root / s["path"]) for s in rec["seg_masks"]]
    georef = read_georef(root / rec["images"][0]["path"])
    valid = _valid(root, tile, masks[0].shape) if masks else None

    def meas(i: int) -> M.MaskMeasurements:
        return M.measure_mask(masks[chk["segs"][i]], georef, valid)

    if op in ("res", "caption"):
        return None
    if op == "coverage":
        return N.fmt_pct(meas(0).coverage_pct)
    if op == "area":
        m = meas(0)
        if m.area_m2 is None:
            return None
        return N.fmt_area(float(m.area_m2), chk.get("unit") or N.area_unit(m.area_m2))
    if op == "count":
        return N.fmt_count(meas(0).count)
    if op == "exists":
        return "Yes" if meas(0).area_px > 0 else "No"
    if op == "location":
        return location_phrase(masks[chk["segs"][0]])
    if op == "adjacent":
        a, b = (masks[i] for i in chk["segs"])
        return "Yes" if M.adjacent(a, b, georef) else "No"
    if op == "distance":
        a, b = (masks[i] for i in chk["segs"])
        d = M.nearest_distance_m(a, b, georef)
        return None if d is None else N.fmt_distance(d)
    if op in ("larger", "larger_of"):
        ma, mb = meas(0), meas(1)
        metric = ma.area_m2 is not None and mb.area_m2 is not None
        x, y = (ma.area_m2, mb.area_m2) if metric else (ma.coverage_pct, mb.coverage_pct)
        if op == "larger":
            return "Yes" if x > y else "No"
        return chk["names"][0] if x > y else chk["names"][1]
    if op in ("rank", "rank_top"):
        areas = [meas(i).area_px for i in range(len(chk["segs"]))]
        order = [chk["names"][i] for i in np.argsort([-a for a in areas], kind="stable")]
        return " > ".join(order) if op == "rank" else order[0]
    if op == "ratio":
        part, whole = meas(0), meas(1)
        return N.fmt_pct(100.0 * float(part.area_m2 or 0.0) / float(whole.area_m2))  # type: ignore[arg-type]
    if op == "area_diff":
        a, b = float(meas(0).area_m2), float(meas(1).area_m2)  # type: ignore[arg-type]
        return N.area_formatter(a - b)(a - b)
    if op == "threshold":
        return "Yes" if meas(0).coverage_pct >= chk["threshold"] else "No"
    if op in ("destroyed", "destroyed_pct", "appeared"):
        before, after = (masks[i] for i in chk["segs"])
        ch = M.change(before, after, georef, valid)
        if op == "destroyed":
            return N.fmt_count(ch.destroyed_count)
        if op == "appeared":
            return N.fmt_count(ch.appeared_count)
        return N.fmt_pct(100.0 * ch.destroyed_count / ch.before_count)
    if op == "argmax_count":
        counts = [meas(i).count for i in range(len(chk["segs"]))]
        return f"t{int(np.argmax(counts))}"
    raise ValueError(f"unknown check op {op!r}")


def check_record(root: Path, rec: dict, tile: dict | None = None) -> list[str]:
    """Every problem with one record: trace syntax, [SEG]/mask pairing, options, recomputed answer."""
    problems: list[str] = []
    rid = rec.get("id", "?")
    try:
        parsed = parse_target(rec["target"])
    except ValueError as exc:
        return [f"{rid}: {exc}"]
    if parsed.n_seg != len(rec["seg_masks"]):
        problems.append(f"{rid}: {parsed.n_seg} [SEG] but {len(rec['seg_masks'])} masks")
    for s in rec["seg_masks"]:
        if not (root / s["path"]).is_file():
            problems.append(f"{rid}: mask file {s['path']} missing")
        if not 0 <= s["image"] < len(rec["images"]):
            problems.append(f"{rid}: mask refers to image {s['image']} of {len(rec['images'])}")
    roles = [im["role"] for im in rec["images"]]
    if len(roles) > 1 and all(r.startswith("t") for r in roles) and \
            not check_image_order([s["image"] for s in rec["seg_masks"]], len(roles)):
            problems.append(f"{rid}: [SEG] images {[s['image'] for s in rec['seg_masks']]} break the t-order")
    if problems:
        return problems
    value = recompute(root, rec, tile)
    expected = rec["check"].get("value_text")
    if value is None:
        if rec["check"]["op"] not in ("res", "caption"):
            problems.append(f"{rid}: value could not be recomputed")
        return problems
    if value != expected:
        problems.append(f"{rid}: recomputed {value!r} != stored {expected!r}")
    choices = rec.get("choices")
    if choices:
        letters = [c[0] for c in choices]
        if letters != list(LETTERS[: len(choices)]):
            problems.append(f"{rid}: option letters {letters}")
        texts = [option_text(c) for c in choices]
        if texts.count(value) != 1:
            problems.append(f"{rid}: answer {value!r} appears {texts.count(value)} times in {texts}")
        elif rec["answer"] != LETTERS[texts.index(value)]:
            problems.append(f"{rid}: answer letter {rec['answer']} but {value!r} is option {LETTERS[texts.index(value)]}")
        problems += distractor_problems(rid, texts, value)
    elif value not in rec["answer"]:
        problems.append(f"{rid}: open answer {rec['answer']!r} does not state {value!r}")
    if SEG in rec["answer"] and rec["kind"] != "res":
        problems.append(f"{rid}: [SEG] in the answer")
    return problems


def distractor_problems(rid: str, texts: list[str], answer: str | None = None) -> list[str]:
    """Numeric options must be >= 15 % apart (as displayed), in the answer's unit and order of magnitude
    (within 0.05x-11x, so no option is absurd); non-numeric ones distinct."""
    if len(set(texts)) != len(texts):
        return [f"{rid}: duplicate options {texts}"]
    try:
        nums = [N.parse_number(t) for t in texts]
    except ValueError:
        return []
    if any(t in ("Yes", "No") or t.startswith("t") for t in texts):
        return []
    if not N.well_separated(nums):
        return [f"{rid}: options {texts} are closer than {N.MIN_GAP:.0%}"]
    if answer is not None:
        unit = answer.split()[-1] if " " in answer else ("%" if answer.endswith("%") else "")
        a = N.parse_number(answer)
        if unit and any(not t.endswith(unit) for t in texts):
            return [f"{rid}: options {texts} mix units"]
        if a > 0 and any(x != 0 and not 0.05 * a <= x <= 11 * a for x in nums):
            return [f"{rid}: options {texts} are not of the answer's magnitude"]
    return []
