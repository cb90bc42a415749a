"""Procedurally generated multi-class scenes, for classes and relations the real samples lack.

Two generators, both with a real projected CRS (UTM) so every measurement is in true metres:
* ``landcover``: 10 m pixels; water (lake or river), forest (often along the water), cropland parcels,
  grassland, a developed patch and bare soil;
* ``settlement``: 0.5 m pixels; buildings with shaded roofs and shadows, roads, tree crowns, a pond.
Labels are exact by construction (``label_status = "procedural"``); these scenes are used for training
only, never in the validation bench.
"""

from __future__ import annotations

import numpy as np
from pyproj import CRS
from scipy import ndimage

from model.data.scene import Frame, Scene
from worker.measure import Georef

LANDCOVER = ("water", "forest", "cropland", "grassland", "developed", "bare")
SETTLEMENT = ("building", "road", "tree", "water")


def _field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-9)


def _utm_georef(rng: np.random.Generator, gsd: float) -> Georef:
    zone = int(rng.integers(29, 38))
    north = bool(rng.random() < 0.7)
    epsg = (32600 if north else 32700) + zone
    x0 = float(rng.uniform(300_000, 700_000))
    y0 = float(rng.uniform(1_000_000, 6_000_000) if north else rng.uniform(4_000_000, 9_000_000))
    return Georef((gsd, 0.0, round(x0), 0.0, -gsd, round(y0)), CRS.from_epsg(epsg).to_wkt())


def _texture(rng: np.random.Generator, shape: tuple[int, int], base: tuple[int, int, int], amp: float,
             sigma: float) -> np.ndarray:
    n = _field(rng, shape, sigma)[..., None] * amp + rng.normal(0, amp * 0.35, size=(*shape, 1))
    tint = rng.normal(0, 4, size=3)
    return np.asarray(base, np.float32) + tint + n


