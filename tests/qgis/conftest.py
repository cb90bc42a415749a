"""Fixtures for the plugin in real QGIS (pytest-qgis starts QgsApplication offscreen)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from qgis.core import QgsApplication, QgsProject, QgsSettings
from qgislib import RealWorker, wait_for_tasks, worker_python

from qgis_plugin.settings import PREFIX, PluginSettings, save_settings


@pytest.fixture(autouse=True)
def clean_settings():
    """Every test starts from default TerraScope settings (in pytest-qgis's private profile)."""
    QgsSettings().remove(PREFIX.rstrip("/"))
    yield
    QgsSettings().remove(PREFIX.rstrip("/"))


@pytest.fixture(scope="session")
def worker(tmp_path_factory) -> RealWorker:
    """One real worker on the tiny fixture checkpoint, shared by the end-to-end tests."""
    w = RealWorker(tmp_path_factory.mktemp("worker"))
    try:
        w.info = w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture
def own_worker(tmp_path) -> RealWorker:
    """A worker of this test alone (tests that kill it)."""
    w = RealWorker(tmp_path / "own-worker")
    try:
        w.info = w.wait_ready()
        yield w
    finally:
        w.stop()


def use_settings(**kw) -> PluginSettings:
    settings = PluginSettings(**kw)
    save_settings(settings)
    return settings


@pytest.fixture
def real_docks(qgis_iface, monkeypatch):
    """pytest-qgis's iface ignores dock widgets; put them in its main window as QGIS does."""
    window = qgis_iface.mainWindow()
    monkeypatch.setattr(qgis_iface, "addDockWidget", lambda area, dock: window.addDockWidget(area, dock),
                        raising=False)
    monkeypatch.setattr(qgis_iface, "removeDockWidget", lambda dock: window.removeDockWidget(dock), raising=False)
    return window


@pytest.fixture
def plugin(qgis_iface, qgis_new_project, real_docks):
    """The plugin loaded the way QGIS loads it (classFactory + initGui), unloaded afterwards."""
    import qgis_plugin

    p = qgis_plugin.classFactory(qgis_iface)
    p.initGui()
    yield p
    p.unload()
    wait_for_tasks(30)
    QgsProject.instance().removeAllMapLayers()
    QgsProject.instance().layerTreeRoot().removeAllChildren()
    gc.collect()


@pytest.fixture(scope="session")
def worker_interpreter() -> str:
    return worker_python()


@pytest.fixture
def results_dir(tmp_path) -> Path:
    path = tmp_path / "results"
    path.mkdir()
    return path


def pytest_sessionfinish(session, exitstatus):
    QgsApplication.taskManager().cancelAll()
