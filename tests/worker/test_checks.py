"""The answer's stated figures against the measured ones (worker/checks.py)."""

from __future__ import annotations

from worker.checks import answer_checks

STEPS = [{"step": 0, "coverage_pct": 62.2, "area_ha": 1280.03}, {"step": 1, "coverage_pct": 10.0, "area_ha": 5.0}]


def test_a_percentage_no_mask_measures_is_flagged_against_the_nearest() -> None:
    (check,) = answer_checks("45.9%", STEPS)
    assert check["kind"] == "percent" and check["stated"] == 45.9 and check["measured"] == 62.2
    assert check["step"] == 0 and "mask 1 measures 62.20%" in check["message"]


def test_figures_within_tolerance_pass() -> None:
    assert answer_checks("About 60% is water; the rest, 11 %, is built.", STEPS) == []
    assert answer_checks("1,250 hectares", STEPS) == [] and answer_checks("1250.5 ha", STEPS) == []
    (check,) = answer_checks("2,800 ha", STEPS)
    assert check["stated"] == 2800.0
    assert answer_checks("5.4 ha of buildings", STEPS) == []


def test_areas_are_checked_relative_and_other_numbers_ignored() -> None:
    (check,) = answer_checks("The water covers 900 ha in 3 ponds (option B2).", STEPS)
    assert check["kind"] == "area" and check["stated"] == 900.0 and check["measured"] == 1280.03
    assert answer_checks("There are 43 buildings.", STEPS) == []


def test_nothing_to_check_without_measurements() -> None:
    assert answer_checks("45.9%", []) == []
    assert answer_checks("45.9%", [{"step": 0, "note": "measurement unavailable"}]) == []
