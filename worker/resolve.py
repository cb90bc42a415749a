"""The measured choice: which multiple-choice option the masks themselves support.

Why: a small model draws usable masks but picks letters near chance. Every number that can be computed
from a mask is computed, so the worker also says which option its own measurements support, and the user
sees when the model's letter disagrees. Nothing here changes the model's answer or its letter; with
measurement grounding the option the masks drawn so far support is also written into the span the model
reads after each mask (``span_with_answer``), as a calculator's result would be, so the model's own letter
can follow its measurements instead of comparing decimals itself.

Inputs are only the question text, the option texts, the masks with their labels (the reasoning text that
introduced each ``[SEG]``), their images (role, georeferencing, valid pixels) and ``worker.measure``. No bench
task label is used. When no rule applies, or a rule cannot measure what it needs, the result is None: the
worker never guesses.

Rules, tried in this order; the quantity comes from the option units and the question words:

1. Options all "Yes"/"No":
   - touch / border / adjacent / next to / share a boundary -> ``adjacency``: ``measure.adjacent`` (overlap, or
     a gap of at most one pixel) between the first two masks of one image;
   - "larger / more ... than" -> ``larger``: is the first mask's area larger than the second's;
   - "is there / are there / does the image contain / can you find|see / is|are any" -> ``existence``: the
     relevant mask is not empty.
2. Options all percentages:
   - with change words (destroyed, demolished, lost, removed, gone, disappeared, no longer; or new, built,
     appeared, constructed) and >= 2 images -> ``change_share``: ``measure.change`` between the first plain mask
     on the earliest image (t0) and the first plain mask on the latest one (tN), as model/data defines the
     building-change share: 100 x destroyed_count / before_count (objects of the first date with less than half
     of their pixels left); for new buildings 100 x appeared_count / after_count;
   - else ``coverage``: the relevant mask's % of valid pixels.
3. Options all areas (m², ha, km²) -> ``area`` (geodesic, ``measure_mask``) of the relevant mask.
4. Options all lengths (m, km) -> ``distance``: ``measure.nearest_distance_m`` between the first two masks.
5. Options all plain integers or "N <noun>" -> ``count`` (8-connected objects, ``count_objects``) of the
   relevant mask, or with change words and >= 2 images ``change_count`` (destroyed or appeared objects).
6. Options naming image halves ("clouds in the northern half") -> ``larger``: the class masks (the masks whose
   labels share the options' class words; all masks of the image when none does) are split at the middle row or
   column, and the option whose half holds the larger geodesic area wins.
7. Other text options with a comparison in the question (more, larger, most, extensive, dominates ...) ->
   ``larger``: each option is matched to the mask whose label shares most of its words (normalised: lower case,
   singular, no stop words); the option whose mask has the larger area wins. Every option needs its own mask.

Label rules used by the quantities above:
- relevant mask: the mask whose label shares most words with the question; the first mask on a tie or no match;
- a mask labelled "largest/biggest X" stands for its largest object (4-connected, most pixels, as the data
  defines it: ``model.regions``); a mask labelled "other X" next to it stands for its 8-connected objects that
  do not overlap that largest object (masks from the worker already follow these rules, model/regions.py; these
  keep resolve right for masks made without them, such as sliding windows or ``"region_rules": false``);
- a question naming one half ("in the northern half") restricts count, area and coverage to that half;
- masks whose label describes the change itself (destroyed, lost ...) are not the before/after masks.

Choosing: the option nearest the measured value; absolute percentage points for percentages, relative distance
|v - o| / max(|v|, |o|) for areas, lengths and counts (ties broken by the absolute difference). An exact tie
between two options gives None. Questions this module does not cover (within-distance shares, area differences,
rankings, dates, locations, thresholds) give None rather than a wrong rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model import prompting
from model.regions import LARGEST, OTHER, half_mask, largest_object, without_objects_touching
from worker import measure as M

__all__ = ["MeasuredImage", "MeasuredStep", "choice_check", "measured_choice", "span_with_answer"]

LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class MeasuredImage:
    """One request image as the worker measures it: role (optical, sar, t0 ...), georef, valid pixels."""

    role: str
    georef: M.Georef
    valid: np.ndarray | None = None


@dataclass
class MeasuredStep:
    """One [SEG] mask on its image's request grid, as measured for ``done.measurements``."""

    step: int
    label: str
    image: int
    mask: np.ndarray
    measurements: dict | None = None  # the step's ``done.measurements`` entry; reused, so figures agree


