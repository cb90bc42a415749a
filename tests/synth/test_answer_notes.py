"""Measured answers in training spans (model/data/answer_notes.py): the worker's rule on each prefix of masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from model.data.answer_notes import annotate_dataset, spans_with_answers
from model.data.store import load_records
from model.prompting import strip_measured_answer
from worker.measure import Georef, grounding_text, measure_mask

GEOREF = Georef.from_gdal([500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0], "EPSG:32633")  # UTM 33N, 10 m pixels


def _square(r0: int, c0: int, side: int) -> np.ndarray:
    m = np.zeros((40, 40), bool)
    m[r0:r0 + side, c0:c0 + side] = True
    return m


def _spans(question: str, choices: list[str], answer: str, masks: list[np.ndarray], labels: list[str]):
    bare = [grounding_text(measure_mask(m, GEOREF)) for m in masks]
    return bare, spans_with_answers(question, choices, answer, bare, masks, labels, [0] * len(masks),
                                    ["optical"], GEOREF, None)


def test_a_record_gets_the_answer_its_masks_support() -> None:
    water = _square(0, 0, 20)  # 400 of 1600 px: 25 %
    bare, spans = _spans("What share of the image is water?", ["A. 10%", "B. 25%", "C. 50%", "D. 75%"], "B",
                         [water], ["water"])
    assert spans == [bare[0][:-1] + "; measured answer B]"]


def test_a_record_whose_masks_name_another_letter_gets_no_note() -> None:
    """A rule reading the question differently from the generator must not teach a wrong copy."""
    water = _square(0, 0, 20)
    bare, spans = _spans("What share of the image is water?", ["A. 10%", "B. 25%", "C. 50%", "D. 75%"], "C",
                         [water], ["water"])
    assert spans == bare


def test_the_last_note_decides_and_earlier_ones_stay() -> None:
    """A half comparison resolves from the first mask alone, then again from both: the record keeps both notes
    when the last one is its answer, as the worker would inject them."""
    north, south = _square(0, 5, 10), _square(25, 5, 14)  # the southern half holds more
    q = "Which covers more: the water in the northern half or the water in the southern half?"
    choices = ["A. the water in the northern half", "B. the water in the southern half"]
    bare, spans = _spans(q, choices, "B", [north, south], ["water in the northern half", "water in the southern half"])
    assert spans[0] == bare[0][:-1] + "; measured answer A]"  # the northern mask alone: all the water
    assert spans[-1] == bare[-1][:-1] + "; measured answer B]"
    assert all(strip_measured_answer(s) == b for s, b in zip(spans, bare))


def test_annotating_a_built_dataset_again_changes_nothing(built: Path, tmp_path: Path) -> None:
    """The builder writes the notes already; the CLI on a copy whose notes were stripped writes them back."""
    copy = tmp_path / "ds"
    shutil.copytree(built, copy)
    for split in ("train", "val"):
        rows = load_records(copy, split)
        for row in rows:
            for seg in row["seg_masks"]:
                seg["grounding"] = strip_measured_answer(seg["grounding"]) if seg.get("grounding") else seg["grounding"]
        (copy / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    assert "measured answer" not in (copy / "train.jsonl").read_text(encoding="utf-8")
    counts = annotate_dataset(copy, log=lambda *_: None)
    assert counts["train"][1] > 0
    for split in ("train", "val"):
        assert load_records(copy, split) == load_records(built, split)
