"""Counts, adjacency, change and real labelled samples, against independently known values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Geod, Proj, Transformer
from shapely.geometry import shape

from worker.measure import (
    Georef,
    RasterError,
    adjacent,
    change,
    count_objects,
    mask_polygons,
    measure_file,
    measure_mask,
    object_polygons,
)

GEOD = Geod(ellps="WGS84")
ATL = "tests/data/spacenet_atlanta"
UTM = Georef(Affine(1.0, 0, 500_000, 0, -1.0, 4_000_000), CRS.from_epsg(32633).to_wkt())


def _pair(gap: int, diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4 blocks with ``gap`` empty pixels between them (side by side, or corner to corner)."""
    a = np.zeros((20, 30), bool)
    b = np.zeros_like(a)
    a[5:9, 5:9] = True
    if diagonal:
        b[9 + gap : 13 + gap, 9 + gap : 13 + gap] = True
    else:
        b[5:9, 9 + gap : 13 + gap] = True
    return a, b


@pytest.mark.parametrize(
    "gap,diagonal,tol,expected",
    [
        (0, False, 1, True),  # shared edge
        (0, True, 1, True),  # shared corner
        (1, False, 1, True),  # one empty pixel between: within one pixel
        (2, False, 1, False),
        (1, True, 1, True),
        (2, True, 1, False),
        (0, False, 0, True),
        (1, False, 0, False),
        (3, False, 3, True),
        (4, False, 3, False),
    ],
)
def test_adjacency_true_and_false_where_expected(gap, diagonal, tol, expected):
    a, b = _pair(gap, diagonal)
    assert adjacent(a, b, UTM, tolerance_px=tol) is expected
    assert adjacent(b, a, UTM, tolerance_px=tol) is expected  # symmetric


def test_adjacency_overlap_empty_and_shape_errors():
    a, _ = _pair(0)
    assert adjacent(a, a) is True
    assert adjacent(a, np.zeros_like(a)) is False
    with pytest.raises(RasterError) as err:
        adjacent(a, np.zeros((3, 3), bool))
    assert err.value.code == "shape_mismatch"


def test_counts_are_exact_for_placed_objects():
    rng = np.random.default_rng(7)
    mask = np.zeros((300, 300), bool)
    placed = 0
    for r in range(0, 300, 20):
        for c in range(0, 300, 20):
            if rng.random() < 0.6:  # random subset of a grid of separated rectangles of random size
                h, w = rng.integers(1, 15, size=2)
                mask[r : r + h, c : c + w] = True
                placed += 1
    assert count_objects(mask) == placed
    m = measure_mask(mask, UTM)
    assert m.count == placed and len(object_polygons(mask, UTM)) == placed
    assert m.area_px == int(mask.sum())
    # pixels touching only at a corner are one object; their polygons stay valid (two pieces)
    diag = np.zeros((6, 6), bool)
    diag[1, 1] = diag[2, 2] = diag[3, 3] = True
    assert count_objects(diag) == 1
    assert len(mask_polygons(diag, UTM)) == 3
    (obj,) = object_polygons(diag, UTM)
    assert obj.is_valid and obj.geom_type == "MultiPolygon" and len(obj.geoms) == 3


def test_change_counts_and_areas_for_a_known_scene():
    before = np.zeros((100, 100), bool)
    after = np.zeros_like(before)
    blocks = {"kept1": (5, 5), "kept2": (5, 30), "gone1": (30, 5), "gone2": (30, 30), "shrunk": (55, 5)}
    for r, c in blocks.values():
        before[r : r + 10, c : c + 10] = True
    for name in ("kept1", "kept2"):
        r, c = blocks[name]
        after[r : r + 10, c : c + 10] = True
    r, c = blocks["shrunk"]
    after[r : r + 3, c : c + 10] = True  # 30 % of it left
    for r, c in ((80, 80), (80, 50), (55, 60)):  # three new buildings
        after[r : r + 5, c : c + 5] = True
    ch = change(before, after, UTM)
    assert (ch.before_count, ch.after_count) == (5, 6)
    assert ch.appeared_count == 3 and ch.disappeared_count == 2 and ch.persisted_count == 3
    assert ch.destroyed_count == 3  # two gone + the one with 30 % left
    assert (ch.appeared_px, ch.disappeared_px, ch.persisted_px) == (75, 270, 230)
    # one 1 m UTM pixel on the ground = 1 / areal scale m² (pyproj's own scale factor, not our code)
    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(500_050, 3_999_950)
    px_m2 = 1.0 / Proj("EPSG:32633").get_factors(lon, lat).areal_scale
    assert ch.appeared_ha == pytest.approx(75 * px_m2 / 1e4, rel=1e-4)
    assert ch.disappeared_ha == pytest.approx(270 * px_m2 / 1e4, rel=1e-4)
    assert ch.persisted_ha == pytest.approx(230 * px_m2 / 1e4, rel=1e-4)
    assert ch.net_change_ha == pytest.approx((75 - 270) * px_m2 / 1e4, rel=1e-4)
    no_crs = change(before, after, Georef(Affine.identity(), None))
    assert no_crs.appeared_ha is None and no_crs.units == "px" and "no CRS" in no_crs.note


