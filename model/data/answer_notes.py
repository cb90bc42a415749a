"""The measured answer in a record's grounding spans: "[area 12.3 ha, 4.1% of valid area, 2 objects; measured answer B]".

Why: with measurement grounding the worker writes, after each mask, the option its masks so far support
(``worker.resolve.span_with_answer``); the small model then only has to copy a letter, not compare decimals
(which it never learnt, docs/TRAINING.md). Training spans must read the same, so each prefix of a record's
ground-truth masks goes through that same function. The last note is the one to follow (a half-comparison is
resolved from the first mask, then again from both); a record whose last note would name another letter than
its answer (a question the rules read differently from the generator) gets none, so training never teaches a
wrong copy.

``python -m model.data.answer_notes --data DATASET`` rewrites the spans of an existing dataset in place
(idempotent); new builds get them from ``DatasetWriter.record_json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.prompting import MEASURED_ANSWER, strip_measured_answer
from worker import resolve as R
from worker.measure import Georef


def spans_with_answers(question: str, choices: Sequence[str] | None, answer: str, spans: Sequence[str | None],
                       masks: Sequence[np.ndarray], labels: Sequence[str], images: Sequence[int],
                       roles: Sequence[str], georef: Georef, valid: np.ndarray | None) -> list[str | None]:
    """The record's spans with the measured answer of each mask prefix, or the spans unchanged (see module)."""
    plain = [strip_measured_answer(s) if isinstance(s, str) else s for s in spans]
    if not choices or not plain:
        return plain
    views = [R.MeasuredImage(role, georef, valid) for role in roles]
    steps: list[R.MeasuredStep] = []
    out: list[str | None] = []
    for k, (span, mask, label, image) in enumerate(zip(plain, masks, labels, images)):
        steps.append(R.MeasuredStep(k, label, image, mask & valid if valid is not None else mask))
        if not span:
            out.append(span)
            continue
        out.append(R.span_with_answer(span, question, choices, steps, views))
    letters = [m.group(1) for m in (MEASURED_ANSWER.search(s) for s in out if isinstance(s, str)) if m]
    return out if letters and letters[-1] == answer else plain


def annotate_records(root: Path, rows: list[dict], tiles: dict[str, dict]) -> tuple[list[dict], int]:
    """Rows with measured-answer spans (new dicts) and how many rows got at least one note."""
    from model.data.store import georef_from_json, load_mask

    mask_cache: dict[str, np.ndarray] = {}

    def mask(path: str) -> np.ndarray:
        if path not in mask_cache:
            mask_cache[path] = load_mask(root / path)
        return mask_cache[path]

    out, noted = [], 0
    for row in rows:
        segs = row.get("seg_masks") or []
        tile = tiles.get(row.get("scene", ""))
        if not segs or not row.get("choices") or tile is None:
            out.append(row)
            continue
        valid = None if tile.get("valid") is None else mask(tile["valid"])
        spans = spans_with_answers(
            row["question"], row["choices"], row["answer"], [s.get("grounding") for s in segs],
            [mask(s["path"]) for s in segs], [s["label"] for s in segs], [s["image"] for s in segs],
            [im.get("role", "optical") for im in row["images"]], georef_from_json(tile["georef"]), valid)
        new = dict(row, seg_masks=[dict(s, grounding=g) for s, g in zip(segs, spans)])
        noted += any(isinstance(g, str) and MEASURED_ANSWER.search(g) is not None for g in spans)
        out.append(new)
    return out, noted


def annotate_dataset(root: Path, splits: Sequence[str] = ("train", "val"), log=print) -> dict[str, tuple[int, int]]:
    """Rewrite ``root``'s record files with measured-answer spans; {split: (records, records noted)}."""
    from model.data.store import load_records, load_tiles

    t0 = time.time()
    tiles = {t["id"]: t for t in load_tiles(root)}
    counts = {}
    for split in splits:
        rows, noted = annotate_records(root, load_records(root, split), tiles)
        tmp = root / f"{split}.jsonl.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
        tmp.replace(root / f"{split}.jsonl")
        counts[split] = (len(rows), noted)
        log(f"{split}: {noted} of {len(rows)} records carry a measured answer ({time.time() - t0:.1f} s)")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.data.answer_notes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a dataset built by model.data.build")
    args = ap.parse_args(argv)
    try:
        annotate_dataset(args.data)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
