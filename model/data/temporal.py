"""Questions over before/after pairs and longer series (building change estimation and its relatives).

Traces visit the images in order with an explicit "Image: tK" before each [SEG]; derived masks (the
destroyed buildings, on t0) keep the k-th [SEG] on image k mod n. Answers come from
``worker.measure.change`` on the per-date ground-truth masks.
"""

from __future__ import annotations

import numpy as np

from model.data.l1 import _finish_numeric, count_answer
from model.data.numbers import fmt_count, fmt_pct
from model.data.records import Ctx, Record, multiple_choice
from model.data.scene import objects_text
from model.data.trace import Trace, image_tag
from worker import measure as M


def destroyed_mask(before: np.ndarray, after: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Before-objects with less than ``threshold`` of their pixels left after (``change``'s rule)."""
    from scipy import ndimage

    lab, n = ndimage.label(before, structure=M.CONNECTIVITY4)
    if n == 0:
        return np.zeros_like(before, bool)
    size = np.bincount(lab.ravel(), minlength=n + 1)
    kept = np.bincount(lab.ravel(), weights=after.ravel(), minlength=n + 1)
    gone = np.flatnonzero(kept < threshold * size)
    gone = gone[gone > 0]
    return np.isin(lab, gone)


def _visit(ctx: Ctx, tr: Trace, cls: str, lead: str = "") -> list[int]:
    counts = []
    o = objects_text(cls)
    for k, f in enumerate(ctx.view.frames):
        n = ctx.facts.measure(f, cls).count
        counts.append(n)
        tr.say(f"{lead if k == 0 else ' '}In {image_tag(k)} the {o}")
        ctx.seg(tr, cls, o, frame=f, image=k)
        tr.say(f" number {n}.")
    return counts


def destroyed(ctx: Ctx, cls: str, mc: bool, percent: bool = False) -> Record | None:
    f0, f1 = ctx.view.frames[0], ctx.view.frames[-1]
    if len(ctx.view.frames) != 2:
        return None
    b, a = ctx.facts.mask(f0, cls), ctx.facts.mask(f1, cls)
    ch = M.change(b, a, ctx.scene.georef, ctx.scene.valid)
    if ch.before_count == 0:
        return None
    name = ctx.facts.add(f0, f"{cls}@destroyed", destroyed_mask(b, a))
    o = objects_text(cls)
    tr = Trace()
    _visit(ctx, tr, cls, lead="I compare the two dates. ")
    tr.say(f" The {o} of {image_tag(0)} that lost more than half of their footprint by {image_tag(1)}")
    ctx.seg(tr, name, f"destroyed {o}", frame=f0, image=0)
    tr.say(f" number {ch.destroyed_count}.")
    if percent:
        pct = 100.0 * ch.destroyed_count / ch.before_count
        tr.say(f" {ch.destroyed_count} of {ch.before_count} is {fmt_pct(pct)}.")
        q = ctx.pick((f"What percentage of the {o} were destroyed between the two images?",
                      f"What share of the {o} visible in the first image is gone in the second?"))
        return _finish_numeric(ctx, tr, "change", q, pct, fmt_pct,
                               {"op": "destroyed_pct", "segs": [0, 1]}, mc, upper=100.0)
    q = ctx.pick((f"How many {o} were destroyed between the two images?",
                  f"How many {o} from the first image no longer stand in the second?",
                  f"Comparing before and after, how many {o} disappeared?"))
    return _finish_numeric(ctx, tr, "change", q, ch.destroyed_count, fmt_count,
                           {"op": "destroyed", "segs": [0, 1]}, mc, integer=True,
                           open_answer=count_answer(ch.destroyed_count, cls))


def appeared(ctx: Ctx, cls: str, mc: bool) -> Record | None:
    """New objects between the first and last image (objects of the last date touching nothing before)."""
    f0, fl = ctx.view.frames[0], ctx.view.frames[-1]
    ch = M.change(ctx.facts.mask(f0, cls), ctx.facts.mask(fl, cls), ctx.scene.georef, ctx.scene.valid)
    if ch.disappeared_count:
        return None  # keep the rule "new = last - first" exact for the trace
    o = objects_text(cls)
    tr = Trace()
    counts = _visit(ctx, tr, cls, lead="I count the objects at each date. ")
    tr.say(f" No {o} disappeared, so {counts[-1]} - {counts[0]} = {ch.appeared_count} were built.")
    last = f"t{len(ctx.view.frames) - 1}"
    q = ctx.pick((f"How many new {o} appeared between t0 and {last}?",
                  f"How many {o} were built between the first and the last image?"))
    return _finish_numeric(ctx, tr, "change", q, ch.appeared_count, fmt_count,
                           {"op": "appeared", "segs": [0, len(ctx.view.frames) - 1]}, mc, integer=True,
                           open_answer=count_answer(ch.appeared_count, cls))


def most_objects(ctx: Ctx, cls: str) -> Record | None:
    """Series: which image has the most objects (ties are not asked)."""
    counts = [ctx.facts.measure(f, cls).count for f in ctx.view.frames]
    best = int(np.argmax(counts))
    if counts.count(max(counts)) > 1:
        return None
    o = objects_text(cls)
    tr = Trace()
    _visit(ctx, tr, cls, lead="I count at every date. ")
    value = f"t{best}"
    tr.say(f" The largest count is in {image_tag(best)}.")
    q = ctx.pick((f"In which image are there the most {o}?", f"Which date shows the largest number of {o}?"))
    others = [f"t{k}" for k in range(len(counts)) if k != best][:3]
    options, letter = multiple_choice(ctx, value, others)
    return ctx.record("l2", "change", q, tr, letter,
                      {"op": "argmax_count", "segs": list(range(len(counts))), "value_text": value}, options)


def count_at(ctx: Ctx, cls: str, mc: bool) -> Record:
    k = int(ctx.rng.integers(len(ctx.view.frames)))
    f = ctx.view.frames[k]
    n = ctx.facts.measure(f, cls).count
    o = objects_text(cls)
    tr = Trace().say(f"I look at {image_tag(k)} only. In {image_tag(k)} the {o}")
    # keep "k-th [SEG] on image k mod n" by segmenting the earlier dates first when k > 0
    if k:
        tr = Trace().say("I go through the dates in order.")
        for j in range(k):
            tr.say(f" In {image_tag(j)} the {o}")
            ctx.seg(tr, cls, o, frame=ctx.view.frames[j], image=j)
            tr.say(f" number {ctx.facts.measure(ctx.view.frames[j], cls).count}.")
        tr.say(f" In {image_tag(k)} the {o}")
    ctx.seg(tr, cls, o, frame=f, image=k)
    tr.say(f" number {n}.")
    q = f"How many {o} are there in image t{k}?"
    return _finish_numeric(ctx, tr, "counting", q, n, fmt_count, {"op": "count", "segs": [k]}, mc, integer=True,
                           open_answer=count_answer(n, cls))