# ------------------------------------------------------------------------------------------- words
_STOP_WORDS = """a an the of in on at to by for from with and or is are was were be been do does did this that
these those it its their there here what which how much many image images scene picture i we you first then
segment segments identify locate delineate look search find see regions region area areas mask masks cover
covers covered covering total share percentage percent proportion part parts any some all of number visible
can into than more larger bigger greater most largest biggest other others"""
_STOP = frozenset(_STOP_WORDS.split())
_CHANGE_GONE = re.compile(r"\b(destroy\w*|demolish\w*|lost|los(?:e|ing)|remov\w*|gone|disappear\w*|no longer|"
                          r"collaps\w*|razed)\b", re.IGNORECASE)
_CHANGE_NEW = re.compile(r"\b(new|built|appear(?:ed|s)?|construct\w*|added)\b", re.IGNORECASE)
_ADJ = re.compile(r"\b(border\w*|adjacent|adjoin\w*|touch\w*|next to|share\w* (?:a |any )?(?:common )?boundar\w*|"
                  r"neighbou?r\w*|abut\w*)\b", re.IGNORECASE)
_MORE_THAN = re.compile(r"\b(larger|bigger|greater|more|wider|exceed\w*)\b.*\bthan\b", re.IGNORECASE)
_EXIST = re.compile(r"^\s*(is there|are there|does (?:the|this) (?:image|scene|picture) (?:contain|show|have)|"
                    r"can you (?:find|see|spot|detect)|is any|are any|do you see)\b", re.IGNORECASE)
_COMPARE = re.compile(r"\b(more|larger|largest|bigger|biggest|greater|most|extensive|dominat\w*|occup\w* more|"
                      r"covers? more)\b", re.IGNORECASE)
_NOT_COVERED = re.compile(r"\b(within [\d.]+|less than [\d.]+ ?k?m\b|by how much|difference|how much more|rank|"
                          r"order these|predominantly|mainly)\b", re.IGNORECASE)
_HALF = re.compile(r"\b(north|south|west|east)(?:ern)? half\b", re.IGNORECASE)

_NUM = r"(-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?)"
_PCT_OPT = re.compile(rf"^{_NUM}\s*%$")
_AREA_OPT = re.compile(rf"^{_NUM}\s*(m²|m2|sq\.? ?m|square met(?:re|er)s?|ha|hectares?|km²|km2|square kilomet(?:re|er)s?)$",
                       re.IGNORECASE)
_LEN_OPT = re.compile(rf"^{_NUM}\s*(m|metres?|meters?|km|kilomet(?:re|er)s?)$", re.IGNORECASE)
_COUNT_OPT = re.compile(r"^(\d{1,3}(?:,\d{3})+|\d+)(?:\s+[a-z][a-z \-]*)?$", re.IGNORECASE)
_AREA_M2 = {"m²": 1.0, "m2": 1.0, "sqm": 1.0, "sq.m": 1.0, "ha": 1e4, "km²": 1e6, "km2": 1e6}


def _words(text: str) -> set[str]:
    """Content words, lower case and singular: "the other Buildings" -> {"building"}."""
    out = set()
    for w in re.findall(r"[a-z]+", text.lower()):
        if w in _STOP or len(w) < 2:
            continue
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        out.add(w)
    return out


