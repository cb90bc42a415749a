"""Measured facts about a scene, all from ground-truth masks + georeferencing via ``worker.measure``.

Cached per scene so that a dozen questions about one tile polygonise each mask once. The location
phrase is the one rule of our own (a 3 x 3 grid read with north at the top of the image, as the model
sees it); it is deterministic and re-derivable from the mask.
"""

from __future__ import annotations

import numpy as np

from model.data.scene import Scene
from worker import measure as M

_ROWS = ("north", "", "south")
_COLS = ("west", "", "east")


def cell_name(r: int, c: int) -> str:
    row, col = _ROWS[r], _COLS[c]
    if row and col:
        return f"{row}-{col}ern part"
    if row or col:
        return f"{row or col}ern part"
    return "centre"


def location_phrase(mask: np.ndarray) -> str:
    """Where a mask lies: "in the north-western part", "in the southern half", "scattered across the image".

    Rule (north = top row of pixels): more than 60 % of the image -> "across most of the image"; else the
    3 x 3 cell holding more than half of the mask; else the half holding >= 75 %; else "scattered across the image".
    """
    m = np.asarray(mask, bool)
    total = int(m.sum())
    if total == 0:
        return "nowhere (absent)"
    if total > 0.6 * m.size:
        return "across most of the image"
    h, w = m.shape
    rb = [0, h // 3, 2 * h // 3, h]
    cb = [0, w // 3, 2 * w // 3, w]
    shares = np.array([[m[rb[r]:rb[r + 1], cb[c]:cb[c + 1]].sum() for c in range(3)] for r in range(3)]) / total
    r, c = np.unravel_index(int(np.argmax(shares)), shares.shape)
    if shares[r, c] > 0.5:
        name = cell_name(int(r), int(c))
        return "in the centre" if name == "centre" else f"in the {name}"
    halves = {
        "northern half": m[: h // 2].sum(), "southern half": m[h - h // 2:].sum(),
        "western half": m[:, : w // 2].sum(), "eastern half": m[:, w - w // 2:].sum(),
    }
    name, val = max(halves.items(), key=lambda kv: kv[1])
    if val >= 0.75 * total:
        return f"in the {name}"
    return "scattered across the image"




class Facts:
    """Measurement cache for one scene (masks are keyed by identity of (frame, name))."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self.georef = scene.georef
        self.valid = scene.valid
        self._meas: dict[tuple[int, str], M.MaskMeasurements] = {}
        self._extra: dict[tuple[int, str], np.ndarray] = {}

    def mask(self, frame: int, name: str) -> np.ndarray:
        if (frame, name) in self._extra:
            return self._extra[(frame, name)]
        return self.scene.frames[frame].labels[name]

    def add(self, frame: int, name: str, mask: np.ndarray) -> str:
        """Register a derived mask (e.g. "building@north") and return its name."""
        self._extra[(frame, name)] = np.asarray(mask, bool)
        self._meas.pop((frame, name), None)
        return name

    def measure(self, frame: int, name: str) -> M.MaskMeasurements:
        key = (frame, name)
        if key not in self._meas:
            self._meas[key] = M.measure_mask(self.mask(frame, name), self.georef, self.valid)
        return self._meas[key]

    def grounding(self, frame: int, name: str) -> str:
        """The span the worker injects after this mask when measurement grounding is on."""
        return M.grounding_text(self.measure(frame, name))

    def present(self, frame: int, name: str) -> bool:
        return self.measure(frame, name).area_px > 0

    def distance_m(self, frame: int, a: str, b: str) -> float | None:
        return M.nearest_distance_m(self.mask(frame, a), self.mask(frame, b), self.georef)

    def gap_px(self, frame: int, a: str, b: str) -> float | None:
        return M.nearest_distance_px(self.mask(frame, a), self.mask(frame, b))

    def adjacent(self, frame: int, a: str, b: str) -> bool:
        return M.adjacent(self.mask(frame, a), self.mask(frame, b), self.georef)

    def classes(self, frame: int) -> list[str]:
        return sorted(self.scene.frames[frame].labels)
