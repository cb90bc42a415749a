"""Augmentation keeps a true georeferencing; object removal changes exactly what it says."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from conftest import DATA, FAIR

from model.data import augment as A
from model.data import sources
from model.data.facts import location_phrase
from worker import measure as M


@pytest.fixture(scope="module")
def tile():
    name, xyz = FAIR[0]
    return sources.fair_tile(DATA / f"fair_zanzibar/{name}.tif", DATA / f"fair_zanzibar/{name}.mask.tif",
                             "zanzibar", xyz, 0.3)


def _ground(scene) -> shapely.Geometry:
    return shapely.union_all(M.mask_polygons(scene.frames[0].labels["building"], scene.georef))


@pytest.mark.parametrize("op", ["fliph", "flipv", "rot1", "rot2", "rot3", "crop", "half"])
def test_geometric_augmentation_keeps_buildings_on_the_same_ground(tile, op: str) -> None:
    if op.startswith("flip"):
        aug = A.flip(tile, op[-1])
    elif op.startswith("rot"):
        aug = A.rot90(tile, int(op[-1]))
    elif op == "crop":
        aug = A.crop(tile, 0, 0, 256, 256)
    else:
        aug = A.downsample2(tile)
    assert aug.block == tile.block and aug.parent == tile.id
    before, after = _ground(tile), _ground(aug)
    # same polygons in the CRS (exactly for pixel permutations, up to the coarser pixels when halved)
    tol = 0.03 if op == "half" else 1e-9
    assert abs(after.area - before.area) <= tol * before.area
    assert after.symmetric_difference(before).area <= (0.25 if op == "half" else 1e-9) * before.area
    m0 = M.measure_mask(tile.frames[0].labels["building"], tile.georef)
    m1 = M.measure_mask(aug.frames[0].labels["building"], aug.georef)
    assert m1.area_m2 == pytest.approx(m0.area_m2, rel=tol if op == "half" else 1e-9)


def test_pixels_follow_the_affine(tile) -> None:
    """Pixel (r, c) of a rotated tile shows the ground its affine says: compare with the parent's pixel."""
    aug = A.rot90(tile, 1)
    inv = ~tile.georef.transform
    for r, c in [(0, 0), (10, 200), (255, 3), (128, 64)]:
        x, y = aug.georef.transform @ (c + 0.5, r + 0.5)
        pc, pr = inv @ (x, y)
        assert np.array_equal(aug.frames[0].pixels[r, c], tile.frames[0].pixels[int(pr), int(pc)])


def test_change_pair_removes_exactly_the_chosen_objects(tile) -> None:
    rng = np.random.default_rng(3)
    pair = A.change_pair(tile, "building", rng, destroyed=True)
    assert pair is not None and pair.kind == "change" and [f.role for f in pair.frames] == ["t0", "t1"]
    before, after = pair.frames[0].labels["building"], pair.frames[1].labels["building"]
    ch = M.change(before, after, pair.georef)
    removed = M.count_objects(before) - M.count_objects(after)
    assert removed >= 1 and ch.destroyed_count == ch.disappeared_count == removed and ch.appeared_count == 0
    # pixels outside the filled holes are the original tile's, inside they changed
    hole = before & ~after
    grown = __import__("scipy").ndimage.binary_dilation(hole, iterations=3)
    assert np.array_equal(pair.frames[1].pixels[~grown], tile.frames[0].pixels[~grown])
    assert np.abs(pair.frames[1].pixels[hole].astype(int) - tile.frames[0].pixels[hole].astype(int)).mean() > 3


def test_series_adds_objects_stage_by_stage(tile) -> None:
    ser = A.series(tile, "building", np.random.default_rng(5), n_frames=4)
    assert ser is not None and [f.role for f in ser.frames] == ["t0", "t1", "t2", "t3"]
    counts = [M.count_objects(f.labels["building"]) for f in ser.frames]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert np.array_equal(ser.frames[-1].labels["building"], tile.frames[0].labels["building"])


def test_inpaint_only_touches_the_hole() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(60, 90, size=(64, 64, 3)).astype(np.uint8)
    img[20:30, 20:30] = 250  # a bright roof
    hole = np.zeros((64, 64), bool)
    hole[18:32, 18:32] = True
    out = A.inpaint(img, hole, np.zeros_like(hole), rng)
    assert np.array_equal(out[~hole], img[~hole])
    assert out[hole].mean() < 120  # filled from the dark ground around it, not the roof


@pytest.mark.parametrize(("cells", "expected"), [
    ([(0, 0)], "in the north-western part"), ([(2, 1)], "in the southern part"), ([(1, 1)], "in the centre"),
    ([(0, 0), (0, 2)], "in the northern half"), ([(0, 0), (2, 2)], "scattered across the image"),
])
def test_location_phrase(cells: list[tuple[int, int]], expected: str) -> None:
    m = np.zeros((90, 90), bool)
    for r, c in cells:
        m[r * 30 + 5:r * 30 + 25, c * 30 + 5:c * 30 + 25] = True
    assert location_phrase(m) == expected
    assert location_phrase(np.ones((9, 9), bool)) == "across most of the image"
