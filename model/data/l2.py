"""Terra-CoT level 2 by rule (no LLM offline): comparison, ranking, multi-step and rule-based semantic
questions composed from level-1 measurements, plus RES pairs and grounded captions (Cap-CoT).

Every composed answer follows from the masks in the trace by a rule stated in the trace itself.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from model.data.facts import location_phrase
from model.data.l1 import _finish_numeric, count_answer
from model.data.numbers import area_formatter, fmt_area, fmt_distance, fmt_pct, rel_gap, sig
from model.data.records import (
    Ctx,
    Record,
    adjacency_record,
    multiple_choice,
    pick_option_sentence,
    yes_no_record,
)
from model.data.scene import be, object_text, objects_text, region_text
from model.data.trace import Trace
from model.regions import half_mask

#: Relative area gap below which "which is larger" is not asked (answers must be unambiguous).
CLEAR_GAP = 0.15
URBAN_SHARE = 30.0  # % of built-up cover above which a scene is called predominantly built-up

Q_RES = ("Please segment the {r}.", "Please segment the {r}.", "Please segment the {r}.", "Segment the {r} in this image.",
         "Please segment all {r} in the image.")


def res(ctx: Ctx, cls: str) -> Record:
    q = ctx.pick(Q_RES).format(r=region_text(cls))
    tr = Trace()
    ctx.seg(tr, cls, region_text(cls))
    rec = ctx.record("res", "res", q, tr, "", {"op": "res", "segs": [0]})
    rec.target = "[SEG]"
    rec.answer = "[SEG]"
    return rec


def _two_areas(ctx: Ctx, tr: Trace, a: str, b: str, la: str, lb: str) -> tuple[float, float]:
    ma, mb = ctx.facts.measure(ctx.lf, a), ctx.facts.measure(ctx.lf, b)
    use_area = ma.area_m2 is not None and mb.area_m2 is not None
    tr.say(f"I segment the {la}")
    ctx.seg(tr, a, la)
    tr.say(f", which cover{'s' if be_label(la) == 'is' else ''} "
           f"{fmt_area(ma.area_m2) if use_area else fmt_pct(ma.coverage_pct)}, and the {lb}")
    ctx.seg(tr, b, lb)
    tr.say(f", which cover{'s' if be_label(lb) == 'is' else ''} "
           f"{fmt_area(mb.area_m2) if use_area else fmt_pct(mb.coverage_pct)}.")
    if use_area:
        return float(ma.area_m2), float(mb.area_m2)  # type: ignore[arg-type]
    return ma.coverage_pct, mb.coverage_pct


def be_label(label: str) -> str:
    return "are" if label.endswith("s") and not label.endswith("ss") else "is"


def compare_yesno(ctx: Ctx, a: str, b: str, mc: bool) -> Record | None:
    va, vb = ctx.facts.measure(ctx.lf, a).area_px, ctx.facts.measure(ctx.lf, b).area_px
    if rel_gap(va, vb) < CLEAR_GAP:
        return None
    ra, rb = region_text(a), region_text(b)
    q = ctx.pick((f"Is the area of the {ra} larger than the area of the {rb}?",
                  f"Do the {ra} cover more ground than the {rb}?" if be(a) == "are" else
                  f"Does the {ra} cover more ground than the {rb}?",
                  f"Is there more {ra} than {rb} in this image?"))
    tr = Trace()
    x, y = _two_areas(ctx, tr, a, b, ra, rb)
    yes = x > y
    tr.say(f" The first is {'larger' if yes else 'smaller'}, so the answer is {'yes' if yes else 'no'}.")
    return yes_no_record(ctx, "l2", "comparison", q, tr, yes, "larger", mc)


def larger_of(ctx: Ctx, a: str, b: str, la: str, lb: str, question: str, task: str = "comparison") -> Record | None:
    """Two-option comparative ranking (bench task CR): which of two masks covers more ground."""
    va, vb = ctx.facts.measure(ctx.lf, a).area_px, ctx.facts.measure(ctx.lf, b).area_px
    if min(va, vb) == 0 or rel_gap(va, vb) < CLEAR_GAP:
        return None
    tr = Trace()
    x, y = _two_areas(ctx, tr, a, b, la, lb)
    win = la if x > y else lb
    tr.say(f" The {win} cover{'s' if be_label(win) == 'is' else ''} more.")
    check = {"op": "larger_of", "segs": [0, 1], "names": [la, lb], "value_text": win}
    options, letter = multiple_choice(ctx, win, [lb if win == la else la])
    tr.say(f" That is option {letter}.")
    return ctx.record("l2", task, question, tr, letter, check, options)


def half_comparison(ctx: Ctx, cls: str) -> Record | None:
    """More {cls} in the northern or southern (western/eastern) half? Derived masks cls ∩ half."""
    axis = ctx.pick(("ns", "we"))
    h1, h2 = ("north", "south") if axis == "ns" else ("west", "east")
    full = ctx.facts.mask(ctx.lf, cls)
    a = ctx.facts.add(ctx.lf, f"{cls}@{h1}", full & half_mask(full.shape, h1))
    b = ctx.facts.add(ctx.lf, f"{cls}@{h2}", full & half_mask(full.shape, h2))
    r = region_text(cls)
    la, lb = f"{r} in the {h1}ern half", f"{r} in the {h2}ern half"
    q = ctx.pick((f"Which half of the image has more {r}: the {h1}ern or the {h2}ern half?",
                  f"Is the {r} area larger in the {h1}ern half or in the {h2}ern half of the image?"))
    return larger_of(ctx, a, b, la, lb, q)


def class_comparison(ctx: Ctx, a: str, b: str) -> Record | None:
    ra, rb = region_text(a), region_text(b)
    q = ctx.pick((f"Which covers a larger area: the {ra} or the {rb}?",
                  f"Which is more extensive in this image, {ra} or {rb}?",
                  f"Comparing {ra} and {rb}, which occupies more of the scene?"))
    return larger_of(ctx, a, b, ra, rb, q)


def ranking(ctx: Ctx, classes: list[str], mc: bool) -> Record | None:
    areas = {c: ctx.facts.measure(ctx.lf, c).area_px for c in classes}
    order = sorted(classes, key=lambda c: -areas[c])
    if any(rel_gap(areas[x], areas[y]) < CLEAR_GAP for x, y in itertools.pairwise(order)):
        return None
    names = [region_text(c) for c in classes]
    q = ctx.pick((f"Rank the {', '.join(names[:-1])} and {names[-1]} by area, from largest to smallest.",
                  f"Order these land-cover types from the largest to the smallest area: {', '.join(names)}."))
    tr = Trace().say("I measure each class in turn:")
    for i, c in enumerate(classes):
        tr.say(f"{'' if i == 0 else ';'} the {region_text(c)}")
        ctx.seg(tr, c, region_text(c))
        tr.say(f" cover{'s' if be(c) == 'is' else ''} {fmt_pct(ctx.facts.measure(ctx.lf, c).coverage_pct)}")
    value = " > ".join(region_text(c) for c in order)
    tr.say(f". Sorted by area: {value}.")
    check = {"op": "rank", "segs": list(range(len(classes))), "names": names, "value_text": value}
    if mc:
        perms = [" > ".join(region_text(c) for c in p) for p in itertools.permutations(order)]
        others = [p for p in perms if p != value]
        picks = [others[i] for i in ctx.rng.choice(len(others), min(3, len(others)), replace=False)]
        options, letter = multiple_choice(ctx, value, picks)
        tr.say(pick_option_sentence(ctx, value, letter))
        return ctx.record("l2", "ranking", q, tr, letter, check, options)
    return ctx.record("l2", "ranking", q, tr, value, check)


def share_within(ctx: Ctx, a: str, b: str, mc: bool) -> Record | None:
    """Multi-step: share of {a} within D m of {b} (a ∩ buffer(b, D)), D chosen from the scene's scale."""
    ma = ctx.facts.measure(ctx.lf, a)
    px = ma.pixel_size_m
    if px is None or ma.area_m2 is None or ma.area_m2 <= 0:
        return None
    dist = float(sig(px * ctx.rng.choice([3, 5, 8, 12]), 1))
    far = ndimage.distance_transform_edt(~ctx.facts.mask(ctx.lf, b)) * px
    near = ctx.facts.add(ctx.lf, f"{a}@near_{b}_{dist:g}", ctx.facts.mask(ctx.lf, a) & (far <= dist))
    mn = ctx.facts.measure(ctx.lf, near)
    share = 100.0 * float(mn.area_m2 or 0.0) / float(ma.area_m2)
    ra, rb = region_text(a), region_text(b)
    q = ctx.pick((f"What share of the {ra} lies within {dist:g} m of the {rb}?",
                  f"What percentage of the {ra} area is less than {dist:g} m away from the {rb}?"))
    tr = Trace().say(f"First I segment the {rb}")
    ctx.seg(tr, b, rb)
    tr.say(f". Then I take the {ra} within {dist:g} m of it")
    ctx.seg(tr, near, f"{ra} near the {rb}")
    tr.say(f", which cover {fmt_area(mn.area_m2 or 0.0)}, out of all the {ra}")
    ctx.seg(tr, a, ra)
    tr.say(f", which cover {fmt_area(ma.area_m2)}. The ratio is {fmt_pct(share)}.")
    return _finish_numeric(ctx, tr, "multistep", q, share, fmt_pct, {"op": "ratio", "segs": [1, 2]}, mc,
                           upper=100.0, kind="l2")


