"""How numbers are written in answers and options, and how multiple-choice distractors are drawn.

One formatter per quantity, used by synthesis, the bench and the tests: an answer is "correct" when
the value recomputed from its mask formats to the same text. Distractors are at least ``MIN_GAP``
(15 %) apart from the answer and from each other, measured on the values as displayed.
"""

from __future__ import annotations

import math
import re

import numpy as np

MIN_GAP = 0.15
LETTERS = "ABCD"
#: Square metres in one unit of the area units answers and measurement spans are written in.
AREA_M2 = {"ha": 1e4, "m²": 1.0, "km²": 1e6}


def sig(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` significant digits (0 stays 0)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _plain(x: float) -> str:
    """Shortest plain decimal text of an already-rounded number (no exponent, no thousands separator)."""
    text = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def fmt_pct(p: float) -> str:
    return f"{p:.1f}%"


def area_unit(area_m2: float) -> str:
    """Hectares from 0.01 ha (100 m²) up, as the worker's measurement span writes them; m² below."""
    return "ha" if area_m2 >= 100.0 else "m²"


def fmt_area(area_m2: float, unit: str | None = None) -> str:
    unit = unit or area_unit(area_m2)
    if unit == "ha":
        return f"{_plain(sig(area_m2 / 1e4))} ha"
    if unit == "m²":
        return f"{_plain(sig(area_m2))} m²"
    raise ValueError(f"unknown area unit {unit!r}")


def area_formatter(area_m2: float):
    """A formatter fixed to the answer's unit, so distractors never switch between m² and ha."""
    unit = area_unit(area_m2)
    return lambda v: fmt_area(v, unit)


def fmt_distance(d_m: float) -> str:
    return f"{_plain(sig(d_m))} m"


def fmt_count(n: int) -> str:
    return str(int(n))


_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def parse_number(text: str) -> float:
    """The first number in an answer text ("12.3 ha" -> 12.3); ValueError if there is none."""
    m = _NUM.search(text.replace(",", ""))
    if not m:
        raise ValueError(f"no number in {text!r}")
    return float(m.group(0))


def rel_gap(a: float, b: float) -> float:
    """|a - b| relative to the larger magnitude; 0 when both are 0."""
    big = max(abs(a), abs(b))
    return 0.0 if big == 0 else abs(a - b) / big


def well_separated(values: list[float], min_gap: float = MIN_GAP) -> bool:
    return all(rel_gap(a, b) >= min_gap for i, a in enumerate(values) for b in values[i + 1:])


#: Relative factors distractors are drawn from: none is closer than 20 % to 1 or to another factor.
_FACTORS = (0.3, 0.45, 0.6, 0.75, 1.3, 1.6, 2.0, 2.5, 3.2)
#: Tried after the shuffled ones, for values shown with few digits (0.1 %, 2 m²) where small factors collide.
_MORE_FACTORS = (4.0, 5.0, 6.5, 8.0, 10.0, 0.2, 0.1)


def numeric_distractors(value: float, fmt, rng: np.random.Generator, n: int = 3, upper: float | None = None,
                        integer: bool = False, min_gap: float = MIN_GAP) -> list[str]:
    """``n`` distractor texts for ``value`` (formatted with ``fmt``), all >= ``min_gap`` apart as displayed.

    ``upper`` caps values (100 for percentages); ``integer`` draws whole numbers (counts).
    """
    answer_text = fmt(value)
    shown = [parse_number(answer_text)]
    out: list[str] = []
    factors = list(_FACTORS)
    rng.shuffle(factors)
    candidates: list[float] = []
    base = value if shown[0] != 0 else 0.0  # a value displayed as 0 gets the distractors of 0
    if not integer and value > 0 and shown[0] > 0:
        # scale from the value as displayed (0.0625 % shows as 0.1 %), in the value's own unit (m² for "ha")
        unit = 10.0 ** round(math.log10(value / shown[0]))
        base = shown[0] * unit
    if base == 0:
        candidates = [1, 2, 3, 5, 8] if integer else [sig(x) for x in (0.5, 1.0, 2.0, 4.0, 8.0)]
    else:
        candidates = [base * f for f in factors] + [base * f for f in _MORE_FACTORS]
    if integer:
        base = round(value)
        extra = [base + d for d in (-3, -2, -1, 1, 2, 3, 4, 6)]
        candidates = [float(round(c)) for c in candidates] + [float(c) for c in extra]
        rng.shuffle(candidates)
    for c in candidates:
        if c < 0 or (upper is not None and c > upper) or (integer and c != int(c)):
            continue
        text = fmt(int(c) if integer else c)
        num = parse_number(text)
        if num < 0 or (upper is not None and num > upper):
            continue
        if all(rel_gap(num, s) >= min_gap for s in shown):
            shown.append(num)
            out.append(text)
            if len(out) == n:
                return out
    raise ValueError(f"cannot draw {n} distractors >= {min_gap:.0%} apart for {answer_text}")


def shuffle_options(answer: str, distractors: list[str], rng: np.random.Generator) -> tuple[list[str], str]:
    """Options "A. ...", ... in a seeded random order, and the letter of the answer."""
    texts = [answer, *distractors]
    if len(set(texts)) != len(texts):
        raise ValueError(f"duplicate options {texts}")
    order = rng.permutation(len(texts))
    options = [f"{LETTERS[i]}. {texts[j]}" for i, j in enumerate(order)]
    letter = LETTERS[int(np.flatnonzero(order == 0)[0])]
    return options, letter


def option_text(option: str) -> str:
    """"B. 12.3 ha" -> "12.3 ha"."""
    m = re.match(r"^\s*[A-D]\.\s*(.*)$", option, flags=re.DOTALL)
    return m.group(1) if m else option
