"""Spatially separated train/validation splits: whole blocks go to one split, never pixels of one tile.

Within each source family, blocks are drawn (seeded) into validation until about ``val_fraction`` of
that family's tiles are held back, keeping at least one block on each side whenever the family has
two or more blocks. Derived scenes (flips, crops, edits) inherit their parent's block, hence its split.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import shapely

from model.data.scene import Scene
from worker.measure import Georef


def family(scene: Scene) -> str:
    return scene.source


def assign_splits(scenes: list[Scene], val_fraction: float = 0.25, seed: int = 0) -> dict[str, str]:
    """block -> "train" | "val"; also sets ``scene.split`` on every scene given."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    tiles: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in scenes:
        tiles[family(s)][s.block] += 1
    split: dict[str, str] = {}
    for fam in sorted(tiles):
        blocks = sorted(tiles[fam])
        total = sum(tiles[fam].values())
        order = [blocks[i] for i in rng.permutation(len(blocks))]
        target = val_fraction * total
        held: list[str] = []
        for b in order:
            if len(held) < len(blocks) - 1 and sum(tiles[fam][x] for x in held) + tiles[fam][b] <= 1.3 * target:
                held.append(b)
            if sum(tiles[fam][x] for x in held) >= target:
                break
        if not held and len(blocks) >= 2:  # every block is bigger than the target: hold back the smallest
            held = [min(order, key=lambda x: tiles[fam][x])]
        for b in blocks:
            split[b] = "val" if b in held else "train"
    for s in scenes:
        s.split = split[s.block]
    return split


def footprint_lonlat(georef: Georef, shape: tuple[int, int]) -> shapely.Polygon:
    """The tile's outline in lon/lat (EPSG:4326), from its four pixel-grid corners."""
    from pyproj import CRS, Transformer

    h, w = shape
    t = georef.transform
    corners = [t @ (0, 0), t @ (w, 0), t @ (w, h), t @ (0, h)]
    if georef.crs_wkt is None:
        raise ValueError("a tile without a CRS has no footprint")
    tr = Transformer.from_crs(CRS.from_user_input(georef.crs_wkt), CRS.from_epsg(4326), always_xy=True)
    xs, ys = tr.transform([c[0] for c in corners], [c[1] for c in corners])
    return shapely.Polygon(list(zip(xs, ys)))


def overlapping_pairs(train: list[tuple[str, shapely.Polygon]], val: list[tuple[str, shapely.Polygon]],
                      tol: float = 1e-6) -> list[tuple[str, str, float]]:
    """(train id, val id, overlap fraction of the smaller tile) for every pair sharing ground.

    ``tol`` is the overlap fraction treated as a shared edge (reprojection rounding), not shared ground.
    """
    tree = shapely.STRtree([p for _, p in train])
    out = []
    for vid, vp in val:
        for i in tree.query(vp, predicate="intersects"):
            tid, tp = train[int(i)]
            inter = tp.intersection(vp).area
            frac = inter / max(min(tp.area, vp.area), 1e-30)
            if frac > tol:
                out.append((tid, vid, float(frac)))
    return out
