"""A labelled scene: one to several co-registered images on one georeferenced pixel grid.

A scene is what synthesis reasons about. Labels are per frame (a before/after pair has different
buildings in each frame); an optical+SAR pair carries its labels on frame 0. ``vocabulary`` lists the
classes whose labels are complete for this source, so "is there any X?" is only asked about classes
whose absence is known (a building dataset says nothing about water).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.measure import Georef

#: Human names of classes as they appear in questions (singular noun phrase, plural for objects).
CLASS_TEXT: dict[str, tuple[str, str]] = {
    # key: (region phrase, object plural)
    "building": ("buildings", "buildings"),
    "water": ("water", "water bodies"),
    "cloud": ("clouds", "clouds"),
    "developed": ("developed land", "developed areas"),
    "cropland": ("cropland", "fields"),
    "grassland": ("grassland", "grassland patches"),
    "shrubland": ("shrubland", "shrubland patches"),
    "forest": ("forest", "forest patches"),
    "sediment": ("sediment", "sediment deposits"),
    "bare": ("bare soil", "bare patches"),
    "road": ("roads", "roads"),
    "tree": ("trees", "tree clusters"),
}


#: Classes named by a plural noun ("the buildings are"), the others by a mass noun ("the water is").
PLURAL = frozenset({"building", "cloud", "road", "tree"})


def be(cls: str) -> str:
    return "are" if cls in PLURAL else "is"


def region_text(cls: str) -> str:
    return CLASS_TEXT.get(cls, (cls, cls + "s"))[0]


def objects_text(cls: str) -> str:
    return CLASS_TEXT.get(cls, (cls, cls + "s"))[1]


def object_text(cls: str) -> str:
    """One object of the class: "water bodies" -> "water body", "buildings" -> "building"."""
    noun = objects_text(cls)
    if noun.endswith("ies"):
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "sses", "xes")):
        return noun[:-2]
    return noun.removesuffix("s")


@dataclass
class Frame:
    """One image of a scene. ``pixels`` is the 8-bit RGB view; SAR frames also keep ``raw`` dB bands."""

    pixels: np.ndarray  # HxWx3 uint8
    role: str = "optical"  # optical | sar | t0 | t1 | ...
    labels: dict[str, np.ndarray] = field(default_factory=dict)  # class -> bool HxW
    raw: np.ndarray | None = None  # (bands, H, W) float32 backscatter in dB (SAR only)
    band_names: list[str] | None = None
    date: str | None = None

    def copy(self) -> Frame:
        return Frame(self.pixels.copy(), self.role, {k: v.copy() for k, v in self.labels.items()},
                     None if self.raw is None else self.raw.copy(), self.band_names, self.date)


@dataclass
class Scene:
    """A labelled scene. ``block`` is the spatial unit of the train/val split (never split inside)."""

    id: str
    source: str  # e.g. "fair_zanzibar", "sen1floods11", "procedural_landcover"
    block: str
    georef: Georef
    frames: list[Frame]
    valid: np.ndarray  # bool HxW
    vocabulary: tuple[str, ...]
    countable: tuple[str, ...] = ()
    kind: str = "single"  # single | pair (optical+SAR) | change (t0,t1) | series (t0..tn, n >= 2)
    origin: str = "real"  # real | augmented | edited | procedural
    label_status: str = "ground_truth"  # ground_truth | procedural
    sensor: str = ""
    gsd_m: float = 0.0
    parent: str | None = None
    split: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.valid.shape[0]), int(self.valid.shape[1])

    def check(self) -> None:
        """Shapes and dtypes agree; raises ValueError naming the problem (bad scenes never reach export)."""
        h, w = self.shape
        if not self.frames:
            raise ValueError(f"scene {self.id}: no frames")
        for i, f in enumerate(self.frames):
            if f.pixels.shape != (h, w, 3) or f.pixels.dtype != np.uint8:
                raise ValueError(f"scene {self.id} frame {i}: pixels {f.pixels.shape} {f.pixels.dtype}, "
                                 f"expected ({h}, {w}, 3) uint8")
            for cls, m in f.labels.items():
                if m.shape != (h, w) or m.dtype != bool:
                    raise ValueError(f"scene {self.id} frame {i}: label {cls} is {m.shape} {m.dtype}")
            if f.raw is not None and f.raw.shape[1:] != (h, w):
                raise ValueError(f"scene {self.id} frame {i}: raw bands {f.raw.shape} off the grid")
        if self.valid.dtype != bool:
            raise ValueError(f"scene {self.id}: valid mask must be bool")

    def labelled_frames(self) -> list[int]:
        return [i for i, f in enumerate(self.frames) if f.labels]