def area_difference(ctx: Ctx, a: str, b: str, mc: bool) -> Record | None:
    ma, mb = ctx.facts.measure(ctx.lf, a), ctx.facts.measure(ctx.lf, b)
    if ma.area_m2 is None or mb.area_m2 is None or rel_gap(ma.area_m2, mb.area_m2) < CLEAR_GAP:
        return None
    big, small = (a, b) if ma.area_m2 > mb.area_m2 else (b, a)
    mbig, msmall = ctx.facts.measure(ctx.lf, big), ctx.facts.measure(ctx.lf, small)
    diff = float(mbig.area_m2) - float(msmall.area_m2)  # type: ignore[arg-type]
    fmt = area_formatter(diff)
    rb, rs = region_text(big), region_text(small)
    q = ctx.pick((f"How much more area do the {rb} cover than the {rs}?" if be(big) == "are" else
                  f"How much more area does the {rb} cover than the {rs}?",
                  f"By how much does the {rb} area exceed the {rs} area?"))
    tr = Trace().say(f"I segment the {rb}")
    ctx.seg(tr, big, rb)
    tr.say(f" ({fmt(mbig.area_m2)}) and the {rs}")  # type: ignore[arg-type]
    ctx.seg(tr, small, rs)
    tr.say(f" ({fmt(msmall.area_m2)}). The difference is {fmt(diff)}.")  # type: ignore[arg-type]
    return _finish_numeric(ctx, tr, "multistep", q, diff, fmt, {"op": "area_diff", "segs": [0, 1]}, mc, kind="l2")