def _option_texts(options: Sequence[str]) -> list[str]:
    """Option texts without a leading "A. " label matching their own letter, whitespace trimmed."""
    out = []
    for i, opt in enumerate(options):
        letter = LETTERS[i] if i < len(LETTERS) else ""
        m = re.match(rf"\s*\(?{letter}[.):]\s+", opt) if letter else None
        out.append((opt[m.end():] if m else opt).strip().rstrip("."))
    return out


def _number(text: str) -> float:
    return float(text.replace(",", ""))


# ------------------------------------------------------------------------------------ mask helpers
class _Masks:
    """Masks and their measurements for one call (measured once, from the worker's own functions)."""

    def __init__(self, steps: Sequence[MeasuredStep], images: Sequence[MeasuredImage]):
        self.steps = [s for s in steps if 0 <= s.image < len(images)]
        self.images = images
        self._largest: dict[int, np.ndarray] = {}

    def image(self, s: MeasuredStep) -> MeasuredImage:
        return self.images[s.image]

    def measure(self, s: MeasuredStep, mask: np.ndarray | None = None) -> M.MaskMeasurements:
        im = self.image(s)
        return M.measure_mask(s.mask if mask is None else mask, im.georef, _valid(im, s.mask.shape))

    def area(self, s: MeasuredStep, mask: np.ndarray | None = None) -> tuple[float, str]:
        """Geodesic area in m², or in pixels when the raster has no usable CRS; and its unit."""
        d = s.measurements if mask is None else None
        if d and isinstance(d.get("area_px"), int):
            if isinstance(d.get("area_m2"), (int, float)):
                return float(d["area_m2"]), "m²"
            return float(d["area_px"]), "px"
        m = self.measure(s, mask)
        return (float(m.area_m2), "m²") if m.area_m2 is not None else (float(m.area_px), "px")

    def largest(self, s: MeasuredStep) -> np.ndarray:
        """The mask's largest object ("the largest X", ``model.regions.largest_object``)."""
        if s.step not in self._largest:
            self._largest[s.step] = largest_object(s.mask)
        return self._largest[s.step]

    def pair(self, both_drawn: bool = False) -> tuple[MeasuredStep, MeasuredStep, np.ndarray, np.ndarray] | None:
        """The first two masks on one image, with the "largest X" / "other X" label rules applied.

        ``both_drawn``: None unless both masks have pixels (a distance or a contact needs two shapes)."""
        for i, a in enumerate(self.steps):
            for b in self.steps[i + 1:]:
                if b.image != a.image or b.mask.shape != a.mask.shape:
                    continue
                ma, mb = np.asarray(a.mask, bool), np.asarray(b.mask, bool)
                if LARGEST.search(_label(a)):
                    ma = self.largest(a)
                    if OTHER.search(_label(b)):
                        mb = without_objects_touching(mb, ma)
                elif LARGEST.search(_label(b)):
                    mb = self.largest(b)
                    if OTHER.search(_label(a)):
                        ma = without_objects_touching(ma, mb)
                if both_drawn and not (ma.any() and mb.any()):
                    return None
                return a, b, ma, mb
        return None


def _valid(im: MeasuredImage, shape: tuple[int, ...]) -> np.ndarray | None:
    return im.valid if im.valid is not None and im.valid.shape == tuple(shape) else None


def _relevant(masks: _Masks, text: str, pool: Sequence[MeasuredStep] | None = None) -> MeasuredStep | None:
    """The mask whose label shares most words with ``text``; the first one on a tie or no match."""
    pool = list(masks.steps if pool is None else pool)
    if not pool:
        return None
    want = _words(text)
    scores = [len(want & _words(_label(s))) for s in pool]
    return pool[int(np.argmax(scores))]


