"""Answer formatting and multiple-choice distractors (>= 15 % apart, answer present exactly once)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import numbers as N


def _check(answer: str, distractors: list[str], options: list[str], letter: str) -> None:
    texts = [N.option_text(o) for o in options]
    assert texts.count(answer) == 1 and texts[N.LETTERS.index(letter)] == answer
    assert [o[0] for o in options] == list(N.LETTERS[: len(options)])
    assert N.well_separated([N.parse_number(t) for t in texts])
    assert set(distractors) == set(texts) - {answer}


@settings(max_examples=150, deadline=None)
@given(st.floats(0.0, 100.0), st.integers(0, 2**31 - 1))
def test_percent_distractors(p: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ans = N.fmt_pct(p)
    d = N.numeric_distractors(p, N.fmt_pct, rng, upper=100.0)
    assert all(0.0 <= N.parse_number(x) <= 100.0 for x in d)
    _check(ans, d, *N.shuffle_options(ans, d, rng))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 500), st.integers(0, 2**31 - 1))
def test_count_distractors(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = N.numeric_distractors(n, N.fmt_count, rng, integer=True)
    assert all(float(x).is_integer() and int(x) >= 0 for x in d)
    _check(str(n), d, *N.shuffle_options(str(n), d, rng))


@settings(max_examples=150, deadline=None)
@given(st.floats(1.0, 5e7), st.integers(0, 2**31 - 1))
def test_area_and_distance_distractors_keep_the_unit(v: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    fmt = N.area_formatter(v)
    unit = fmt(v).split()[-1]
    d = N.numeric_distractors(v, fmt, rng)
    assert all(x.endswith(unit) for x in d)
    shown = N.parse_number(fmt(v))
    assert all(0.05 * shown <= N.parse_number(x) <= 11 * shown for x in d), (fmt(v), d)  # same magnitude
    _check(fmt(v), d, *N.shuffle_options(fmt(v), d, rng))
    dd = N.numeric_distractors(v, N.fmt_distance, rng)
    _check(N.fmt_distance(v), dd, *N.shuffle_options(N.fmt_distance(v), dd, rng))


def test_shuffle_is_seeded_and_spreads_the_answer() -> None:
    letters = [N.shuffle_options("1", ["2", "4", "8"], np.random.default_rng(s))[1] for s in range(200)]
    assert set(letters) == set("ABCD") and max(letters.count(x) for x in "ABCD") < 80
    assert N.shuffle_options("1", ["2", "4", "8"], np.random.default_rng(7)) == \
        N.shuffle_options("1", ["2", "4", "8"], np.random.default_rng(7))


@pytest.mark.parametrize(("value", "text"), [(1234.5, "0.123 ha"), (56.78, "56.8 m²"), (1.2e6, "120 ha"),
                                             (99.96, "100 m²"), (100.0, "0.01 ha")])
def test_area_format(value: float, text: str) -> None:
    assert N.fmt_area(value) == text


def test_duplicate_options_and_impossible_distractors_are_errors() -> None:
    with pytest.raises(ValueError):
        N.shuffle_options("5", ["5", "6", "9"], np.random.default_rng(0))
    with pytest.raises(ValueError):
        N.numeric_distractors(100.0, N.fmt_pct, np.random.default_rng(0), upper=100.0, n=9)