def count_in_half(ctx: Ctx, cls: str, mc: bool) -> Record | None:
    which = ctx.pick(("north", "south", "west", "east"))
    full = ctx.facts.mask(ctx.lf, cls)
    sub = ctx.facts.add(ctx.lf, f"{cls}@{which}", full & half_mask(full.shape, which))
    n = ctx.facts.measure(ctx.lf, sub).count
    o = objects_text(cls)
    q = ctx.pick((f"How many {o} are in the {which}ern half of the image?",
                  f"Count the {o} in the {which}ern half of the scene."))
    tr = Trace().say(f"I segment the {o} and keep the part in the {which}ern half")
    ctx.seg(tr, sub, f"{o} in the {which}ern half")
    tr.say(f". That part of the mask has {n} separate objects (an object cut by the middle line counts once "
           f"for each half).")
    return _finish_numeric(ctx, tr, "multistep", q, n, lambda v: str(int(v)), {"op": "count", "segs": [0]}, mc,
                           integer=True, open_answer=count_answer(n, cls), kind="l2")


def largest_object(ctx: Ctx, cls: str, mc: bool, task: str = "distance") -> Record | None:
    """Derived masks: the largest object of ``cls`` and all the others; its area or its nearest neighbour."""
    from model.data.augment import objects

    lab, n = objects(ctx.facts.mask(ctx.lf, cls))
    if n < 2:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    big = int(np.argmax(sizes)) + 1
    if np.sort(sizes)[-2] == sizes[big - 1]:
        return None  # two equally large objects: "the largest" would be ambiguous
    o = objects_text(cls)
    one = object_text(cls)
    a = ctx.facts.add(ctx.lf, f"{cls}@largest", lab == big)
    b = ctx.facts.add(ctx.lf, f"{cls}@others", (lab > 0) & (lab != big))
    tr = Trace().say(f"I segment the largest {one}")
    ctx.seg(tr, a, f"largest {one}")
    if task == "area":
        ma = ctx.facts.measure(ctx.lf, a)
        if ma.area_m2 is None:
            return None
        fmt = area_formatter(ma.area_m2)
        tr.say(f", which covers {fmt(ma.area_m2)}.")
        q = ctx.pick((f"What is the area of the largest {one}?", f"How large is the biggest {one} in the image?"))
        unit = "ha" if fmt(ma.area_m2).endswith("ha") else "m²"
        return _finish_numeric(ctx, tr, "area", q, ma.area_m2, fmt, {"op": "area", "segs": [0], "unit": unit}, mc,
                               kind="l2")
    d = ctx.facts.distance_m(ctx.lf, a, b)
    if d is None or d <= 0:
        return None
    tr.say(f" and the other {o}")
    ctx.seg(tr, b, f"other {o}")
    tr.say(f". The nearest of them is {fmt_distance(d)} from the largest {one}.")
    q = ctx.pick((f"How far is the largest {one} from the nearest other {one}?",
                  f"What is the distance between the largest {one} and its closest neighbouring {one}?"))
    return _finish_numeric(ctx, tr, "distance", q, d, fmt_distance, {"op": "distance", "segs": [0, 1]}, mc,
                           kind="l2")