# ----------------------------------------------------------------------------------------- choosing
def _nearest(values: Sequence[float], value: float, relative: bool) -> int | None:
    """Index of the option nearest ``value``; None on an exact tie."""
    def key(o: float) -> tuple[float, float]:
        diff = abs(value - o)
        if not relative:
            return (diff, diff)
        big = max(abs(value), abs(o))
        return (0.0 if big == 0 else diff / big, diff)

    keys = [key(v) for v in values]
    best = min(keys)
    hits = [i for i, k in enumerate(keys) if math.isclose(k[0], best[0], abs_tol=1e-12)
            and math.isclose(k[1], best[1], abs_tol=1e-12)]
    return hits[0] if len(hits) == 1 else None


def _result(letter_index: int, texts: list[str], value: Any, value_text: str, quantity: str,
            steps: Sequence[int], what: str) -> dict:
    letter = LETTERS[letter_index]
    return {
        "choice": letter, "value": value, "value_text": value_text, "quantity": quantity,
        "steps": [int(s) for s in steps],
        "message": f"{what}, which supports option {letter} ({texts[letter_index]})",
    }


def _label(s: MeasuredStep) -> str:
    """The label without an injected measurement span ("...objects], and the water" -> "and the water")."""
    return s.label.rsplit("]", 1)[-1].strip(" ,;") if "]" in s.label else s.label.strip()


def _mask_names(steps: Sequence[MeasuredStep]) -> str:
    names = [f"mask {s.step + 1}" + (f' "{_label(s)}"' if _label(s) else "") for s in steps]
    return " and ".join(names)


def _fmt_area(value: float, unit: str) -> str:
    """m² below 0.01 ha, else ha, 3 significant digits (pixels stay pixels)."""
    if unit == "m²" and value >= 100.0:
        return f"{_fmt_num(value / 1e4)} ha"
    return f"{_fmt_num(value)} {unit}"


def _fmt_num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:,.{digits}f}" if abs(x) < 1e6 else f"{x:,.0f}"


# ------------------------------------------------------------------------------------------- rules
def measured_choice(question: str, options: Sequence[str] | None, steps: Sequence[MeasuredStep],
                    images: Sequence[MeasuredImage]) -> dict | None:
    """The option the masks support, as {choice, value, value_text, quantity, steps, message}; None when no
    rule applies or the masks cannot measure it (see the module docstring for the rules)."""
    if not options or len(options) < 2 or len(options) > len(LETTERS) or not steps:
        return None
    q = question or ""
    if _NOT_COVERED.search(q):
        return None
    texts = _option_texts(options)
    masks = _Masks(steps, images)
    if not masks.steps:
        return None
    try:
        return _resolve(q, texts, masks)
    except M.RasterError:
        return None  # e.g. masks on different grids, a CRS without a datum: nothing measured, no guess


def _resolve(q: str, texts: list[str], masks: _Masks) -> dict | None:
    low = [t.lower() for t in texts]
    if sorted(low) == ["no", "yes"]:
        return _yes_no(q, texts, masks)
    if all(_PCT_OPT.match(t) for t in texts):
        values = [_number(_PCT_OPT.match(t).group(1)) for t in texts]  # type: ignore[union-attr]
        if len(masks.images) >= 2 and (_CHANGE_GONE.search(q) or _CHANGE_NEW.search(q)):
            return _change(q, texts, values, masks, share=True)
        return _coverage(q, texts, values, masks)
    if all(_AREA_OPT.match(t) for t in texts):
        return _area(q, texts, masks)
    if all(_LEN_OPT.match(t) for t in texts):
        return _distance(texts, masks)
    if all(_COUNT_OPT.match(t) for t in texts):
        values = [_number(_COUNT_OPT.match(t).group(1)) for t in texts]  # type: ignore[union-attr]
        if len(masks.images) >= 2 and (_CHANGE_GONE.search(q) or _CHANGE_NEW.search(q)):
            return _change(q, texts, values, masks, share=False)
        return _count(q, texts, values, masks)
    halves = [_HALF.search(t) for t in texts]
    if all(halves) and len({h.group(1).lower() for h in halves if h}) == len(texts):
        return _larger_half(texts, [h.group(1).lower() for h in halves if h], masks)
    if _COMPARE.search(q) and not any(">" in t for t in texts):
        return _larger_option(texts, masks)
    return None


