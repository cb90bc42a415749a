"""An XYZ layer (local tiles through QGIS's web map provider) is rendered at the canvas resolution and asked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import use_settings
from qgis.core import QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.PyQt.QtCore import QUrl
from qgis.PyQt.QtGui import QColor, QImage
from qgislib import process_events_until

from qgis_plugin.web_render import is_web_layer, output_size

COLOURS = {(0, 0): "#ff0000", (1, 0): "#00ff00", (0, 1): "#0000ff", (1, 1): "#ffff00"}


@pytest.fixture
def xyz_layer(tmp_path, qgis_new_project):
    for (x, y), colour in COLOURS.items():
        (tmp_path / "tiles" / "1" / str(x)).mkdir(parents=True, exist_ok=True)
        img = QImage(256, 256, QImage.Format_RGB32)
        img.fill(QColor(colour))
        assert img.save(str(tmp_path / "tiles" / "1" / str(x) / f"{y}.png"))
    url = QUrl.fromLocalFile(str(tmp_path / "tiles")).toString() + "/%7Bz%7D/%7Bx%7D/%7By%7D.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=1&zmax=1", "tiles", "wms")
    assert layer.isValid() and is_web_layer(layer)
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_output_size_follows_the_canvas_resolution():
    assert output_size(QgsRectangle(0, 0, 1000, 500), 10, 2048).width() == 100
    small = output_size(QgsRectangle(0, 0, 1000, 500), 1, 256)
    assert (small.width(), small.height()) == (256, 128)


def test_web_layer_is_rendered_on_the_canvas_grid_and_asked(plugin, worker, xyz_layer, qgis_canvas, results_dir):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=4, output_dir=str(results_dir)))
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setExtent(QgsRectangle(-1e7, -1e7, 1e7, 1e7))
    qgis_canvas.refresh()
    dock = plugin.show_dock()
    dock.set_layer(xyz_layer)
    dock.question_edit.setPlainText("What colour is the north-west?")
    dock.region_combo.setCurrentIndex(dock.region_combo.findData("whole"))
    assert dock.ask() is None and "web map" in dock.banner_label.text()
    dock.region_combo.setCurrentIndex(dock.region_combo.findData("canvas"))
    finished = []
    dock.askFinished.connect(finished.append)
    task = dock.ask()
    assert task is not None, dock.banner_label.text()
    assert process_events_until(lambda: bool(finished), 60)
    assert finished[0].error == "", finished[0].error
    (window,) = task.windows
    assert QgsCoordinateReferenceSystem.fromWkt(window.crs_wkt).authid() == "EPSG:3857"
    assert 0 < max(window.shape) <= 128 and window.data.shape[0] == 3 and window.data.dtype == np.uint8
    extent = window.extent()
    canvas_extent = qgis_canvas.extent()
    assert extent.xMinimum() == pytest.approx(canvas_extent.xMinimum(), rel=1e-6)
    assert extent.yMaximum() == pytest.approx(canvas_extent.yMaximum(), rel=1e-6)
    # The north-west tile is red and the south-east one yellow, where the transform says they are.
    rows, cols = window.shape
    x0, px, _, y0, _, py = window.transform

    def pixel_at(x: float, y: float) -> tuple:
        return tuple(window.data[:, int((y - y0) / py), int((x - x0) / px)])

    # The canvas extent is centred on (0, 0): its north-west quarter is in the red tile, its south-east in the
    # yellow one, at the map coordinates the window's transform gives.
    w, h = extent.width(), extent.height()
    assert pixel_at(extent.xMinimum() + w / 4, extent.yMaximum() - h / 4) == (255, 0, 0)
    assert pixel_at(extent.xMaximum() - w / 4, extent.yMinimum() + h / 4) == (255, 255, 0)
    assert rows * cols > 100