def largest_adjacency(ctx: Ctx, a: str, b: str, mc: bool) -> Record | None:
    """Boundary question about one object: does the largest {a} patch border the {b} (other {a} if a == b)?"""
    from model.data.augment import objects

    lab, n = objects(ctx.facts.mask(ctx.lf, a))
    if n < 1 or (a == b and n < 2):
        return None
    sizes = np.bincount(lab.ravel())[1:]
    big = int(np.argmax(sizes)) + 1
    if n > 1 and np.sort(sizes)[-2] == sizes[big - 1]:
        return None
    one = region_text(a) if be(a) == "is" else object_text(a)
    patch = f"largest {one} patch" if be(a) == "is" else f"largest {one}"
    x = ctx.facts.add(ctx.lf, f"{a}@largest", lab == big)
    if a == b:
        y = ctx.facts.add(ctx.lf, f"{a}@others", (lab > 0) & (lab != big))
        other = f"other {objects_text(a)}"
    else:
        y, other = b, region_text(b)
    q = ctx.pick((f"Does the {patch} border the {other}?", f"Is the {patch} adjacent to the {other}?"))
    tr = Trace().say(f"I segment the {patch}")
    ctx.seg(tr, x, patch)
    tr.say(f" and the {other}")
    ctx.seg(tr, y, other)
    return adjacency_record(ctx, "l2", q, tr, x, y, mc, ". Their outlines touch, so they share a boundary.",
                            " (closest pixels {} apart)")


def dominant(ctx: Ctx, classes: list[str], mc: bool) -> Record | None:
    """Semantic by rule: the dominant land cover is the class with the largest area."""
    areas = {c: ctx.facts.measure(ctx.lf, c).area_px for c in classes}
    order = sorted(classes, key=lambda c: -areas[c])
    if len(order) < 2 or rel_gap(areas[order[0]], areas[order[1]]) < CLEAR_GAP:
        return None
    q = ctx.pick(("What is the dominant land cover in this image?", "Which land-cover type dominates the scene?"))
    tr = Trace().say("I compare the main classes:")
    for i, c in enumerate(order[:3]):
        tr.say(f"{'' if i == 0 else ';'} {region_text(c)}")
        ctx.seg(tr, c, region_text(c))
        tr.say(f" {fmt_pct(ctx.facts.measure(ctx.lf, c).coverage_pct)}")
    value = region_text(order[0])
    tr.say(f". The largest is {value}, so it dominates the scene.")
    check = {"op": "rank_top", "segs": list(range(min(3, len(order)))), "names": [region_text(c) for c in order[:3]],
             "value_text": value}
    if mc:
        others = [region_text(c) for c in order[1:4]]
        options, letter = multiple_choice(ctx, value, others)
        return ctx.record("l2", "semantic", q, tr, letter, check, options)
    return ctx.record("l2", "semantic", q, tr, value, check)


