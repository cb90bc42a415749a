"""Option redraw: a numeric multiple-choice record gets new options and a new letter at every training draw.

Why: the model's letter ignored its own measurement span (on the validation bench it agreed with the option
the worker's measurements support about as often as chance). A record is seen with one fixed set of options,
so 8,000 records overfit long before "name the option nearest the measured value" is learnt. Here each draw
(1) draws fresh distractors around the record's true value, as the bench does (``model.data.numbers``),
(2) perturbs the measurement span by up to ``redraw_jitter`` (the predicted mask measures off the truth),
(3) restates the span's value, lists the options in the trace and names the one nearest the value, the rule
the worker's measured choice uses (``worker/resolve.py``: absolute points for percentages, relative distance
for areas and counts). So the letter follows the measurement, and a span that reads nearer a distractor gives
that distractor. Without a span in the input (``ground_prob``) the letter is the true one.

The options are listed in the trace because a small model fails to look up one option's value across the
image tokens (phase 6a wrote "the answer is B: 223 ha" with no such option), while copying the list in order
and comparing it with the value just written are local steps. Tried on terrascope-mini in phases 6a, 6, 7 and
8 (docs/TRAINING.md): the model learnt to copy the span and the options, not to pick the nearest; not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.data import numbers

if TYPE_CHECKING:
    from model.training.data import Restatement

__all__ = ["OptionPlan", "Redraw", "choice_sentence", "marks_for", "nearest_letter", "plan_for", "redraw", "rewrite"]

#: Where a synthesised trace names its option (model/data/records.py, ``pick_option_sentence``).
_CHOICE_SENTENCE = re.compile(r" (?:The option that matches|This corresponds to option|So the answer is|Option [A-D],)")


@dataclass(frozen=True)
class OptionPlan:
    """What a record's options are drawn from: the true value and how the trace writes it."""

    question: str
    op: str  # "area" | "coverage" | "count"
    unit: str | None  # area unit of the options ("ha", "m²")
    value_text: str  # the true value as written ("34.0%", "273 ha", "20")
    n_options: int
    piece: int  # index of the trace's text piece that restates the value (the last one)
    head: str  # that piece up to the written value ("... which cover ")
    middle: str  # between the value and the option sentence (" of the valid image area.")


@dataclass(frozen=True)
class Redraw:
    """One draw: the options (without letters) and the true value's letter."""

    options: list[str]
    letter: str


def _fmt(plan: OptionPlan):
    if plan.op == "coverage":
        return numbers.fmt_pct
    if plan.op == "count":
        return lambda v: numbers.fmt_count(int(v))
    return lambda v: numbers.fmt_area(v, plan.unit)


def _value(plan: OptionPlan, text: str) -> float:
    """A written value in the unit options are compared in (m² for areas)."""
    v = numbers.parse_number(text)
    return v * numbers.AREA_M2[plan.unit] if plan.op == "area" else v


def plan_for(rec: dict, restate: Restatement, last_piece: int) -> OptionPlan | None:
    """The plan of a one-mask numeric multiple-choice record whose restating piece is the trace's last and
    names its option in a sentence this module can replace (or ends the thinking right after the value)."""
    choices = rec.get("choices") or []
    if restate.piece != last_piece or len(choices) < 2 or restate.op not in ("area", "coverage", "count"):
        return None
    if restate.op == "area" and restate.unit not in numbers.AREA_M2:
        return None
    head, _, tail = restate.text.partition(restate.value_text)  # the value is in the text (find_restatement)
    m = _CHOICE_SENTENCE.search(tail)
    end = m.start() if m else tail.find("</think>")
    if end < 0:
        return None
    return OptionPlan(str(rec["question"]), restate.op, restate.unit, restate.value_text, len(choices),
                      restate.piece, head, tail[:end])


def redraw(plan: OptionPlan, rng: np.random.Generator) -> Redraw | None:
    """Fresh options around the true value (None when no distractor set can be drawn)."""
    value = _value(plan, plan.value_text)
    try:
        distractors = numbers.numeric_distractors(value, _fmt(plan), rng, n=plan.n_options - 1,
                                                  upper=100.0 if plan.op == "coverage" else None,
                                                  integer=plan.op == "count")
        options, letter = numbers.shuffle_options(plan.value_text, distractors, rng)
    except ValueError:
        return None
    return Redraw([numbers.option_text(o) for o in options], letter)


def nearest_letter(plan: OptionPlan, options: list[str], measured_text: str) -> str | None:
    """Letter of the option nearest the measured value; None on an exact tie (the caller keeps the truth)."""
    v = _value(plan, measured_text)
    vals = [_value(plan, o) for o in options]

    def key(o: float) -> tuple[float, float]:
        if plan.op == "coverage":
            return abs(v - o), 0.0
        return numbers.rel_gap(v, o), abs(v - o)

    keys = [key(o) for o in vals]
    best = min(keys)
    if keys.count(best) > 1:
        return None
    return numbers.LETTERS[keys.index(best)]


def choice_sentence(options: list[str], letter: str, marks: list[str] | None = None) -> str:
    """" The options are A 49.5%, B 99.0%, ...; the nearest is A (49.5%)." ``marks`` tag each option
    ("A 49.5% (above)"): four pairwise comparisons with the value before the nearest is named."""
    listing = ", ".join(f"{numbers.LETTERS[i]} {o}" + (f" ({marks[i]})" if marks else "")
                        for i, o in enumerate(options))
    return f" The options are {listing}; the nearest is {letter} ({options[numbers.LETTERS.index(letter)]})."


def marks_for(plan: OptionPlan, options: list[str], value_text: str) -> list[str]:
    """"above" / "below" / "equal" for each option against the written value."""
    v = _value(plan, value_text)
    return ["above" if o > v else "below" if o < v else "equal" for o in (_value(plan, t) for t in options)]


def rewrite(plan: OptionPlan, draw: Redraw, restated: str | None, letter: str, marks: bool = False) -> str:
    """The last piece with the restated value, the options listed and the named option's letter.

    The piece read "... covers <value>. The option that matches is B (<value>).</think><answer>B</answer>":
    the value becomes the restated measurement and the option sentence ``choice_sentence``.
    """
    value = restated or plan.value_text
    tags = marks_for(plan, draw.options, value) if marks else None
    return (plan.head + value + plan.middle + choice_sentence(draw.options, letter, tags)
            + f"</think><answer>{letter}</answer>")
