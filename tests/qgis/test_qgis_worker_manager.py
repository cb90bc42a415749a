"""The worker manager: status lines, a worker that cannot start, unloading in the middle of an answer."""

from __future__ import annotations

import sys

from conftest import use_settings
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgislib import ATLANTA_UTM, free_endpoint, process_events_until, wait_for_tasks

from qgis_plugin.settings import PluginSettings
from qgis_plugin.worker_manager import (
    BUSY,
    CONNECTED,
    FAILED,
    STARTING,
    WorkerManager,
    WorkerStatus,
    gpu_text,
    status_from,
    worker_command,
)


def test_status_lines_from_pong_and_info():
    info = {"state": "ready", "device": "cuda", "model": {"name": "terrascope-8b"}, "limits": {"max_side": 2048},
            "gpu": {"name": "NVIDIA H100", "memory_total_bytes": 80 * 2**30, "memory_free_bytes": 60 * 2**30}}
    idle = status_from({"state": "ready", "queue_length": 0, "running": 0}, info)
    assert idle.state == CONNECTED and idle.max_side == 2048
    assert idle.summary() == "Connected · cuda · NVIDIA H100 20.0/80 GB · terrascope-8b"
    assert status_from({"state": "ready", "running": 1}, info).state == BUSY
    assert status_from({"state": "loading"}, info).state == STARTING
    failed = status_from({"state": "failed"}, {"state": "failed", "error": "no such checkpoint\n  at line 3"})
    assert failed.state == FAILED and failed.message == "no such checkpoint at line 3"
    assert gpu_text(None) == "" and gpu_text({"name": "T4"}) == "T4"
    assert WorkerStatus().summary() == "Unreachable"


def test_worker_command_needs_an_interpreter():
    program, args = worker_command(PluginSettings(python="/venv/bin/python", model="m", device="cpu"))
    assert program == "/venv/bin/python" and args[:3] == ["-m", "worker.cli", "worker"]
    assert args[args.index("--device") + 1] == "cpu" and args[args.index("--model") + 1] == "m"
    try:
        worker_command(PluginSettings(python=""))
    except ValueError as exc:
        assert "Python interpreter" in str(exc)
    else:
        raise AssertionError("no interpreter accepted")


def test_a_worker_that_cannot_start_says_why_in_one_line(qgis_app, tmp_path):
    manager = WorkerManager(PluginSettings(endpoint=free_endpoint(), python=str(tmp_path / "no-python")))
    died = []
    manager.workerDied.connect(died.append)
    manager.start()
    assert process_events_until(lambda: bool(died), 10)
    assert "could not be started" in died[0] and "\n" not in died[0]
    # An interpreter without the worker package exits at once: the message quotes its last line.
    manager.settings = PluginSettings(endpoint=free_endpoint(), python=sys.executable)
    died.clear()
    manager.start()
    assert process_events_until(lambda: bool(died), 20)
    assert "exited with code 1" in died[0] and "worker" in died[0].lower() and "\n" not in died[0]
    assert not manager.is_running()
    manager.shutdown()


def test_remote_endpoint_is_not_auto_started(qgis_app):
    manager = WorkerManager(PluginSettings(endpoint="tcp://10.1.2.3:5557", python=sys.executable))
    try:
        manager.start()
    except ValueError as exc:
        assert "not on this machine" in str(exc)
    else:
        raise AssertionError("a remote endpoint was started locally")


def test_unload_in_the_middle_of_an_answer(qgis_iface, qgis_new_project, real_docks, worker, results_dir):
    import qgis_plugin

    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=128, max_new_tokens=4000,
                 output_dir=str(results_dir))
    plugin = qgis_plugin.classFactory(qgis_iface)
    plugin.initGui()
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    dock = plugin.show_dock()
    dock.set_layer(layer)
    dock.question_edit.setPlainText("Describe everything.")
    tokens = []
    task = dock.ask()
    task.textDelta.connect(tokens.append)
    assert process_events_until(lambda: len(tokens) >= 3, 60)
    plugin.unload()
    assert wait_for_tasks(15), "the ask task outlived the plugin"
    assert QgsApplication.processingRegistry().providerById("terrascope") is None
    assert not list(results_dir.iterdir())