def _river(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    m = np.zeros(shape, bool)
    horizontal = rng.random() < 0.5
    n = w if horizontal else h
    pos = rng.uniform(0.25, 0.75) * (h if horizontal else w)
    width = rng.uniform(2.5, 6.0)
    slope = 0.0
    for i in range(n):
        slope = np.clip(slope + rng.normal(0, 0.08), -0.8, 0.8)
        pos = np.clip(pos + slope, 5, (h if horizontal else w) - 6)
        lo, hi = int(pos - width), int(pos + width) + 1
        if horizontal:
            m[max(lo, 0):hi, i] = True
        else:
            m[i, max(lo, 0):hi] = True
    return m


def landcover(rng: np.random.Generator, idx: int, size: int = 256) -> Scene:
    shape = (size, size)
    cls = np.full(shape, 3, np.uint8)  # grassland
    crop_zone = _field(rng, shape, 30) > rng.uniform(-0.3, 0.6)
    ph, pw = int(rng.integers(10, 22)), int(rng.integers(12, 30))
    parcel = (np.arange(size)[:, None] // ph) * 3 + (np.arange(size)[None] // pw) * 7
    cls[crop_zone] = 2
    forest = _field(rng, shape, 14) > rng.uniform(0.4, 1.1)
    cls[forest] = 1
    water = _river(rng, shape) if rng.random() < 0.5 else _field(rng, shape, 20) > rng.uniform(1.3, 1.9)
    if rng.random() < 0.6 and water.any():  # forest next to water: a riparian belt
        ring = ndimage.binary_dilation(water, iterations=int(rng.integers(3, 9))) & ~water
        belt = ring & (_field(rng, shape, 10) > -0.3)
        cls[belt] = 1
    if rng.random() < 0.7:
        town = _field(rng, shape, 12) > rng.uniform(1.4, 2.0)
        cls[town & ~water] = 4
    bare = _field(rng, shape, 6) > rng.uniform(2.0, 2.6)
    cls[bare & (cls == 3)] = 5
    cls[water] = 0
    labels = {name: cls == i for i, name in enumerate(LANDCOVER)}
    img = np.zeros((*shape, 3), np.float32)
    img[labels["water"]] = _texture(rng, shape, (35, 62, 88), 4, 6)[labels["water"]]
    img[labels["forest"]] = _texture(rng, shape, (38, 72, 40), 14, 0.8)[labels["forest"]]
    img[labels["grassland"]] = _texture(rng, shape, (112, 140, 82), 9, 4)[labels["grassland"]]
    img[labels["bare"]] = _texture(rng, shape, (172, 152, 122), 10, 3)[labels["bare"]]
    dev = _texture(rng, shape, (150, 148, 145), 22, 0.6)
    streets = ((np.arange(size)[:, None] % int(rng.integers(6, 11))) == 0) | \
        ((np.arange(size)[None] % int(rng.integers(6, 11))) == 0)
    dev[streets] -= 35
    img[labels["developed"]] = dev[labels["developed"]]
    palette = np.array([(150, 140, 80), (110, 140, 60), (175, 155, 110), (92, 122, 52), (135, 120, 70)], np.float32)
    colours = palette[(parcel + int(rng.integers(1000))) % len(palette)]
    stripes = (np.sin(np.arange(size)[None] * rng.uniform(0.8, 1.6)) * 6)[..., None]
    cropimg = colours + stripes + rng.normal(0, 4, size=(*shape, 3))
    img[labels["cropland"]] = cropimg[labels["cropland"]]
    img = ndimage.gaussian_filter(img, sigma=(0.6, 0.6, 0))
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    georef = _utm_georef(rng, 10.0)
    return Scene(
        id=f"procedural_landcover_{idx:05d}", source="procedural_landcover", block=f"procedural_landcover_{idx:05d}",
        georef=georef, frames=[Frame(pixels, "optical", labels)], valid=np.ones(shape, bool), vocabulary=LANDCOVER,
        countable=("water",), origin="procedural", label_status="procedural", sensor="synthetic 10 m optical",
        gsd_m=10.0,
    )


def _rect(mask: np.ndarray, r: int, c: int, h: int, w: int) -> None:
    mask[max(r, 0):r + h, max(c, 0):c + w] = True


def settlement(rng: np.random.Generator, idx: int, size: int = 256) -> Scene:
    shape = (size, size)
    road = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 3))):
        width = int(rng.integers(7, 13))
        p = int(rng.integers(30, size - 30))
        if rng.random() < 0.5:
            road[p:p + width] = True
        else:
            road[:, p:p + width] = True
    water = np.zeros(shape, bool)
    if rng.random() < 0.4:
        yy, xx = np.mgrid[:size, :size]
        cy, cx, ry, rx = rng.uniform(30, size - 30), rng.uniform(30, size - 30), rng.uniform(10, 25), rng.uniform(10, 25)
        water = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1) & ~road
    building = np.zeros(shape, bool)
    occupied = ndimage.binary_dilation(road | water, iterations=4)
    roofs = []
    for _ in range(int(rng.integers(4, 16))):
        h, w = int(rng.integers(12, 34)), int(rng.integers(12, 34))
        r, c = int(rng.integers(2, size - h - 2)), int(rng.integers(2, size - w - 2))
        if occupied[r - 2:r + h + 2, c - 2:c + w + 2].any():
            continue
        _rect(building, r, c, h, w)
        occupied[r - 3:r + h + 3, c - 3:c + w + 3] = True
        roofs.append((r, c, h, w))
    tree = np.zeros(shape, bool)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(int(rng.integers(3, 25))):
        cy, cx, rad = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 11)
        tree |= (yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2
    tree &= ~(building | road | water)
    ground = _texture(rng, shape, tuple(rng.choice([(150, 135, 105), (120, 132, 88), (165, 150, 125)])), 10, 3)
    img = ground.copy()
    img[road] = _texture(rng, shape, (95, 95, 98), 5, 2)[road]
    img[water] = _texture(rng, shape, (40, 70, 85), 3, 5)[water]
    shadow = np.zeros(shape, bool)
    roof_palette = [(185, 185, 190), (160, 80, 60), (120, 125, 130), (205, 195, 170), (90, 110, 140)]
    for r, c, h, w in roofs:
        col = np.asarray(roof_palette[int(rng.integers(len(roof_palette)))], np.float32) + rng.normal(0, 6, 3)
        img[r:r + h, c:c + w] = col
        img[r:r + h, c + w // 2:c + w] *= 0.85  # two roof planes
        s = np.zeros(shape, bool)
        _rect(s, r + 3, c + 3, h, w)
        shadow |= s & ~building
    img[shadow & ~road & ~water] *= 0.6
    crowns = _texture(rng, shape, (45, 85, 42), 16, 0.9)
    img[tree] = crowns[tree]
    img = ndimage.gaussian_filter(img, sigma=(0.5, 0.5, 0)) + rng.normal(0, 2.5, size=img.shape)
    labels = {"building": building, "road": road, "tree": tree, "water": water}
    return Scene(
        id=f"procedural_settlement_{idx:05d}", source="procedural_settlement",
        block=f"procedural_settlement_{idx:05d}", georef=_utm_georef(rng, 0.5),
        frames=[Frame(np.clip(img, 0, 255).astype(np.uint8), "optical", labels)], valid=np.ones(shape, bool),
        vocabulary=SETTLEMENT, countable=("building", "water"), origin="procedural", label_status="procedural",
        sensor="synthetic 0.5 m aerial", gsd_m=0.5,
    )
