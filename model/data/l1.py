"""Terra-CoT level 1 (paper appendix E.2): existence, counting, localization, area (ha, m², %),
boundary adjacency and distance, in open and multiple-choice forms, with several phrasings each.
"""

from __future__ import annotations

from model.data.facts import location_phrase
from model.data.numbers import (
    area_formatter,
    fmt_count,
    fmt_distance,
    fmt_pct,
    numeric_distractors,
)
from model.data.records import Ctx, Record, adjacency_record, multiple_choice, pick_option_sentence
from model.data.scene import be, object_text, objects_text, region_text
from model.data.trace import Trace

Q_EXIST = ("Is there any {r} in the image?", "Does the image contain any {r}?", "Can you find any {r} in this scene?",
           "Is any {r} visible in this image?")
Q_EXIST_PL = ("Are there any {r} in the image?", "Does the image contain any {r}?", "Can you see any {r} here?",
              "Are any {r} visible in this scene?")
Q_COUNT = ("How many {o} are there in the image?", "Count the {o} in this image.",
           "What is the number of {o} visible in the scene?", "How many separate {o} can be seen?")
Q_LOC = ("Where is the {r} located in the image?", "In which part of the image {be} the {r}?",
         "Where {be} the {r} in this scene?", "Describe where the {r} {be} located.")
Q_AREA = ("What is the area of the {r}?", "What is the total area covered by the {r}?",
          "How large is the area of the {r} in total?", "How much ground {do} the {r} cover?")
Q_COVER = ("What percentage of the image is covered by {r}?", "What share of the image {be} {r}?",
           "What proportion of the scene is occupied by the {r}?", "How much of the image, in percent, {be} {r}?")
Q_ADJ = ("Does the {a} border the {b}?", "Is the {a} adjacent to the {b}?", "Do the {a} and the {b} share a boundary?",
         "Is there any place where the {a} touches the {b}?")
Q_DIST = ("What is the distance between the {a} and the {b}?", "How far is the {a} from the nearest {b}?",
          "What is the shortest distance separating the {a} and the {b}?",
          "How many metres lie between the {a} and the {b} at their closest point?")
UNIT_HINT = {"ha": (" Answer in hectares.", " Give the area in hectares.", ""),
             "m²": (" Answer in square metres.", " Give the area in m².", "")}


def _fill(tmpl: str, cls: str | None = None, **kw: str) -> str:
    if cls is not None:
        kw.setdefault("r", region_text(cls))
        kw.setdefault("o", objects_text(cls))
        kw.setdefault("be", be(cls))
        kw.setdefault("do", "do" if be(cls) == "are" else "does")
    return tmpl.format(**kw)


def _seg_intro(ctx: Ctx, cls: str) -> str:
    r = region_text(cls)
    return ctx.pick((f"I first identify the {r} regions", f"I segment the {r}", f"First I locate the {r}",
                     f"To answer, I delineate the {r}"))


def count_answer(n: int, cls: str) -> str:
    return f"{n} {object_text(cls) if n == 1 else objects_text(cls)}"


def _finish_numeric(ctx: Ctx, tr: Trace, task: str, question: str, value: float, fmt, check: dict,
                    mc: bool, upper: float | None = None, integer: bool = False, open_answer: str | None = None,
                    kind: str = "l1") -> Record:
    text = fmt(value)
    check = {**check, "value_text": text}
    if mc:
        options, letter = multiple_choice(ctx, text, numeric_distractors(value, fmt, ctx.rng, upper=upper,
                                                                            integer=integer))
        tr.say(pick_option_sentence(ctx, text, letter))
        return ctx.record(kind, task, question, tr, letter, check, options)
    return ctx.record(kind, task, question, tr, open_answer or text, check)


def existence(ctx: Ctx, cls: str, mc: bool) -> Record:
    q = _fill(ctx.pick(Q_EXIST_PL if be(cls) == "are" else Q_EXIST), cls)
    tr = Trace().say(ctx.pick((f"I look for {region_text(cls)}", f"I search the image for {region_text(cls)}")))
    ctx.seg(tr, cls, region_text(cls))
    m = ctx.facts.measure(ctx.lf, cls)
    if m.area_px > 0:
        tr.say(f", which covers {fmt_pct(m.coverage_pct)} of the image, so {region_text(cls)} {be(cls)} present.")
        value = "Yes"
    else:
        tr.say(f". The mask is empty, so there {be(cls)} no {region_text(cls)} in the image.")
        value = "No"
    check = {"op": "exists", "segs": [0], "value_text": value}
    if mc:
        options, letter = multiple_choice(ctx, value, ["No" if value == "Yes" else "Yes"])
        return ctx.record("l1", "existence", q, tr, letter, check, options)
    return ctx.record("l1", "existence", q, tr, value, check)