def built_up(ctx: Ctx, cls: str) -> Record:
    """Semantic by rule: predominantly built-up when ``cls`` covers >= URBAN_SHARE % of the image."""
    m = ctx.facts.measure(ctx.lf, cls)
    q = ctx.pick(("Is this area predominantly built-up?", "Would you describe this scene as mainly built-up?"))
    tr = Trace().say(f"I segment the {region_text(cls)}")
    ctx.seg(tr, cls, region_text(cls))
    yes = m.coverage_pct >= URBAN_SHARE
    tr.say(f", which cover{'' if be(cls) == 'are' else 's'} {fmt_pct(m.coverage_pct)} of the image. I call a scene predominantly built-up from "
           f"{URBAN_SHARE:.0f}% of built-up cover, so {'yes' if yes else 'no'}.")
    value = "Yes" if yes else "No"
    return ctx.record("l2", "semantic", q, tr, value,
                      {"op": "threshold", "segs": [0], "threshold": URBAN_SHARE, "value_text": value})


def caption(ctx: Ctx, classes: list[str]) -> Record | None:
    """Cap-CoT by rule: classes present, coverage, where they lie, what borders what; one [SEG] each."""
    present = [c for c in classes if ctx.facts.present(ctx.lf, c)]
    if not present:
        return None
    present.sort(key=lambda c: -ctx.facts.measure(ctx.lf, c).area_px)
    present = present[:4]
    q = ctx.pick(("Describe this image in detail, grounding each land-cover type you mention.",
                  "Write a grounded caption of this scene.", "What does this image show? Describe it step by step."))
    tr = Trace()
    parts = []
    for i, c in enumerate(present):
        m = ctx.facts.measure(ctx.lf, c)
        loc = location_phrase(ctx.facts.mask(ctx.lf, c))
        lead = "First, I observe" if i == 0 else ctx.pick(("Next, I notice", "I also see", "There is also"))
        tr.say(f"{'' if i == 0 else ' '}{lead} {region_text(c)}")
        ctx.seg(tr, c, region_text(c))
        extra = f" in {m.count} separate objects" if c in ctx.scene.countable and 0 < m.count <= 50 else ""
        tr.say(f", covering about {fmt_pct(m.coverage_pct)} of the image{extra}, {loc}.")
        parts.append(f"{region_text(c)} ({fmt_pct(m.coverage_pct)}, {loc})"
                     if not extra else f"{count_answer(m.count, c)} ({fmt_pct(m.coverage_pct)}, {loc})")
    relations = []
    for a, b in itertools.combinations(present, 2):
        if ctx.facts.adjacent(ctx.lf, a, b):
            relations.append(f"the {region_text(a)} borders the {region_text(b)}")
        else:
            d = ctx.facts.distance_m(ctx.lf, a, b)
            if d is not None:
                relations.append(f"the {region_text(a)} and the {region_text(b)} are {fmt_distance(d)} apart")
    if relations:
        tr.say(" Spatially, " + "; ".join(relations[:3]) + ".")
    where = f"{ctx.scene.sensor} image" if ctx.scene.sensor else "image"
    res_txt = f" at about {ctx.scene.gsd_m:g} m resolution" if ctx.scene.gsd_m else ""
    cap = f"This {where}{res_txt} shows " + ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    cap += ("; " + "; ".join(relations[:3]) if relations else "") + "."
    return ctx.record("cap", "caption", q, tr, cap, {"op": "caption", "segs": list(range(len(present)))})