def _restricted(q: str, s: MeasuredStep) -> tuple[np.ndarray | None, str]:
    """The mask cut to the half the question names (None: the whole mask) and how to say so."""
    m = _HALF.search(q)
    if not m:
        return None, ""
    which = m.group(1).lower()
    return np.asarray(s.mask, bool) & half_mask(s.mask.shape, which), f" in the {which}ern half"


def _coverage(q: str, texts: list[str], values: list[float], masks: _Masks) -> dict | None:
    s = _relevant(masks, q)
    if s is None:
        return None
    cut, where = _restricted(q, s)
    d = s.measurements if cut is None else None
    cov = float(d["coverage_pct"]) if d and isinstance(d.get("coverage_pct"), (int, float)) \
        else masks.measure(s, cut).coverage_pct
    i = _nearest(values, cov, relative=False)
    if i is None:
        return None
    return _result(i, texts, cov, f"{cov:.1f}%", "coverage", [s.step],
                   f"{_mask_names([s])}{where} covers {cov:.1f}% of the valid image area")


def _area(q: str, texts: list[str], masks: _Masks) -> dict | None:
    s = _relevant(masks, q)
    if s is None:
        return None
    cut, where = _restricted(q, s)
    d = s.measurements if cut is None else None
    if d and "area_m2" in d:
        area = d["area_m2"]
    else:
        area = masks.measure(s, cut).area_m2
    if not isinstance(area, (int, float)):
        return None  # no CRS: no ground area
    options_m2, unit = [], ""
    for t in texts:
        m = _AREA_OPT.match(t)
        u = m.group(2).lower().replace(" ", "")  # type: ignore[union-attr]
        factor = _AREA_M2.get(u) or (1e4 if u.startswith("hect") else 1e6 if "kilomet" in u else 1.0)
        options_m2.append(_number(m.group(1)) * factor)  # type: ignore[union-attr]
        unit = unit or ("ha" if factor == 1e4 else "km²" if factor == 1e6 else "m²")
    i = _nearest(options_m2, float(area), relative=True)
    if i is None:
        return None
    shown = {"ha": area / 1e4, "km²": area / 1e6}.get(unit, area)
    text = f"{_fmt_num(shown)} {unit}"
    return _result(i, texts, float(area), text, "area", [s.step], f"{_mask_names([s])}{where} measures {text}")


def _distance(texts: list[str], masks: _Masks) -> dict | None:
    pair = masks.pair(both_drawn=True)
    if pair is None:
        return None
    a, b, ma, mb = pair
    d = M.nearest_distance_m(ma, mb, masks.image(a).georef)
    if d is None:
        return None
    values = []
    for t in texts:
        m = _LEN_OPT.match(t)
        u = m.group(2).lower()  # type: ignore[union-attr]
        values.append(_number(m.group(1)) * (1000.0 if u.startswith("k") else 1.0))  # type: ignore[union-attr]
    i = _nearest(values, d, relative=True)
    if i is None:
        return None
    text = f"{_fmt_num(d)} m"
    return _result(i, texts, d, text, "distance", [a.step, b.step],
                   f"{_mask_names([a, b])} are {text} apart at their closest")


def _count(q: str, texts: list[str], values: list[float], masks: _Masks) -> dict | None:
    s = _relevant(masks, q)
    if s is None:
        return None
    cut, where = _restricted(q, s)
    d = s.measurements if cut is None else None
    n = int(d["count"]) if d and isinstance(d.get("count"), int) else M.count_objects(s.mask if cut is None else cut)
    i = _nearest(values, float(n), relative=True)
    if i is None:
        return None
    return _result(i, texts, n, str(n), "count", [s.step],
                   f"{_mask_names([s])}{where} has {n} separate object{'s' if n != 1 else ''}")