def _geojson_polygons_lonlat_area(path: str) -> tuple[list, float]:
    with open(path) as fh:
        gj = json.load(fh)
    crs = gj["crs"]["properties"]["name"]  # urn:ogc:def:crs:EPSG::32616
    to_ll = Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)
    polys = [shape(f["geometry"]) for f in gj["features"]]
    total = 0.0
    for p in polys:
        lon, lat = to_ll.transform(*np.asarray(p.exterior.coords).T)
        total += abs(GEOD.polygon_area_perimeter(lon, lat)[0])
        for hole in p.interiors:
            lon, lat = to_ll.transform(*np.asarray(hole.coords).T)
            total -= abs(GEOD.polygon_area_perimeter(lon, lat)[0])
    return polys, total


def test_spacenet_atlanta_building_count_and_area_match_the_polygons():
    polys, ref_area = _geojson_polygons_lonlat_area(f"{ATL}/buildings.geojson")
    with rasterio.open(f"{ATL}/building_mask.tif") as ds:
        mask, georef = ds.read(1), Georef.from_dataset(ds)
    with rasterio.open(f"{ATL}/building_instances.tif") as ds:
        instances = ds.read(1)
    m = measure_mask(mask, georef)
    assert m.area_m2 == pytest.approx(ref_area, rel=0.02)
    # Touching buildings: a binary mask merges them into one object, the instance raster keeps them apart.
    # In this chip no two footprints touch (their union has 43 parts), so both give the polygon count.
    assert len(polys) == 43
    assert len(shapely.union_all(polys).geoms) == 43
    assert m.count == 43
    assert len(np.unique(instances[instances > 0])) == 43
    assert measure_file(f"{ATL}/building_mask.tif").area_m2 == pytest.approx(m.area_m2)
    # per building: the instance mask area agrees with its own polygon for the larger buildings
    to_ll = Transformer.from_crs("EPSG:32616", "EPSG:4326", always_xy=True)
    for i in range(1, 44):
        inst = measure_mask(instances == i, georef)
        footprint = shapely.union_all(mask_polygons(instances == i, georef))
        best = max(polys, key=lambda p, f=footprint: p.intersection(f).area)
        lon, lat = to_ll.transform(*np.asarray(best.exterior.coords).T)
        ref = abs(GEOD.polygon_area_perimeter(lon, lat)[0])
        if ref > 100:  # small ones are dominated by edge pixels
            assert inst.area_m2 == pytest.approx(ref, rel=0.1), i


def test_touching_buildings_merge_in_a_binary_mask_but_not_in_instances():
    inst = np.zeros((20, 20), np.uint16)
    inst[2:8, 2:8] = 1
    inst[2:8, 8:14] = 2  # shares a wall with building 1
    inst[12:16, 2:6] = 3
    assert measure_mask(inst > 0, UTM).count == 2
    assert sum(measure_mask(inst == i, UTM).count for i in (1, 2, 3)) == 3


def test_sen1floods11_water_coverage_over_valid_pixels_only(tmp_path):
    # README of the samples: 26.7 % water in the hand label (over valid pixels; -1 = nodata)
    path = "tests/data/sen1floods11/Spain_7370579_LabelHand.tif"
    m = measure_file(path, value=1)
    with rasterio.open(path) as ds:
        lab = ds.read(1)
    valid = lab != -1
    assert (~valid).sum() > 0  # the chip has nodata, so "of valid pixels" matters
    assert m.valid_px == int(valid.sum())
    assert m.coverage_pct == pytest.approx(26.7, abs=0.05)
    assert m.coverage_pct == pytest.approx(100.0 * (lab == 1).sum() / valid.sum())
    assert m.units == "m" and m.area_ha > 0


