"""Raster preparation: band choice per sensor, stretch, SAR, nodata/NaN, odd shapes, grids, windows."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import CRS

from worker.measure import Georef, measure_mask
from worker.raster import (
    RasterError,
    choose_bands,
    mask_to_request_grid,
    prepare_array,
    read_raster,
    sliding_windows,
    stitch_masks,
)

S2 = "tests/data/sen1floods11/Spain_7370579_S2Hand.tif"
S1 = "tests/data/sen1floods11/Spain_7370579_S1Hand.tif"
CLOUD = "tests/data/cloud_s2/adwp_B02_B03_B04_B08.tif"
SLC = "tests/data/spacenet6_rotterdam/sar_vv.tif"
ZANZIBAR = "tests/data/fair_zanzibar/OAM-319295-270961-19.tif"
UTM = Georef(Affine(10.0, 0, 500_000, 0, -10.0, 5_000_000), CRS.from_epsg(32633).to_wkt())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


# ----------------------------------------------------------------------------------- band choice
def test_sentinel2_13_band_file_uses_b4_b3_b2():
    data, georef, nodata, names = read_raster(S2)
    assert data.shape == (13, 512, 512) and names[3] == "B4"
    p = prepare_array(data, georef, nodata, names)
    assert p.bands_used == [3, 2, 1] and p.sensor == "sentinel2"
    assert p.pixels.dtype == np.uint8 and p.pixels.shape == (512, 512, 3)
    # red channel follows B4, blue follows B2 (rank order survives a monotonic stretch)
    assert _spearman(p.pixels[..., 0].astype(float), data[3].astype(float)) > 0.99
    assert _spearman(p.pixels[..., 2].astype(float), data[1].astype(float)) > 0.99
    # same 13 bands without names: the count alone says Sentinel-2, and the note says it was assumed
    q = prepare_array(data, georef, nodata)
    assert q.bands_used == [3, 2, 1] and any("assumed Sentinel-2" in n for n in q.notes)


def test_cloud_chip_and_landsat_and_rgb_defaults():
    data, georef, nodata, names = read_raster(CLOUD)
    assert names[:3] == ["B02_blue", "B03_green", "B04_red"]
    assert prepare_array(data, georef, nodata, names).bands_used == [2, 1, 0]
    unnamed = prepare_array(data, georef, nodata)
    assert unnamed.bands_used == [2, 1, 0] and any("B,G,R,NIR" in n for n in unnamed.notes)
    six = np.random.default_rng(0).integers(1, 200, (6, 16, 16)).astype(np.uint8)
    assert prepare_array(six, UTM).bands_used == [2, 1, 0]
    assert choose_bands(6, None, np.dtype(np.uint8), sensor="landsat")[0] == [2, 1, 0]
    assert choose_bands(7, None, np.dtype(np.uint16), sensor="landsat8")[0] == [3, 2, 1]
    assert choose_bands(3, ["blue", "green", "red"], np.dtype(np.uint8))[0] == [2, 1, 0]
    with pytest.raises(RasterError) as err:
        choose_bands(3, None, np.dtype(np.uint8), sensor="hyperion")
    assert err.value.code == "bad_sensor"


def test_rgba_alpha_marks_invalid_pixels_and_8bit_rgb_is_untouched():
    rgb = np.random.default_rng(1).integers(0, 256, (3, 32, 32)).astype(np.uint8)
    alpha = np.full((1, 32, 32), 255, np.uint8)
    alpha[0, :, :8] = 0
    p = prepare_array(np.concatenate([rgb, alpha]), UTM)
    assert p.valid[:, :8].sum() == 0 and p.valid[:, 8:].all()
    assert (p.pixels[:, :8] == 0).all()
    assert np.array_equal(p.pixels[:, 8:], np.moveaxis(rgb, 0, -1)[:, 8:])
    # real aerial RGB tile
    data, georef, nodata, names = read_raster(ZANZIBAR)
    z = prepare_array(data, georef, nodata, names)
    assert np.array_equal(z.pixels, np.moveaxis(data, 0, -1))


def test_two_unnamed_optical_bands_are_refused_with_a_clear_message():
    with pytest.raises(RasterError) as err:
        prepare_array(np.ones((2, 8, 8), np.uint16), UTM)
    assert err.value.code == "bad_band_count" and "sar" in str(err.value)
    with pytest.raises(RasterError) as err2:
        prepare_array(np.ones((3, 8, 8), np.uint16), UTM, bands=[0, 1, 7])
    assert err2.value.code == "bad_bands"


# ------------------------------------------------------------------------------- stretch, validity
def test_percentile_stretch_uses_valid_pixels_only_and_clips_outliers():
    rng = np.random.default_rng(2)
    band = rng.uniform(1000, 2000, (64, 64)).astype(np.float32)
    band[0, :5] = 1e6  # bright outliers
    band[10:20, :] = -9999  # nodata rows
    data = np.stack([band, band, band])
    p = prepare_array(data, UTM, nodata=-9999)
    assert not p.valid[10:20].any() and p.valid.sum() == 64 * 64 - 640
    r = p.pixels[..., 0]
    assert (r[10:20] == 0).all()
    vals = band[p.valid]
    lo, hi = np.percentile(vals, [2, 98])
    below, above = vals <= lo, vals >= hi
    assert (r[p.valid][below] == 0).all() and (r[p.valid][above] == 255).all()
    assert 100 < np.median(r[p.valid]) < 155  # uniform data -> mid grey, not squashed by the outliers
    assert p.valid_fraction == pytest.approx((4096 - 640) / 4096)


def test_nan_inf_all_nodata_and_degenerate_shapes():
    data = np.random.default_rng(3).uniform(0, 1, (3, 16, 16)).astype(np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    p = prepare_array(data, UTM)
    assert not p.valid[0, 0] and not p.valid[1, 1] and p.valid.sum() == 254
    with pytest.raises(RasterError) as e1:
        prepare_array(np.full((3, 16, 16), np.nan, np.float32), UTM)
    assert e1.value.code == "all_nodata"
    with pytest.raises(RasterError) as e2:
        prepare_array(np.zeros((3, 16, 16), np.uint16), UTM, nodata=0)
    assert e2.value.code == "all_nodata"
    with pytest.raises(RasterError) as e3:
        prepare_array(np.zeros((3, 0, 0), np.uint8), UTM)
    assert e3.value.code == "empty_raster"
    with pytest.raises(RasterError) as e4:
        prepare_array(np.zeros((3, 1, 500), np.uint8), UTM)
    assert e4.value.code == "raster_too_small"
    with pytest.raises(RasterError) as e5:
        prepare_array(np.zeros((2, 3, 4, 5), np.uint8), UTM)
    assert e5.value.code == "bad_shape"
    with pytest.raises(RasterError) as e6:
        prepare_array(np.array([[["a"] * 8] * 8] * 3), UTM)
    assert e6.value.code == "bad_dtype"


# -------------------------------------------------------------------------------------------- SAR
def _sar_db(seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vv = rng.normal(-12, 4, (32, 32))
    vh = vv - 6 + rng.normal(0, 2, (32, 32))
    return np.stack([vv, vh]).astype(np.float32)


def test_sar_db_becomes_vv_vh_mean_channels():
    db = _sar_db()
    p = prepare_array(db, UTM, band_names=["VV", "VH"], role="sar")
    assert p.role == "sar" and p.sensor == "sar" and p.pixels.shape == (32, 32, 3)
    assert any("dB" in n for n in p.notes)
    assert _spearman(p.pixels[..., 0], db[0]) > 0.99
    assert _spearman(p.pixels[..., 1], db[1]) > 0.99
    assert _spearman(p.pixels[..., 2], (db[0] + db[1]) / 2) > 0.99
    # VV/VH band names alone are enough to recognise SAR on the real Sentinel-1 chip
    data, georef, nodata, names = read_raster(S1)
    s1 = prepare_array(data, georef, nodata, names)
    assert s1.role == "sar" and s1.bands_used == [0, 1]


def test_sar_linear_16bit_and_complex_give_the_same_view_as_db():
    db = _sar_db()
    ref = prepare_array(db, UTM, band_names=["VV", "VH"], role="sar").pixels.astype(int)
    linear = (10.0 ** (db / 10.0)).astype(np.float32)
    amp16 = np.round(np.sqrt(linear) * 3000).astype(np.uint16)  # 16-bit amplitude DN
    rng = np.random.default_rng(5)
    phase = rng.uniform(-np.pi, np.pi, db.shape)
    cplx = (np.sqrt(linear) * np.exp(1j * phase)).astype(np.complex64)
    for arr, how in ((linear, "linear"), (amp16, "amplitude"), (cplx, "complex")):
        p = prepare_array(arr, UTM, band_names=["VV", "VH"], role="sar")
        assert any(how in n for n in p.notes), p.notes
        diff = np.abs(p.pixels.astype(int) - ref)
        assert diff.max() <= 2 and diff.mean() < 0.6, how  # DN rounding of 16-bit only


def test_real_complex_slc_on_rotated_grid():
    data, georef, nodata, names = read_raster(SLC)
    assert np.iscomplexobj(data) and georef.transform.b != 0.0
    p = prepare_array(data, georef, nodata, names)  # role left at "optical": complex means SAR
    assert p.role == "sar" and p.pixels.shape == (200, 200, 3)
    assert any("complex" in n for n in p.notes)
    assert p.georef.transform == georef.transform


def test_negative_unnamed_float_bands_are_taken_as_sar_and_said_so():
    p = prepare_array(np.concatenate([_sar_db(), _sar_db(6)]), UTM)
    assert p.role == "sar" and any("look like SAR" in n for n in p.notes)


# ---------------------------------------------------------------------------------- grids, windows
def test_decimated_view_and_mask_back_on_the_request_grid():
    h, w = 3000, 1000
    data = np.zeros((3, h, w), np.uint8)
    data[:, 1000:2000, 200:700] = 200  # a bright rectangle
    data[:, :, :] += 20
    p = prepare_array(data, UTM, max_side=512)
    vh, vw = p.view_shape
    assert max(vh, vw) == 512 and p.shape == (h, w)
    # the view georef puts the bright rectangle at the same map position as the request georef
    view_mask = p.pixels[..., 0] > 100
    full = mask_to_request_grid(view_mask, p)
    assert full.shape == (h, w)
    truth = np.zeros((h, w), bool)
    truth[1000:2000, 200:700] = True
    assert (full != truth).sum() <= 2 * (1000 + 500) * 6  # only a band one view pixel wide may differ
    x0, y0 = p.view_georef.transform @ (0, 0)
    x1, y1 = p.view_georef.transform @ (vw, vh)
    assert (x0, y0, x1, y1) == pytest.approx((500_000, 5_000_000, 500_000 + 10 * w, 5_000_000 - 10 * h))
    ha_full = measure_mask(full, p.georef).area_ha
    ha_view = measure_mask(view_mask, p.view_georef).area_ha
    assert ha_full == pytest.approx(5000.0 / 0.9996**2, rel=0.02) and ha_view == pytest.approx(ha_full, rel=0.02)
    with pytest.raises(RasterError):
        mask_to_request_grid(np.zeros((5, 5), bool), p)


def _write(path, data, transform, crs="EPSG:32633", **kw):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform, **kw) as dst:
        dst.write(data)


def test_read_raster_decimates_and_windows(tmp_path):
    rng = np.random.default_rng(8)
    data = rng.integers(0, 255, (3, 1200, 900)).astype(np.uint8)
    t = Affine(2.0, 0, 400_000, 0, -2.0, 6_000_000)
    _write(tmp_path / "big.tif", data, t, tiled=True, blockxsize=256, blockysize=256)
    small, g, nodata, names = read_raster(str(tmp_path / "big.tif"), max_side=300)
    assert nodata is None
    assert small.shape == (3, 300, 225) and names == ["red", "green", "blue"]  # GDAL tags 3-band 8-bit as RGB
    assert g.transform @ (225, 300) == pytest.approx(t @ (900, 1200))  # same footprint
    assert g.pixel_size == pytest.approx((8.0, 8.0))
    # a window in map coordinates returns exactly those pixels
    bounds = (400_000 + 200, 6_000_000 - 600, 400_000 + 400, 6_000_000 - 400)
    win, gw, _, _ = read_raster(str(tmp_path / "big.tif"), window_bounds=bounds)
    assert win.shape == (3, 100, 100)
    assert np.array_equal(win, data[:, 200:300, 100:200])
    assert gw.transform @ (0, 0) == pytest.approx((400_200, 5_999_600))
    one, _, _, _ = read_raster(str(tmp_path / "big.tif"), bands=[2])
    assert one.shape == (1, 1200, 900) and np.array_equal(one[0], data[2])
    with pytest.raises(RasterError) as err:
        read_raster(str(tmp_path / "big.tif"), window_bounds=(0, 0, 10, 10))
    assert err.value.code == "empty_window"
    with pytest.raises(RasterError) as err2:
        read_raster(str(tmp_path / "nope.tif"))
    assert err2.value.code == "bad_raster"
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(RasterError):
        read_raster(str(tmp_path / "junk.tif"))


def test_read_raster_without_crs_keeps_pixel_units(tmp_path):
    import warnings

    data = np.full((1, 20, 30), 7, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _write(tmp_path / "nocrs.tif", data, Affine.identity(), crs=None)
    arr, g, _, _ = read_raster(str(tmp_path / "nocrs.tif"))
    assert g.crs_wkt is None
    p = prepare_array(arr, g)
    m = measure_mask(np.ones(p.shape, bool), p.georef)
    assert m.units == "px" and m.area_ha is None and "no CRS" in m.note


def test_sliding_windows_cover_the_grid_and_stitch_back_exactly():
    shape = (530, 700)
    wins = sliding_windows(shape, tile=256, overlap=32)
    cover = np.zeros(shape, int)
    for w in wins:
        assert w.height == 256 and w.width == 256
        cover[w.slices] += 1
    assert cover.min() >= 1
    truth = np.random.default_rng(9).random(shape) > 0.7
    assert np.array_equal(stitch_masks(shape, wins, [truth[w.slices] for w in wins]), truth)
    # probabilities: overlapping tiles that disagree are resolved by the tile nearer its centre
    probs = [np.full((w.height, w.width), 0.9 if i == 0 else 0.1, np.float32) for i, w in enumerate(wins)]
    st = stitch_masks(shape, wins, probs)
    assert st[:100, :100].all() and not st[-50:, -50:].any()
    with pytest.raises(RasterError):
        sliding_windows(shape, tile=64, overlap=64)
    assert sliding_windows((10, 10), tile=256, overlap=32)[0].height == 10


def test_gcp_only_raster_gets_the_gcps_affine(tmp_path):
    from rasterio.control import GroundControlPoint as GCP

    # corners of a 100 x 50 grid of 10 m pixels, rotated 90 degrees (rows run east), known only by GCPs
    gcps = [GCP(row=0, col=0, x=500_000, y=5_000_000), GCP(row=0, col=100, x=500_000, y=4_999_000),
            GCP(row=50, col=0, x=500_500, y=5_000_000), GCP(row=50, col=100, x=500_500, y=4_999_000)]
    with rasterio.open(tmp_path / "gcp.tif", "w", driver="GTiff", width=100, height=50, count=1, dtype="uint8",
                       gcps=gcps, crs="EPSG:32633") as dst:
        dst.write(np.ones((1, 50, 100), np.uint8))
    with rasterio.open(tmp_path / "gcp.tif") as ds:
        g = Georef.from_dataset(ds)
    assert CRS.from_wkt(g.crs_wkt).to_epsg() == 32633
    assert g.transform @ (100, 50) == pytest.approx((500_500, 4_999_000))
    m = measure_mask(np.ones((50, 100), bool), g)
    assert m.area_ha == pytest.approx(50.0 / 0.9996**2, rel=1e-3)  # 500 m x 1000 m on the central meridian
