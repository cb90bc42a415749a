"""Cross-checks of the figures the model writes against the figures measured on its masks.

The language model states percentages and hectares in its answer; the worker measures every mask from the
mask and the CRS. When a stated figure matches none of the measured ones, the user must be told, and told
which one to trust: the measured figure. Nothing here changes the answer itself.
"""

from __future__ import annotations

import re

_NUMBER = r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"  # 1,280.5 or 1280.5
_PERCENT = re.compile(_NUMBER + r"\s*%")
_HECTARES = re.compile(_NUMBER + r"\s*(?:ha\b|hectares?\b)", re.IGNORECASE)


def answer_checks(answer: str, steps: list[dict], *, pct_tolerance: float = 5.0,
                  ha_tolerance: float = 0.10) -> list[dict]:
    """One entry per percentage or area in ``answer`` that no measured step agrees with.

    ``steps`` are the measured steps of the ``done`` event (``coverage_pct``, ``area_ha``). A percentage agrees
    when it is within ``pct_tolerance`` percentage points of a step's coverage; an area when it is within
    ``ha_tolerance`` (relative) of a step's area. Without measured steps there is nothing to check against.
    """
    checks: list[dict] = []
    for kind, pattern, key, unit in (("percent", _PERCENT, "coverage_pct", "%"),
                                     ("area", _HECTARES, "area_ha", " ha")):
        measured = [(i, float(s[key])) for i, s in enumerate(steps) if isinstance(s.get(key), (int, float))]
        if not measured:
            continue
        for match in pattern.finditer(answer or ""):
            stated = float(match.group(1).replace(",", ""))
            if any(_agrees(kind, stated, value, pct_tolerance, ha_tolerance) for _, value in measured):
                continue
            step, value = min(measured, key=lambda m: abs(m[1] - stated))
            checks.append({
                "kind": kind, "stated": stated, "measured": round(value, 4), "step": steps[step].get("step", step),
                "message": f"the answer says {match.group(0).strip()}, but mask {steps[step].get('step', step) + 1} "
                           f"measures {value:.2f}{unit}; the measured figure is computed from the mask and the CRS",
            })
    return checks


def _agrees(kind: str, stated: float, measured: float, pct_tolerance: float, ha_tolerance: float) -> bool:
    if kind == "percent":
        return abs(stated - measured) <= pct_tolerance
    return abs(stated - measured) <= ha_tolerance * max(abs(measured), 1e-9)