def _is_change_label(label: str) -> bool:
    return bool(_CHANGE_GONE.search(label) or _CHANGE_NEW.search(label))


def _time_order(masks: _Masks) -> tuple[int, int]:
    """Indexes of the earliest and the latest image: t0..tN by number, else the request order."""
    def rank(i: int) -> int:
        m = re.fullmatch(r"t(\d+)", masks.images[i].role or "")
        return int(m.group(1)) if m else i

    order = sorted(range(len(masks.images)), key=rank)
    return order[0], order[-1]


def _change(q: str, texts: list[str], values: list[float], masks: _Masks, share: bool) -> dict | None:
    first, last = _time_order(masks)
    plain = [s for s in masks.steps if not _is_change_label(_label(s))]
    before = next((s for s in plain if s.image == first), None)
    after = next((s for s in plain if s.image == last), None)
    if before is None or after is None or before.mask.shape != after.mask.shape:
        return None
    im_b, im_a = masks.image(before), masks.image(after)
    vb, va = _valid(im_b, before.mask.shape), _valid(im_a, after.mask.shape)
    valid = vb & va if vb is not None and va is not None else (vb if vb is not None else va)
    ch = M.change(before.mask, after.mask, im_b.georef, valid)
    gone = bool(_CHANGE_GONE.search(q))
    n, of = (ch.destroyed_count, ch.before_count) if gone else (ch.appeared_count, ch.after_count)
    what = "destroyed" if gone else "new"
    base = f"of the {of} objects {'before' if gone else 'after'}"
    if share:
        if of == 0:
            return None
        value: float = 100.0 * n / of
        i = _nearest(values, value, relative=False)
        text = f"{value:.1f}%"
        say = f"comparing {_mask_names([before, after])}, {n} {base} are {what}: {text}"
        quantity = "change_share"
    else:
        value = n
        i = _nearest(values, float(n), relative=True)
        text = str(n)
        say = f"comparing {_mask_names([before, after])}, {n} object{'s' if n != 1 else ''} {'are' if n != 1 else 'is'} " \
              f"{what}" + (f" ({n} {base})" if gone else "")
        quantity = "change_count"
    if i is None:
        return None
    return _result(i, texts, value, text, quantity, [before.step, after.step], say[0].upper() + say[1:])


def _yes_no(q: str, texts: list[str], masks: _Masks) -> dict | None:
    yes_i = [t.lower() for t in texts].index("yes")

    def pick(flag: bool, value_text: str, quantity: str, used: Sequence[int], say: str) -> dict:
        i = yes_i if flag else 1 - yes_i
        return _result(i, texts, flag, value_text, quantity, used, say)

    if _ADJ.search(q):
        pair = masks.pair(both_drawn=True)
        if pair is None:
            return None
        a, b, ma, mb = pair
        touch = M.adjacent(ma, mb, masks.image(a).georef)
        say = (f"{_mask_names([a, b])} {'touch (at most one pixel apart)' if touch else 'do not touch'}")
        return pick(touch, "touching" if touch else "not touching", "adjacency", [a.step, b.step], say)
    if _MORE_THAN.search(q):
        pair = masks.pair()
        if pair is None:
            return None
        a, b, ma, mb = pair
        (va, ua), (vb, ub) = masks.area(a, ma), masks.area(b, mb)
        if va == vb or ua != ub:
            return None
        return pick(va > vb, "larger" if va > vb else "smaller", "larger", [a.step, b.step],
                    f"{_mask_names([a])} is {'larger' if va > vb else 'smaller'} than {_mask_names([b])}")
    if _EXIST.search(q):
        s = _relevant(masks, q)
        if s is None:
            return None
        d = s.measurements
        px = int(d["area_px"]) if d and isinstance(d.get("area_px"), int) else int(np.count_nonzero(s.mask))
        return pick(px > 0, "present" if px else "absent", "existence", [s.step],
                    f"{_mask_names([s])} is {'not empty' if px else 'empty'}")
    return None


