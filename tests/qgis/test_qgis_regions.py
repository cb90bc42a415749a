"""The dock's regions end to end: current map extent, a drawn rectangle, and a selected polygon."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import use_settings
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgislib import ATLANTA_UTM, process_events_until

from qgis_plugin.region import RECTANGLE, Region
from qgis_plugin.request import apply_region_mask


def _ask(dock, timeout=60):
    finished = []
    dock.askFinished.connect(finished.append)
    task = dock.ask()
    assert task is not None, dock.banner_label.text()
    assert process_events_until(lambda: bool(finished), timeout)
    assert finished[0].error == "", finished[0].error
    return task


@pytest.fixture
def dock(plugin, worker, results_dir):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=512,
                                               max_new_tokens=4, output_dir=str(results_dir)))
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    d = plugin.show_dock()
    d.set_layer(layer)
    d.question_edit.setPlainText("Is there a road?")
    return d


def test_drawn_rectangle_in_geographic_coordinates(dock):
    layer = dock.optical_combo.currentLayer()
    ext = layer.extent()  # UTM 16N, 450 m square
    inner = QgsRectangle(ext.xMinimum() + 100, ext.yMinimum() + 100, ext.xMinimum() + 200, ext.yMinimum() + 150)
    from qgis.core import QgsCoordinateTransform

    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    to_wgs = QgsCoordinateTransform(layer.crs(), wgs84, QgsProject.instance())
    dock.set_drawn_rectangle(Region(RECTANGLE, to_wgs.transformBoundingBox(inner), wgs84))
    task = _ask(dock)
    (window,) = task.windows
    got = window.extent()
    assert got.contains(inner) and got.width() < 130 and got.height() < 80  # the rectangle, not the layer
    assert window.decimation == 1 and window.transform[1] == 0.5  # native 0.5 m pixels


def test_selected_polygon_limits_what_the_worker_measures(dock):
    layer = dock.optical_combo.currentLayer()
    ext = layer.extent()
    poly = QgsVectorLayer(f"Polygon?crs={layer.crs().authid()}", "fields", "memory")
    f = QgsFeature()
    x0, y0 = ext.xMinimum() + 50, ext.yMinimum() + 50
    f.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({x0} {y0}, {x0 + 200} {y0}, {x0} {y0 + 200}, {x0} {y0}))"))
    poly.dataProvider().addFeatures([f])
    QgsProject.instance().addMapLayer(poly)
    dock.region_combo.setCurrentIndex(dock.region_combo.findData("polygon"))
    dock.polygon_combo.setLayer(poly)
    assert dock.ask() is None and "Select one or more polygons" in dock.banner_label.text()
    poly.selectAll()
    task = _ask(dock)
    (window,) = task.windows
    inside = window.region_mask
    assert inside is not None and inside.shape == window.shape
    frac = inside.mean()
    assert 0.45 < frac < 0.55  # a right triangle fills half of its bounding box
    assert inside[-1, 0] and not inside[0, -1]  # the right angle is at the south-west corner
    sent = apply_region_mask(window)  # what the request carried: outside pixels are nodata for the worker
    assert sent.nodata[0] is not None and np.all(sent.data[:, ~inside] == sent.nodata[0])
    assert np.array_equal(sent.data[:, inside], window.data[:, inside])
