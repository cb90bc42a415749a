"""Raster windows read through QGIS providers: snapping, whole-factor decimation on the true grid, dtypes,
nodata, CRS, rotated grids, regions in other CRSs and polygon regions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgislib import SAMPLE_4326, write_geotiff

from qgis_plugin.ask_task import rasterize_geometry
from qgis_plugin.rasters import RasterReadError, plan_window, read_window
from qgis_plugin.region import CANVAS, POLYGON, Region, RegionError
from qgis_plugin.request import apply_region_mask, build_request

GT = (1000.0, 10.0, 0.0, 2000.0, 0.0, -10.0)


def _layer(tmp_path, data, transform=GT, epsg=32633, nodata=None, name="r.tif") -> QgsRasterLayer:
    path = write_geotiff(tmp_path / name, data, transform, epsg, nodata=nodata)
    layer = QgsRasterLayer(str(path), name)
    assert layer.isValid()
    return layer


def test_plan_snaps_outward_and_decimates_by_a_whole_factor():
    ext = QgsRectangle(1000, 1880, 1160, 2000)  # 16 x 12 pixels of 10 m
    whole = plan_window(ext, 16, 12, None, 1024)
    assert (whole.cols, whole.rows, whole.decimation) == (16, 12, 1)
    part = plan_window(ext, 16, 12, QgsRectangle(1012, 1903, 1049, 1961), 1024)
    assert part.extent.toRectF().getCoords() == (1010.0, 1900.0, 1050.0, 1970.0)  # outward to pixel edges
    assert (part.cols, part.rows) == (4, 7)
    big = plan_window(QgsRectangle(0, 0, 10000, 6000), 1000, 600, None, 256)
    assert big.decimation == 4 and (big.cols, big.rows) == (250, 150)
    assert big.extent.width() == 10000 and big.extent.height() == 6000
    odd = plan_window(QgsRectangle(0, 0, 1010, 500), 101, 50, None, 50)
    assert odd.decimation == 3 and (odd.cols, odd.rows) == (33, 16)
    assert odd.extent.width() == 990 and odd.extent.height() == 480  # whole 3x3 blocks only
    with pytest.raises(RasterReadError, match="does not overlap"):
        plan_window(ext, 16, 12, QgsRectangle(5000, 5000, 6000, 6000), 1024)
    with pytest.raises(RasterReadError, match="no pixels"):
        plan_window(ext, 0, 0, None, 1024)


def test_decimated_read_keeps_the_true_grid(tmp_path):
    src = np.arange(12 * 16, dtype=np.uint16).reshape(1, 12, 16)
    layer = _layer(tmp_path, src)
    w = read_window(layer.dataProvider(), None, 8, name="r")
    assert w.decimation == 2 and w.shape == (6, 8) and w.source_size == (16, 12)
    assert w.transform == (1000.0, 20.0, 0.0, 2000.0, 0.0, -20.0)
    # Each sent pixel is the source pixel at the centre of its 2 x 2 block: exactly on the source grid.
    np.testing.assert_array_equal(w.data[0], src[0][1::2, 1::2])
    assert w.data.dtype == np.uint16
    assert w.crs_wkt and QgsCoordinateReferenceSystem.fromWkt(w.crs_wkt).authid() == "EPSG:32633"


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.complex64])
def test_dtypes_and_nodata_survive(tmp_path, dtype):
    rng = np.random.default_rng(1)
    data = (rng.random((2, 9, 7)) * 100).astype(dtype)
    if dtype == np.complex64:
        data = (data + 1j * data[::-1]).astype(np.complex64)
    layer = _layer(tmp_path, data, nodata=None if dtype == np.complex64 else 7)
    w = read_window(layer.dataProvider(), None, 64)
    assert w.data.dtype == np.dtype(dtype) and w.data.shape == (2, 9, 7)
    np.testing.assert_array_equal(w.data, data)
    if dtype != np.complex64:
        assert w.nodata == [7.0, 7.0]


def test_bundled_sentinel2_sample_reads_13_bands(qgis_new_project):
    layer = QgsRasterLayer(str(SAMPLE_4326), "s2")
    w = read_window(layer.dataProvider(), None, 128)
    assert w.data.shape == (13, 128, 128) and w.decimation == 4 and w.data.dtype == np.int16
    assert w.nodata[0] == 0.0 and QgsCoordinateReferenceSystem.fromWkt(w.crs_wkt).authid() == "EPSG:4326"


def test_rotated_grid_is_read_north_up_and_no_crs_is_pixel_units(tmp_path):
    src = np.arange(12 * 16, dtype=np.uint16).reshape(1, 12, 16)
    rotated = _layer(tmp_path, src, (1000.0, 10.0, 2.0, 2000.0, 2.0, -10.0), name="rot.tif")
    w = read_window(rotated.dataProvider(), None, 256)
    assert w.transform[2] == 0.0 and w.transform[4] == 0.0  # GDAL's warped VRT is north-up
    bare = _layer(tmp_path, src, epsg=None, name="nocrs.tif")
    assert read_window(bare.dataProvider(), None, 256).crs_wkt == ""


def test_canvas_extent_in_another_crs_becomes_a_window_of_the_layer(tmp_path, qgis_new_project):
    layer = QgsRasterLayer(str(SAMPLE_4326), "s2")
    QgsProject.instance().addMapLayer(layer)
    ext = layer.extent()
    centre = ext.center()
    quarter = QgsRectangle(centre.x() - ext.width() / 8, centre.y() - ext.height() / 8,
                           centre.x() + ext.width() / 8, centre.y() + ext.height() / 8)
    # The same rectangle expressed in Web Mercator, as a canvas in EPSG:3857 would give it.
    from qgis.core import QgsCoordinateTransform

    to_3857 = QgsCoordinateTransform(layer.crs(), QgsCoordinateReferenceSystem("EPSG:3857"), QgsProject.instance())
    region = Region(CANVAS, to_3857.transformBoundingBox(quarter), QgsCoordinateReferenceSystem("EPSG:3857"))
    rect, geom = region.for_layer(layer)
    assert geom is None and rect.contains(quarter.buffered(-1e-7))
    w = read_window(layer.dataProvider(), rect, 1024)
    assert 120 <= w.shape[0] <= 132 and 120 <= w.shape[1] <= 132  # about a quarter of 512 px
    far = Region(CANVAS, QgsRectangle(0, 0, 1000, 1000), QgsCoordinateReferenceSystem("EPSG:3857"))
    with pytest.raises(RegionError, match="does not overlap"):
        far.for_layer(layer)


def test_polygon_region_marks_outside_pixels_invalid(tmp_path):
    data = np.full((3, 12, 16), 50, np.uint8)
    layer = _layer(tmp_path, data)
    triangle = QgsGeometry.fromWkt("POLYGON((1000 2000, 1160 2000, 1000 1880, 1000 2000))")
    rect, geom = Region(POLYGON, triangle.boundingBox(), layer.crs(), triangle).for_layer(layer)
    w = read_window(layer.dataProvider(), rect, 1024)
    w.region_mask = rasterize_geometry(geom, w)
    assert w.region_mask[0, 0] and not w.region_mask[-1, -1]
    sent = apply_region_mask(w)
    outside = ~w.region_mask
    assert sent.nodata[0] is not None and np.all(sent.data[:, outside] == sent.nodata[0])
    assert np.all(sent.data[:, w.region_mask] == 50)  # inside untouched
    header, arrays = build_request("Is there water?", [w])
    assert header["images"][0]["nodata"] == sent.nodata[0]
    assert arrays["image0"].shape == (3, 12, 16)
    floats = apply_region_mask(replace(w, data=w.data.astype(np.float32)))
    assert np.isnan(floats.data[:, outside]).all() and np.isnan(floats.nodata[0])
    assert (floats.data[:, w.region_mask] == 50).all()


def test_vrt_and_sar_in_db_read_like_any_raster(tmp_path):
    from osgeo import gdal

    db = (np.random.default_rng(3).normal(-15, 4, size=(2, 20, 24))).astype(np.float32)  # VV, VH in dB
    tif = write_geotiff(tmp_path / "s1.tif", db, GT, 32633, nodata=float("nan"))
    vrt = gdal.BuildVRT(str(tmp_path / "s1.vrt"), [str(tif)])
    vrt = None  # noqa: F841 - flush the VRT file
    layer = QgsRasterLayer(str(tmp_path / "s1.vrt"), "s1 vrt")
    assert layer.isValid() and layer.dataProvider().name() == "gdal"
    w = read_window(layer.dataProvider(), None, 1024, role="sar")
    np.testing.assert_allclose(w.data, db)
    assert w.role == "sar" and np.isnan(w.nodata[0]) and w.transform == GT