def test_measure_file_nan_and_all_nodata(tmp_path):
    g = {"driver": "GTiff", "width": 10, "height": 10, "count": 1, "dtype": "float32", "crs": "EPSG:32633",
         "transform": Affine(10, 0, 500_000, 0, -10, 5_000_000)}
    data = np.zeros((10, 10), np.float32)
    data[:, :5] = np.nan  # half the raster is NaN
    data[0:2, 5:10] = 1.0  # 10 of the 50 valid pixels
    data[9, 9] = np.inf
    with rasterio.open(tmp_path / "nan.tif", "w", **g) as dst:
        dst.write(data, 1)
    m = measure_file(str(tmp_path / "nan.tif"))
    assert m.valid_px == 49 and m.area_px == 10
    assert m.coverage_pct == pytest.approx(100 * 10 / 49)
    with rasterio.open(tmp_path / "nodata.tif", "w", nodata=-9999, **g) as dst:
        dst.write(np.full((10, 10), -9999, np.float32), 1)
    empty = measure_file(str(tmp_path / "nodata.tif"))
    assert empty.valid_px == 0 and empty.area_px == 0 and empty.coverage_pct == 0.0
    assert "no valid pixels" in empty.note
    with pytest.raises(RasterError) as err:
        measure_file(str(tmp_path / "missing.tif"))
    assert err.value.code == "bad_raster"


def test_bad_masks_get_clear_errors():
    with pytest.raises(RasterError) as err:
        measure_mask(np.zeros((2, 3, 4)), UTM)
    assert err.value.code == "bad_mask"
    with pytest.raises(RasterError) as err2:
        measure_mask(np.zeros((4, 4)), UTM, valid=np.ones((3, 3), bool))
    assert err2.value.code == "shape_mismatch"
    with pytest.raises(RasterError) as err3:
        Georef(Affine(0, 0, 0, 0, 0, 0), None)
    assert err3.value.code == "bad_transform"
    with pytest.raises(RasterError) as err4:
        Georef(Affine.identity(), "not a crs at all")
    assert err4.value.code == "bad_crs"
    empty = measure_mask(np.zeros((0, 0), bool), UTM)
    assert empty.area_px == 0 and empty.count == 0


def test_sieve_removes_specks_keeps_objects_and_holes() -> None:
    from worker.measure import SIEVE_SHARE, sieve

    m = np.zeros((256, 256), bool)
    m[10:60, 10:60] = True
    m[30:40, 30:40] = False  # a hole: sieving is about objects, not holes
    m[100:104, 100:108] = True  # 32 px, exactly the default limit on a 256 px grid: kept
    m[200:203, 200:210] = True  # 30 px: a speck
    m[250, 0] = True  # 1 px
    assert round(SIEVE_SHARE * m.size) == 32
    out = sieve(m, relative=0)  # the fixed floor alone
    assert out.dtype == bool and out.shape == m.shape
    assert count_objects(out) == 2 and not out[200:203, 200:210].any() and not out[250, 0]
    assert not out[30:40, 30:40].any() and out[10:60, 10:60].sum() == 2500 - 100
    assert np.array_equal(sieve(m, 1, relative=0), m)  # a limit of 1 pixel keeps everything
    assert count_objects(sieve(m, 101, relative=0)) == 1
    assert count_objects(sieve(m)) == 1  # 32 px is under 2 % of the 2,400 px object
    # diagonal neighbours are one object (8-connectivity, as count_objects counts)
    d = np.zeros((64, 64), bool)
    d[np.arange(10), np.arange(10)] = True
    assert np.array_equal(sieve(d, 10), d) and not sieve(d, 11).any()


def test_sieve_drops_specks_small_beside_the_largest_object() -> None:
    """Objects under SIEVE_RELATIVE of the largest object go; small objects among their peers stay."""
    from worker.measure import SIEVE_RELATIVE, sieve

    m = np.zeros((256, 256), bool)
    m[0:150, 0:150] = True  # 22,500 px
    m[200:210, 200:240] = True  # 400 px: 1.8 % of the largest -> a speck beside it
    m[160:180, 200:225] = True  # 500 px: 2.2 % -> kept
    assert SIEVE_RELATIVE == 0.02
    out = sieve(m)
    assert count_objects(out) == 2 and not out[200:210, 200:240].any() and out[160:180, 200:225].all()
    assert count_objects(sieve(m, relative=0)) == 3
    huts = np.zeros((256, 256), bool)  # only small objects: all of them are counted
    for k in range(6):
        huts[10 + 40 * k:30 + 40 * k, 10:30] = True  # 400 px each
    assert np.array_equal(sieve(huts), huts)