def _larger_half(texts: list[str], halves: list[str], masks: _Masks) -> dict | None:
    cls = set.union(*(_words(_HALF.sub(" ", t)) for t in texts))
    pool = [s for s in masks.steps if _words(_label(s)) & cls] or list(masks.steps)
    image = pool[0].image
    pool = [s for s in pool if s.image == image and s.mask.shape == pool[0].mask.shape]
    union = np.zeros(pool[0].mask.shape, bool)
    for s in pool:
        union |= np.asarray(s.mask, bool)
    if not union.any():
        return None
    measured = [masks.area(pool[0], union & half_mask(union.shape, h)) for h in halves]
    unit = measured[0][1]
    parts = ", ".join(f"{_fmt_area(a, unit)} in the {h}ern half" for (a, _), h in zip(measured, halves))
    return _largest(texts, measured, [s.step for s in pool], f"{_mask_names(pool)} measure {parts}")


def _larger_option(texts: list[str], masks: _Masks) -> dict | None:
    chosen: list[MeasuredStep] = []
    for t in texts:
        want = _words(t)
        scores = [len(want & _words(_label(s))) for s in masks.steps]
        best = max(scores) if scores else 0
        if best == 0 or scores.count(best) > 1:
            return None  # an option without its own mask cannot be measured
        chosen.append(masks.steps[scores.index(best)])
    if len({s.step for s in chosen}) != len(chosen):
        return None
    measured = [masks.area(s) for s in chosen]
    if len({u for _, u in measured}) != 1:
        return None  # m² against pixels: not comparable
    unit = measured[0][1]
    parts = ", ".join(f"{_mask_names([s])} {_fmt_area(a, unit)}" for s, (a, _) in zip(chosen, measured))
    return _largest(texts, measured, [s.step for s in chosen], f"the masks measure {parts}")


def _largest(texts: list[str], measured: list[tuple[float, str]], steps: list[int], message: str) -> dict | None:
    """The option whose measured area is the largest; None on a tie (the masks cannot tell)."""
    areas, unit = [a for a, _ in measured], measured[0][1]
    best = max(areas)
    if areas.count(best) > 1:
        return None
    return _result(areas.index(best), texts, float(best), _fmt_area(best, unit), "larger", steps, message)


# ------------------------------------------------------------------------------------------- checks
def choice_check(model_choice: str | None, measured: dict | None, options: Sequence[str] | None) -> dict | None:
    """A ``checks`` entry (kind "choice") when the model's letter differs from the measured choice, else None."""
    if not measured or not options:
        return None
    letter = measured["choice"]
    if model_choice == letter:
        return None
    texts = _option_texts(options)
    k = LETTERS.find(model_choice) if model_choice and len(model_choice) == 1 else -1
    said = f"the model chose {model_choice} ({texts[k]})" if 0 <= k < len(texts) else "the model chose no option"
    return {"kind": "choice", "stated": model_choice, "measured": letter, "value": measured["value"],
            "value_text": measured["value_text"], "steps": measured["steps"],
            "message": f"{said}, but {measured['message'][0].lower()}{measured['message'][1:]}"}


def span_with_answer(span: str, question: str, options: Sequence[str] | None, steps: Sequence[MeasuredStep],
                     images: Sequence[MeasuredImage]) -> str:
    """``span`` (a ``measure.grounding_text``) with "; measured answer B" before its closing bracket when the
    masks so far (``steps``, this one last) resolve the question; else ``span`` unchanged.

    One rule for both sides: the worker calls it after each mask with the masks drawn so far, the Terra-CoT
    builder with each prefix of a record's ground-truth masks, so training spans read like inference ones."""
    found = measured_choice(question, options, steps, images)
    return span if found is None else prompting.with_measured_answer(span, found["choice"])
