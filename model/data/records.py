"""Records (one training sample each) and what every generator shares: views, options, provenance.

A record keeps a ``check`` dict (its provenance: which measurement of which ``[SEG]`` mask gave the
answer) so that the tests re-derive every answer from the exported masks, independently of synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.data.facts import Facts
from model.data.numbers import fmt_distance, shuffle_options
from model.data.scene import Scene
from model.data.trace import SegRef, Trace


@dataclass(frozen=True)
class View:
    """Which scene frames a record shows (in order) and which frame holds the labels it reasons about."""

    frames: tuple[int, ...]
    label_frame: int = 0
    roles: tuple[str, ...] = ("optical",)

    @property
    def multi_time(self) -> bool:
        return len(self.frames) > 1 and all(r.startswith("t") for r in self.roles)


@dataclass
class Record:
    id: str
    kind: str  # res | l1 | l2 | cap
    task: str
    scene: Scene
    view: View
    question: str
    choices: list[str] | None
    answer: str
    target: str
    segs: list[SegRef]
    check: dict = field(default_factory=dict)
    facts: Facts | None = field(default=None, repr=False)  # the cache holding this record's derived masks


@dataclass
class Ctx:
    """Everything a generator needs for one scene view."""

    scene: Scene
    facts: Facts
    view: View
    rng: np.random.Generator
    counter: list[int] = field(default_factory=lambda: [0])

    def pick(self, items: list[str] | tuple[str, ...]) -> str:
        return items[int(self.rng.integers(len(items)))]

    def new_id(self, task: str) -> str:
        self.counter[0] += 1
        tag = "-".join(str(f) for f in self.view.frames)
        return f"{self.scene.id}/{tag}/{task}/{self.counter[0]}"

    @property
    def lf(self) -> int:
        return self.view.label_frame

    def seg(self, tr: Trace, name: str, label: str, frame: int | None = None, image: int | None = None) -> Trace:
        """Append a [SEG] for mask ``name`` of ``frame`` (default: the label frame) with its grounding span."""
        frame = self.lf if frame is None else frame
        if image is None:
            image = self.view.frames.index(frame) if frame in self.view.frames else 0
        return tr.seg(frame, name, label, self.facts.grounding(frame, name), image)

    def record(self, kind: str, task: str, question: str, tr: Trace, answer: str, check: dict,
               choices: list[str] | None = None) -> Record:
        return Record(self.new_id(task), kind, task, self.scene, self.view, question, choices, answer,
                      tr.render(answer), list(tr.segs), check, self.facts)


def multiple_choice(ctx: Ctx, value_text: str, distractors: list[str]) -> tuple[list[str], str]:
    return shuffle_options(value_text, distractors, ctx.rng)


def pick_option_sentence(ctx: Ctx, value_text: str, letter: str) -> str:
    return ctx.pick((
        f" The option that matches is {letter} ({value_text}).",
        f" This corresponds to option {letter}.",
        f" So the answer is {letter}: {value_text}.",
        f" Option {letter}, {value_text}, is the closest.",
    ))


def yes_no_record(ctx: Ctx, kind: str, task: str, question: str, tr: Trace, yes: bool, op: str,
                  mc: bool) -> Record:
    """A Yes/No answer about masks 0 and 1, or its multiple-choice form: one check layout for all."""
    value = "Yes" if yes else "No"
    check = {"op": op, "segs": [0, 1], "value_text": value}
    if mc:
        options, letter = multiple_choice(ctx, value, ["No" if yes else "Yes"])
        return ctx.record(kind, task, question, tr, letter, check, options)
    return ctx.record(kind, task, question, tr, value, check)


def adjacency_record(ctx: Ctx, kind: str, question: str, tr: Trace, a: str, b: str, mc: bool,
                     touch_says: str | tuple[str, ...], far_says: str) -> Record:
    """Do masks ``a`` and ``b`` share a boundary. Levels word it differently; reasoning and check are one.

    ``touch_says`` is the sentence (or sentences to pick from) when they touch; ``far_says`` the gap
    clause with ``{}`` for the distance when they do not.
    """
    touch = ctx.facts.adjacent(ctx.lf, a, b)
    if touch:
        tr.say(touch_says if isinstance(touch_says, str) else ctx.pick(touch_says))
    else:
        gap = ctx.facts.distance_m(ctx.lf, a, b)
        far = far_says.format(fmt_distance(gap)) if gap is not None else ""
        tr.say(f". The two masks do not touch{far}, so they do not share a boundary.")
    return yes_no_record(ctx, kind, "adjacency", question, tr, touch, "adjacent", mc)