def counting(ctx: Ctx, cls: str, mc: bool) -> Record:
    q = _fill(ctx.pick(Q_COUNT), cls)
    tr = Trace().say(_seg_intro(ctx, cls))
    ctx.seg(tr, cls, objects_text(cls))
    n = ctx.facts.measure(ctx.lf, cls).count
    tr.say(ctx.pick((f". The mask contains {n} separate objects.", f". Counting its connected parts gives {n}.",
                     f"; the mask splits into {n} distinct objects.")))
    return _finish_numeric(ctx, tr, "counting", q, n, fmt_count, {"op": "count", "segs": [0]}, mc, integer=True,
                           open_answer=count_answer(n, cls))


def localization(ctx: Ctx, cls: str, mc: bool) -> Record:
    q = _fill(ctx.pick(Q_LOC), cls)
    tr = Trace().say(_seg_intro(ctx, cls))
    ctx.seg(tr, cls, region_text(cls))
    loc = location_phrase(ctx.facts.mask(ctx.lf, cls))
    tr.say(ctx.pick((f". Most of the mask lies {loc}.", f". The mask is concentrated {loc}.",
                     f". Reading the mask with north at the top, the {region_text(cls)} {be(cls)} {loc}.")))
    check = {"op": "location", "segs": [0], "value_text": loc}
    if mc:
        pool = ["in the north-western part", "in the northern part", "in the north-eastern part",
                "in the western part", "in the centre", "in the eastern part", "in the south-western part",
                "in the southern part", "in the south-eastern part", "scattered across the image",
                "across most of the image", "in the northern half", "in the southern half"]
        others = [p for p in pool if p != loc]
        picks = [others[i] for i in ctx.rng.choice(len(others), 3, replace=False)]
        options, letter = multiple_choice(ctx, loc, picks)
        return ctx.record("l1", "localization", q, tr, letter, check, options)
    return ctx.record("l1", "localization", q, tr, loc, check)


def area(ctx: Ctx, cls: str, mc: bool) -> Record | None:
    m = ctx.facts.measure(ctx.lf, cls)
    if m.area_m2 is None:
        return None  # no CRS: no ground area (never asked)
    fmt = area_formatter(m.area_m2)
    unit = "ha" if fmt(m.area_m2).endswith("ha") else "m²"
    q = _fill(ctx.pick(Q_AREA), cls) + ctx.pick(UNIT_HINT[unit])
    tr = Trace().say(_seg_intro(ctx, cls))
    ctx.seg(tr, cls, region_text(cls))
    tr.say(ctx.pick((f". Measured on the ground, the mask covers {fmt(m.area_m2)}.",
                     f". The total area of the mask is {fmt(m.area_m2)}.",
                     f"; together these pixels cover {fmt(m.area_m2)} of ground.")))
    return _finish_numeric(ctx, tr, "area", q, m.area_m2, fmt, {"op": "area", "segs": [0], "unit": unit}, mc)


def coverage(ctx: Ctx, cls: str, mc: bool) -> Record:
    m = ctx.facts.measure(ctx.lf, cls)
    q = _fill(ctx.pick(Q_COVER), cls)
    tr = Trace().say(_seg_intro(ctx, cls))
    ctx.seg(tr, cls, region_text(cls))
    p = fmt_pct(m.coverage_pct)
    tr.say(ctx.pick((f", which cover {p} of the valid image area.", f". The mask occupies {p} of the image.",
                     f". Dividing the mask's pixels by the valid pixels gives {p}.")))
    return _finish_numeric(ctx, tr, "coverage", q, m.coverage_pct, fmt_pct, {"op": "coverage", "segs": [0]}, mc,
                           upper=100.0)


def adjacency(ctx: Ctx, a: str, b: str, mc: bool) -> Record:
    q = _fill(ctx.pick(Q_ADJ), a=region_text(a), b=region_text(b))
    tr = Trace().say(f"I segment the {region_text(a)}")
    ctx.seg(tr, a, region_text(a))
    tr.say(f" and the {region_text(b)}")
    ctx.seg(tr, b, region_text(b))
    return adjacency_record(ctx, "l1", q, tr, a, b, mc,
                            (". The two masks share a boundary.", ". Their outlines touch, so they border each other."),
                            " (the closest pixels are {} apart)")


def distance(ctx: Ctx, a: str, b: str, mc: bool) -> Record | None:
    d = ctx.facts.distance_m(ctx.lf, a, b)
    if d is None or d <= 0:
        return None
    q = _fill(ctx.pick(Q_DIST), a=region_text(a), b=region_text(b))
    tr = Trace().say(f"I segment the {region_text(a)}")
    ctx.seg(tr, a, region_text(a))
    tr.say(f" and the {region_text(b)}")
    ctx.seg(tr, b, region_text(b))
    tr.say(ctx.pick((f". The shortest gap between the two masks is {fmt_distance(d)}.",
                     f". Measured between their closest edges, they are {fmt_distance(d)} apart.")))
    return _finish_numeric(ctx, tr, "distance", q, d, fmt_distance, {"op": "distance", "segs": [0, 1]}, mc)
