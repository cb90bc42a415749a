"""Areas and distances from masks against values computed independently of worker.measure.

Independent references: pyproj's point scale factors (Proj.get_factors), geodesic polygons built
directly from lon/lat vertices (Geod.polygon_area_perimeter), and geodesic inverse problems (Geod.inv).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import rasterio.features
import shapely
from affine import Affine
from pyproj import CRS, Geod, Proj, Transformer
from shapely.geometry import Polygon, box

from worker.measure import (
    Georef,
    RasterError,
    geodesic_area_perimeter,
    grounding_text,
    measure_mask,
    nearest_distance_m,
    nearest_distance_px,
)

GEOD = Geod(ellps="WGS84")
UTM33 = CRS.from_epsg(32633).to_wkt()


def _densified_lonlat_area(poly_xy: Polygon, crs: str, n: int = 200) -> tuple[float, float]:
    """Geodesic area/perimeter of a CRS polygon: n points per edge, projected to lon/lat, Geod polygon."""
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    xs, ys = [], []
    coords = list(poly_xy.exterior.coords)
    for (x0, y0), (x1, y1) in itertools.pairwise(coords):
        t = np.linspace(0.0, 1.0, n, endpoint=False)
        xs.extend(x0 + (x1 - x0) * t)
        ys.extend(y0 + (y1 - y0) * t)
    lon, lat = to_ll.transform(np.array(xs), np.array(ys))
    area, perim = GEOD.polygon_area_perimeter(lon, lat)
    return abs(area), perim


def _tx(tr: Transformer, geom):
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def _square_mask(size: int, x0: int, y0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


def test_utm_1km_square_matches_ellipsoidal_area_within_0p1_percent():
    # 10 m pixels, square of 100x100 px = 1 km x 1 km in UTM 33N, 300 km east of the central meridian,
    # where the UTM scale factor makes the planar area off by ~0.14 % (more than the 0.1 % allowed).
    origin_x, origin_y = 800_000.0, 5_000_000.0
    georef = Georef(Affine(10.0, 0.0, origin_x, 0.0, -10.0, origin_y), UTM33)
    mask = _square_mask(120, 10, 10, 100)
    m = measure_mask(mask, georef)

    sq = box(origin_x + 100, origin_y - 1100, origin_x + 1100, origin_y - 100)
    ref_area, ref_perim = _densified_lonlat_area(sq, "EPSG:32633")
    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(*sq.centroid.coords[0])
    areal_scale = Proj("EPSG:32633").get_factors(lon, lat).areal_scale
    assert ref_area == pytest.approx(1e6 / areal_scale, rel=1e-4)  # the two references agree
    assert abs(1e6 / areal_scale - 1e6) / 1e6 > 1e-3  # and differ from the naive planar km²

    assert m.units == "m" and m.note is None
    assert m.area_m2 == pytest.approx(ref_area, rel=1e-3)
    assert m.area_ha == pytest.approx(ref_area / 1e4, rel=1e-3)
    assert m.perimeter_m == pytest.approx(ref_perim, rel=1e-3)
    assert m.area_px == 10_000 and m.count == 1
    assert m.coverage_pct == pytest.approx(100.0 * 10_000 / 120**2)
    assert m.pixel_size_m == pytest.approx(10.0, rel=2e-3)


def _rasterise_footprint(footprint_ll: Polygon, crs: str, pixel: float, margin: int = 5) -> tuple[np.ndarray, Georef]:
    """Burn a lon/lat polygon (densified) onto a north-up grid of ``pixel`` CRS units in ``crs``."""
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    dense = footprint_ll.segmentize(0.0005)
    poly = _tx(fwd, dense)
    minx, miny, maxx, maxy = poly.bounds
    w = math.ceil((maxx - minx) / pixel) + 2 * margin
    h = math.ceil((maxy - miny) / pixel) + 2 * margin
    t = Affine(pixel, 0.0, minx - margin * pixel, 0.0, -pixel, maxy + margin * pixel)
    mask = rasterio.features.rasterize([poly], out_shape=(h, w), transform=t, dtype="uint8").astype(bool)
    return mask, Georef(t, CRS.from_user_input(crs).to_wkt())


@pytest.mark.parametrize(
    "crs,pixel",
    [
        ("EPSG:4326", 0.0001),  # ~8 m x 11 m near Raleigh
        ("EPSG:3857", 12.0),  # ground ~9.7 m; planar areas 1.5x too large at 36 N
        ("EPSG:32617", 10.0),  # UTM 17N
        ("EPSG:2264", 30.0),  # NC state plane, US survey feet
    ],
)
def test_same_ground_footprint_gives_same_hectares_in_any_crs(crs, pixel):
    # A tilted quadrilateral of about 150 ha near Raleigh, North Carolina, defined in lon/lat.
    footprint = Polygon([(-78.660, 35.770), (-78.642, 35.774), (-78.640, 35.784), (-78.661, 35.781)])
    ref_area, _ = GEOD.polygon_area_perimeter(*footprint.exterior.xy)
    ref_ha = abs(ref_area) / 1e4
    mask, georef = _rasterise_footprint(footprint, crs, pixel)
    m = measure_mask(mask, georef)
    assert m.units == "m"
    assert m.area_ha == pytest.approx(ref_ha, rel=5e-3), (crs, m.area_ha, ref_ha)
    assert m.count == 1


def test_three_crs_agree_with_each_other_within_0p5_percent():
    footprint = Polygon([(12.49, 55.70), (12.53, 55.705), (12.52, 55.72), (12.485, 55.716)])  # Copenhagen
    has = [measure_mask(*_rasterise_footprint(footprint, crs, px)).area_ha
           for crs, px in (("EPSG:4326", 0.0001), ("EPSG:3857", 15.0), ("EPSG:32633", 10.0))]
    assert max(has) / min(has) - 1 < 5e-3, has
    # the planar web-mercator area would be ~3.2x larger at 55.7 N: the library must not be using it
    mask, _georef = _rasterise_footprint(footprint, "EPSG:3857", 15.0)
    assert mask.sum() * 15.0 * 15.0 / 1e4 > 2.5 * has[1]


def _two_squares(crs: str, pixel: float, centre_ll: tuple[float, float], gap_m: float, side_m: float = 200.0):
    """Two squares built on the ground (local UTM metres) ``gap_m`` apart east-west, burnt onto ``crs``."""
    lon0, lat0 = centre_ll
    zone = int((lon0 + 180) // 6) + 1
    utm = f"EPSG:{32600 + zone if lat0 >= 0 else 32700 + zone}"
    cx, cy = Transformer.from_crs("EPSG:4326", utm, always_xy=True).transform(lon0, lat0)
    a = box(cx - gap_m / 2 - side_m, cy - side_m / 2, cx - gap_m / 2, cy + side_m / 2)
    b = box(cx + gap_m / 2, cy - side_m / 2, cx + gap_m / 2 + side_m, cy + side_m / 2)
    to_ll = Transformer.from_crs(utm, "EPSG:4326", always_xy=True)
    la = _tx(to_ll, a.segmentize(10))
    lb = _tx(to_ll, b.segmentize(10))
    # true gap: geodesic between the facing edge midpoints
    p1 = to_ll.transform(cx - gap_m / 2, cy)
    p2 = to_ll.transform(cx + gap_m / 2, cy)
    true_gap = GEOD.inv(p1[0], p1[1], p2[0], p2[1])[2]
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    pa = _tx(fwd, la)
    pb = _tx(fwd, lb)
    minx, miny, maxx, maxy = pa.union(pb).bounds
    w, h = int((maxx - minx) / pixel) + 10, int((maxy - miny) / pixel) + 10
    t = Affine(pixel, 0, minx - 5 * pixel, 0, -pixel, maxy + 5 * pixel)
    ma = rasterio.features.rasterize([pa], out_shape=(h, w), transform=t).astype(bool)
    mb = rasterio.features.rasterize([pb], out_shape=(h, w), transform=t).astype(bool)
    return ma, mb, Georef(t, CRS.from_user_input(crs).to_wkt()), true_gap


@pytest.mark.parametrize(
    "crs,pixel,centre",
    [
        ("EPSG:32633", 10.0, (15.0, 45.0)),
        ("EPSG:3857", 20.0, (10.0, 60.0)),  # planar mercator distance would read ~600 m here
        ("EPSG:4326", 0.0001, (10.0, 60.0)),  # degrees of longitude are half as long as of latitude
    ],
)
def test_two_squares_300m_apart_measure_300m_within_one_pixel(crs, pixel, centre):
    ma, mb, georef, true_gap = _two_squares(crs, pixel, centre, 300.0)
    assert true_gap == pytest.approx(300.0, abs=0.5)
    d = nearest_distance_m(ma, mb, georef)
    px = measure_mask(ma, georef).pixel_size_m
    assert px is not None
    # one pixel of tolerance, in the larger ground direction of a (maybe non-square) pixel
    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    t = georef.transform
    (lo0, la0), (lo1, la1), (lo2, la2) = (to_ll.transform(*(t @ p)) for p in ((0, 0), (1, 0), (0, 1)))
    one_px = max(GEOD.inv(lo0, la0, lo1, la1)[2], GEOD.inv(lo0, la0, lo2, la2)[2])
    assert d == pytest.approx(300.0, abs=one_px), (crs, d, one_px)


def test_distance_zero_when_touching_and_none_when_empty():
    g = Georef(Affine(10.0, 0, 500_000, 0, -10.0, 5_000_000), UTM33)
    a = _square_mask(50, 5, 5, 10)
    b = _square_mask(50, 15, 5, 10)  # shares a pixel edge with a
    assert nearest_distance_m(a, b, g) == 0.0
    assert nearest_distance_m(a, np.zeros_like(a), g) is None


def test_no_crs_gives_pixel_units_and_a_clear_note():
    g = Georef(Affine.identity(), None)
    mask = _square_mask(40, 2, 3, 10)
    m = measure_mask(mask, g)
    assert m.units == "px" and m.area_ha is None and m.area_m2 is None and m.perimeter_m is None
    assert m.area_px == 100 and m.perimeter_px == pytest.approx(40.0) and m.count == 1
    assert "no CRS" in m.note and "ha" in m.note
    assert "100 px" in grounding_text(m) and "ha" not in grounding_text(m)
    assert m.to_dict()["area_ha"] is None
    with pytest.raises(RasterError) as err:
        geodesic_area_perimeter([box(0, 0, 1, 1)], None)
    assert err.value.code == "no_crs_area"
    other = _square_mask(40, 20, 3, 10)
    with pytest.raises(RasterError) as err2:
        nearest_distance_m(mask, other, g)
    assert err2.value.code == "no_crs_distance" and "metres" in str(err2.value)
    assert nearest_distance_px(mask, other) == 8.0  # columns 2..11 and 20..29: 8 empty columns


def test_engineering_crs_is_not_silently_measured_in_metres():
    local = 'LOCAL_CS["arbitrary",LOCAL_DATUM["local",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]'
    m = measure_mask(_square_mask(20, 2, 2, 5), Georef(Affine(2, 0, 0, 0, -2, 0), local))
    assert m.units == "px" and m.area_ha is None and "datum" in m.note


def test_rotated_grid_measures_the_same_ground_as_north_up():
    # 30 degree rotated grid of 10 m pixels in UTM: pixel area is still 100 m², footprint rotates.
    rot = Affine.translation(600_000, 5_200_000) @ Affine.rotation(30.0) @ Affine.scale(10.0, -10.0)
    assert rot.b != 0.0 and rot.d != 0.0
    assert abs(rot.determinant) == pytest.approx(100.0)
    g_rot = Georef(rot, UTM33)
    mask = _square_mask(80, 10, 10, 50)  # 500 m x 500 m on the ground
    m = measure_mask(mask, g_rot)
    corners = [rot @ (10, 10), rot @ (60, 10), rot @ (60, 60), rot @ (10, 60)]
    ref_area, ref_perim = _densified_lonlat_area(Polygon(corners), "EPSG:32633")
    assert m.area_m2 == pytest.approx(ref_area, rel=1e-3)
    assert m.perimeter_m == pytest.approx(ref_perim, rel=1e-3)
    assert g_rot.pixel_size == pytest.approx((10.0, 10.0))


def test_real_rotated_sar_footprint_area(tmp_path):
    # SpaceNet 6 SLC: complex64 on a rotated slant-range grid. The whole raster's area must equal the
    # geodesic area of the parallelogram spanned by its affine (computed here from the four corners).
    import rasterio

    from worker.measure import measure_file

    path = "tests/data/spacenet6_rotterdam/sar_vv.tif"
    with rasterio.open(path) as ds:
        t, h, w, crs = ds.transform, ds.height, ds.width, ds.crs.to_wkt()
        data = ds.read(1)
    assert t.b != 0.0  # really rotated
    full = np.ones((h, w), np.uint8)
    out = tmp_path / "full.tif"
    with rasterio.open(out, "w", driver="GTiff", width=w, height=h, count=1, dtype="uint8", crs=crs,
                       transform=t) as dst:
        dst.write(full, 1)
    m = measure_file(str(out))
    ref_area, _ = _densified_lonlat_area(Polygon([t @ (0, 0), t @ (w, 0), t @ (w, h), t @ (0, h)]), crs)
    assert m.area_m2 == pytest.approx(ref_area, rel=1e-3)
    assert m.coverage_pct == pytest.approx(100.0)
    assert np.iscomplexobj(data)


def _zone_area(lat1: float, lat2: float, dlon: float) -> float:
    """Exact area of a lon/lat cell on the WGS84 ellipsoid (authalic-latitude formula)."""
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    e, b2 = math.sqrt(e2), (a * (1 - f)) ** 2

    def q(phi: float) -> float:
        s = math.sin(math.radians(phi))
        return s / (1 - e2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    return math.radians(dlon) * b2 / 2 * (q(lat2) - q(lat1))


def test_coarse_global_grid_matches_the_exact_ellipsoidal_zone_area():
    # 0.5 degree pixels from 0 to 60 N: pixel areas vary by half across the grid, so the library must
    # take its exact polygon path; the reference is the closed-form area of an ellipsoidal zone.
    g = Georef(Affine(0.5, 0, 0.0, 0, -0.5, 60.0), CRS.from_epsg(4326).to_wkt())
    mask = np.zeros((120, 20), bool)
    mask[:, :] = True
    m = measure_mask(mask, g)
    assert m.area_m2 == pytest.approx(_zone_area(0.0, 60.0, 10.0), rel=1e-4)
    part = np.zeros_like(mask)
    part[20:60, 4:10] = True  # 50..40 N, 2..5 E
    assert measure_mask(part, g).area_m2 == pytest.approx(_zone_area(30.0, 50.0, 3.0), rel=1e-4)


@pytest.mark.parametrize(
    "georef",
    [
        Georef(Affine(2.5, 0, 800_000, 0, -2.5, 5_000_000), UTM33),
        Georef(Affine(0.0002, 0, 10.0, 0, -0.0002, 61.0), CRS.from_epsg(4326).to_wkt()),
        Georef(Affine(20.0, 0, 1e6, 0, -20.0, 7.4e6), CRS.from_epsg(3857).to_wkt()),
        Georef(Affine.translation(6e5, 5.2e6) @ Affine.rotation(30.0) @ Affine.scale(3.0, -3.0), UTM33),
    ],
)
def test_pixel_integration_agrees_with_polygon_geodesics(georef):
    # measure_mask integrates per-pixel geodesic areas (fast for masks with many objects); the GeoPackage
    # uses polygon geodesics. Both must agree on a fragmented mask (the polygon path is tested above).
    from worker.measure import measure_objects

    rng = np.random.default_rng(11)
    mask = rng.random((300, 400)) > 0.6
    mask[50:250, 100:300] = True
    fast = measure_mask(mask, georef)
    exact = measure_objects(mask, georef)[0]
    assert fast.area_m2 == pytest.approx(exact.area_m2, rel=1e-5)
    assert fast.perimeter_m == pytest.approx(exact.perimeter_m, rel=1e-5)
    assert fast.count == exact.count
