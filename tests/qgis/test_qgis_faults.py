"""Cancel, a worker killed mid-answer, a managed worker restarted, bad rasters and no worker: one clear line,
no hang, a responsive UI."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from conftest import use_settings
from qgis.core import QgsProject, QgsRasterLayer
from qgislib import (
    ATLANTA_UTM,
    TINY_MODEL,
    UiProbe,
    free_endpoint,
    process_events_until,
    scene,
    wait_for_tasks,
    write_geotiff,
)

from qgis_plugin.client import WorkerClient
from qgis_plugin.worker_manager import CONNECTED, STARTING

LONG = 4000  # tokens: the tiny model never stops on its own before this (greedy, no EOS)


def _start_ask(plugin, question="Describe this image in detail.", layer=None):
    dock = plugin.show_dock()
    if layer is None:
        layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
        QgsProject.instance().addMapLayer(layer)
    dock.set_layer(layer)
    dock.question_edit.setPlainText(question)
    finished, tokens = [], []
    dock.askFinished.connect(finished.append)
    task = dock.ask()
    assert task is not None, dock.banner_label.text()
    task.textDelta.connect(tokens.append)
    return dock, task, finished, tokens


def _single_line(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text and len(text) <= 300


def test_cancel_in_the_middle_of_an_answer(plugin, worker, results_dir):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=LONG, output_dir=str(results_dir)))
    with UiProbe() as probe:
        dock, _task, finished, tokens = _start_ask(plugin)
        assert process_events_until(lambda: len(tokens) >= 5, 60), "no tokens streamed"
        assert dock.cancel_button.isEnabled() and not dock.ask_button.isEnabled()
        t0 = time.monotonic()
        dock.cancel()
        assert process_events_until(lambda: bool(finished), 10), "cancel did not end the ask"
        took = time.monotonic() - t0
    record = finished[0]
    assert record.error == "Cancelled." and not record.answer
    assert took < 3.0
    assert dock.ask_button.isEnabled() and not dock.cancel_button.isEnabled()
    assert not list(results_dir.iterdir()), "a cancelled ask writes no GeoPackage"
    assert probe.max_gap_ms < 100
    with WorkerClient(worker.endpoint, timeout_s=5) as c:  # the worker is free again
        assert c.ping()["state"] == "ready"
    assert wait_for_tasks(10)


def test_worker_killed_mid_answer_reports_within_5_s(plugin, own_worker, results_dir):
    plugin.manager.apply_settings(use_settings(endpoint=own_worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=LONG, output_dir=str(results_dir)))
    with UiProbe() as probe:
        dock, _task, finished, tokens = _start_ask(plugin)
        assert process_events_until(lambda: len(tokens) >= 5, 60), "no tokens streamed"
        own_worker.kill()
        t0 = time.monotonic()
        assert process_events_until(lambda: bool(finished), 8), "no message after the worker died"
        took = time.monotonic() - t0
    record = finished[0]
    assert took < 5.0, f"reported after {took:.1f} s"
    assert "worker" in record.error.lower() and _single_line(record.error), record.error
    assert dock.banner.isVisibleTo(dock) and _single_line(dock.banner_label.text())
    assert dock.ask_button.isEnabled()
    assert probe.max_gap_ms < 100
    assert wait_for_tasks(10), "the ask task hangs"


def test_managed_worker_killed_offers_restart_and_serves_again(plugin, worker_interpreter, results_dir):
    endpoint = free_endpoint()
    settings = use_settings(endpoint=endpoint, auto_start=True, python=worker_interpreter, model=str(TINY_MODEL),
                            device="cpu", max_side=128, max_new_tokens=LONG, output_dir=str(results_dir))
    manager = plugin.manager
    manager.apply_settings(settings)
    dock = plugin.show_dock()  # starts the status poller
    # Asking with no worker running auto-starts one and waits for its model.
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    dock, _task, finished, tokens = _start_ask(plugin, layer=layer)
    assert manager.is_running()
    assert process_events_until(lambda: len(tokens) >= 3, 120), manager.log_tail()
    pid = manager.process.processId()
    deaths = []
    manager.workerDied.connect(deaths.append)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert process_events_until(lambda: bool(finished) and bool(deaths), 5), "no report of the dead worker"
    assert time.monotonic() - t0 < 5.0
    assert "crashed" in deaths[0] or "exited" in deaths[0]
    assert dock.banner.isVisibleTo(dock) and dock.banner_restart.isVisibleTo(dock)
    assert "worker" in finished[0].error.lower()
    # The banner's restart button brings a worker back, and it answers.
    dock.banner_restart.click()
    assert process_events_until(lambda: manager.is_running(), 5)
    assert process_events_until(lambda: manager.status.state == CONNECTED, 120), manager.status
    assert manager.status.device == "cpu" and manager.status.model
    settings.max_new_tokens = 8
    manager.apply_settings(use_settings(**settings.__dict__))
    finished.clear()
    dock.question_edit.setPlainText("Is there water?")
    assert dock.ask() is not None
    assert process_events_until(lambda: bool(finished), 60)
    assert finished[0].error == "" and finished[0].answer
    # Stop from the dock's button: the process ends and the status says so.
    dock.stop_button.click()
    assert process_events_until(lambda: not manager.is_running(), 10)
    assert manager.status.state in ("stopped", STARTING) or not manager.is_running()


def test_all_nodata_raster_is_one_clear_line(plugin, worker, results_dir, tmp_path):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=8, output_dir=str(results_dir)))
    data = np.zeros((3, 32, 32), np.uint16)
    path = write_geotiff(tmp_path / "empty.tif", data, (500000, 10, 0, 4100000, 0, -10), 32630, nodata=0)
    layer = QgsRasterLayer(str(path), "empty")
    QgsProject.instance().addMapLayer(layer)
    _dock, _task, finished, _ = _start_ask(plugin, "Is there water?", layer)
    assert process_events_until(lambda: bool(finished), 30)
    error = finished[0].error
    assert error.startswith("This raster cannot be used") and _single_line(error), error
    assert "nodata" in error.lower() or "valid" in error.lower()


def test_no_worker_and_no_auto_start_is_one_clear_line(plugin, results_dir):
    plugin.manager.apply_settings(use_settings(endpoint=free_endpoint(), auto_start=False, request_timeout_s=1.0,
                                               output_dir=str(results_dir)))
    with UiProbe() as probe:
        _dock, _task, finished, _ = _start_ask(plugin, "Is there water?")
        assert process_events_until(lambda: bool(finished), 10)
    error = finished[0].error
    assert error.startswith("No TerraScope worker reachable at") and _single_line(error), error
    assert probe.max_gap_ms < 100


def test_refused_input_is_one_line_and_starts_nothing(plugin, results_dir, tmp_path):
    plugin.manager.apply_settings(use_settings(auto_start=False, output_dir=str(results_dir)))
    dock = plugin.show_dock()
    dock.set_layer(None)
    dock.question_edit.setPlainText("Is there water?")
    assert dock.ask() is None and dock.banner_label.text() == "Pick a raster layer first."
    path = write_geotiff(tmp_path / "s.tif", scene(), (500000, 10, 0, 4100000, 0, -10), 32630)
    layer = QgsRasterLayer(str(path), "s")
    QgsProject.instance().addMapLayer(layer)
    dock.set_layer(layer)
    dock.question_edit.setPlainText("   ")
    assert dock.ask() is None and dock.banner_label.text() == "Type a question first."
    dock.question_edit.setPlainText("Which?")
    dock.options_edit.setPlainText("A. only one")
    assert dock.ask() is None and "two options" in dock.banner_label.text()
    dock.options_edit.clear()
    dock.region_combo.setCurrentIndex(dock.region_combo.findData("rectangle"))
    assert dock.ask() is None and "Draw a rectangle" in dock.banner_label.text()
    assert dock.task is None


def _ask_layer(plugin, layer, question: str, timeout_s: float = 60):
    dock = plugin.show_dock()
    dock.set_layer(layer)
    dock.question_edit.setPlainText(question)
    finished = []
    dock.askFinished.connect(finished.append)
    task = dock.ask()
    assert task is not None, dock.banner_label.text()
    assert process_events_until(lambda: bool(finished), timeout_s)
    return finished[0]


@pytest.mark.parametrize("case", ["one_row", "huge_question", "nan_everywhere"])
def test_bad_inputs_through_the_dock_are_one_clear_line(plugin, worker, results_dir, tmp_path, case):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=4, output_dir=str(results_dir)))
    gt = (500000, 10, 0, 4100000, 0, -10)
    question = "Is there water?"
    if case == "one_row":
        path = write_geotiff(tmp_path / "row.tif", scene(1, 40), gt, 32630)
    elif case == "nan_everywhere":
        path = write_geotiff(tmp_path / "nan.tif", np.full((3, 16, 16), np.nan, np.float32), gt, 32630)
    else:
        path = write_geotiff(tmp_path / "ok.tif", scene(), gt, 32630)
        question = "Why? " * 4000
    layer = QgsRasterLayer(str(path), case)
    QgsProject.instance().addMapLayer(layer)
    record = _ask_layer(plugin, layer, question)
    assert record.error and _single_line(record.error), record.error
    assert record.error.startswith(("This raster cannot be used", "The request was refused")), record.error
    with WorkerClient(worker.endpoint, timeout_s=5) as c:
        assert c.ping()["state"] == "ready"


def test_raster_without_crs_answers_with_pixel_units_only(plugin, worker, results_dir, tmp_path):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=4, output_dir=str(results_dir)))
    path = write_geotiff(tmp_path / "nocrs.tif", scene(), (0, 1, 0, 0, 0, -1), None)
    layer = QgsRasterLayer(str(path), "nocrs")
    QgsProject.instance().addMapLayer(layer)
    record = _ask_layer(plugin, layer, "Is there water?")
    assert record.error == "" and record.answer
    assert all(s.area_ha is None for s in record.steps)


def test_complex_sar_layer_is_sent_and_answered(plugin, worker, results_dir, tmp_path):
    plugin.manager.apply_settings(use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128,
                                               max_new_tokens=4, output_dir=str(results_dir)))
    rng = np.random.default_rng(2)
    slc = (rng.normal(size=(1, 40, 40)) + 1j * rng.normal(size=(1, 40, 40))).astype(np.complex64)
    optical = QgsRasterLayer(str(write_geotiff(tmp_path / "o.tif", scene(40, 40), (500000, 10, 0, 4100000, 0, -10),
                                               32630)), "optical")
    sar = QgsRasterLayer(str(write_geotiff(tmp_path / "slc.tif", slc, (500000, 10, 0, 4100000, 0, -10), 32630)),
                         "slc")
    QgsProject.instance().addMapLayers([optical, sar])
    dock = plugin.show_dock()
    dock.sar_combo.setLayer(sar)
    record = _ask_layer(plugin, optical, "Is there flooding?")
    assert record.error == "" and record.layer_names == ["optical", "slc"]
