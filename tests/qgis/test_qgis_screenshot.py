"""A screenshot of the dock after an answer (docs/screenshot-dock.png comes from here).

Reusable: by default it runs on the tiny fixture checkpoint (random weights: gibberish text, but every
widget, the step card with its mask thumbnail and the answer are real). To refresh the README image with
a trained model:

    TERRASCOPE_SCREENSHOT_MODEL=resources/models/terrascope-mini TERRASCOPE_SCREENSHOT_OUT=docs/screenshot-dock.png \\
        .venv-qgis/bin/python -m pytest tests/qgis/test_qgis_screenshot.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from conftest import use_settings
from qgis.core import QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QImage
from qgislib import ATLANTA_UTM, REPO, RealWorker, find_seg_seed, process_events_until

from qgis_plugin.rasters import read_window

SIZE = (460, 900)
QUESTION = "Where are the buildings, and how much ground do they cover?"


def take_dock_screenshot(plugin, endpoint: str, out: Path, results_dir: Path, sampled: bool) -> QImage:
    layer = QgsRasterLayer(str(ATLANTA_UTM), "SpaceNet Atlanta (WorldView-2, 0.5 m)")
    QgsProject.instance().addMapLayer(layer)
    max_side = 256
    gen = {"max_new_tokens": 256}
    if sampled:  # the random-weight fixture only says [SEG] when sampling with a searched seed
        seed = find_seg_seed(endpoint, QUESTION, [read_window(layer.dataProvider(), None, max_side,
                                                              name=layer.name())], budget_tokens=400)
        gen = {"max_new_tokens": 400, "max_seg": 1, "temperature": 5.0, "seed": seed}
    plugin.manager.apply_settings(use_settings(endpoint=endpoint, auto_start=False, max_side=max_side,
                                               output_dir=str(results_dir), **gen))
    dock = plugin.show_dock()
    dock.setFloating(True)
    dock.resize(*SIZE)
    dock.show()
    dock.set_layer(layer)
    dock.question_edit.setPlainText(QUESTION)
    finished = []
    dock.askFinished.connect(finished.append)
    assert dock.ask() is not None, dock.banner_label.text()
    assert process_events_until(lambda: bool(finished), 180), "no answer"
    assert finished[0].error == "", finished[0].error
    process_events_until(lambda: plugin.manager.status.state == "connected", 5)
    process_events_until(lambda: False, 0.3)
    image = dock.grab().toImage()
    out.parent.mkdir(parents=True, exist_ok=True)
    assert image.save(str(out)), f"cannot write {out}"
    return image


def test_dock_screenshot_after_an_answer(plugin, worker, tmp_path):
    model = os.environ.get("TERRASCOPE_SCREENSHOT_MODEL")
    out = Path(os.environ.get("TERRASCOPE_SCREENSHOT_OUT") or tmp_path / "screenshot-dock.png")
    if not out.is_absolute():
        out = REPO / out
    if model:
        own = RealWorker(tmp_path / "shot-worker", "--model", model)
        try:
            own.wait_ready()
            image = take_dock_screenshot(plugin, own.endpoint, out, tmp_path / "results", sampled=False)
        finally:
            own.stop()
    else:
        image = take_dock_screenshot(plugin, worker.endpoint, out, tmp_path / "results", sampled=True)
    assert (image.width(), image.height()) == SIZE
    ptr = image.convertToFormat(QImage.Format_RGB888)
    pixels = np.frombuffer(ptr.constBits().asstring(ptr.sizeInBytes()), np.uint8)
    assert pixels.std() > 20, "the screenshot is blank"
    # The answer box's green and the first step's red are on screen.
    rgb = pixels[: ptr.height() * ptr.bytesPerLine()].reshape(ptr.height(), ptr.bytesPerLine())[:, : 3 * ptr.width()]
    rgb = rgb.reshape(ptr.height(), ptr.width(), 3).astype(int)
    answer_green = (np.abs(rgb - [0xEE, 0xF6, 0xEE]).sum(axis=2) < 6).sum()
    step_red = (np.abs(rgb - [0xE4, 0x1A, 0x1C]).sum(axis=2) < 30).sum()
    assert answer_green > 500 and step_red > 20, (answer_green, step_red)
    assert Qt  # keep the Qt import for readers running this by hand
