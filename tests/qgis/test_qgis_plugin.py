"""The plugin loads and unloads cleanly; the Layers-panel action opens the dock on its layer; the zip installs."""

from __future__ import annotations

import gc
import sys
import zipfile

from qgis.core import QgsApplication, QgsMapLayerType, QgsProject, QgsRasterLayer
from qgis.PyQt.QtWidgets import QAction, QDockWidget
from qgislib import ATLANTA_UTM, REPO, process_events_until

from qgis_plugin import package


def _our_actions(iface) -> list[QAction]:
    return [a for a in iface.mainWindow().findChildren(QAction) if a.objectName().startswith("terrascope_")]


def _calls(iface, name: str) -> list:
    return list(getattr(iface, name).call_args_list)


def test_load_and_unload_leave_nothing_behind(qgis_iface, qgis_new_project, real_docks):
    import qgis_plugin

    registry = QgsApplication.processingRegistry()
    before_docks = len(qgis_iface.mainWindow().findChildren(QDockWidget))
    qgis_iface.removeCustomActionForLayerType.reset_mock()
    qgis_iface.addCustomActionForLayerType.reset_mock()

    plugin = qgis_plugin.classFactory(qgis_iface)
    plugin.initGui()
    assert registry.providerById("terrascope") is not None
    names = {a.name() for a in registry.providerById("terrascope").algorithms()}
    assert names == {"ask_batch", "ask_region"}
    assert len(_our_actions(qgis_iface)) == 3  # dock toggle, settings, layer action
    (added,) = _calls(qgis_iface, "addCustomActionForLayerType")
    assert added.args[2] == QgsMapLayerType.RasterLayer
    plugin.show_dock()
    assert plugin.dock is not None and plugin.dock.isVisibleTo(real_docks)
    assert plugin.manager.poller is not None and plugin.manager.poller.isRunning()

    plugin.unload()
    process_events_until(lambda: False, 0.2)  # let deleteLater() run
    gc.collect()
    assert registry.providerById("terrascope") is None
    assert _our_actions(qgis_iface) == []
    assert len(qgis_iface.mainWindow().findChildren(QDockWidget)) == before_docks
    (removed,) = _calls(qgis_iface, "removeCustomActionForLayerType")
    assert removed.args[0] is added.args[0]
    assert plugin.manager is None and plugin.dock is None


def test_load_twice_in_a_row(qgis_iface, qgis_new_project):
    """A plugin reload (unload + load) must not duplicate the provider or fail to register it."""
    import qgis_plugin

    for _ in range(2):
        p = qgis_plugin.classFactory(qgis_iface)
        p.initGui()
        assert QgsApplication.processingRegistry().providerById("terrascope") is not None
        p.unload()
    assert QgsApplication.processingRegistry().providerById("terrascope") is None


def test_right_click_action_opens_the_dock_on_that_layer(plugin, qgis_iface, real_docks):
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    other = QgsRasterLayer(str(ATLANTA_UTM), "other")
    QgsProject.instance().addMapLayers([other, layer])
    qgis_iface.setActiveLayer(layer)
    action = plugin.layer_action
    assert action.text() == "Ask TerraScope about this layer…"
    assert plugin.dock is None
    action.trigger()
    assert plugin.dock is not None and plugin.dock.isVisibleTo(real_docks)
    assert plugin.dock.optical_combo.currentLayer() is layer


def test_package_zip_installs_and_loads_with_qgis_own_loader(tmp_path, qgis_iface, qgis_new_project):
    """What Plugin Manager's "Install from ZIP" does: unzip into a plugins folder, then qgis.utils loads it
    (GUI start), and headless QGIS / qgis_process start only its Processing part."""
    import qgis.utils

    zip_path = package.build(tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "plugins")
        metadata = zf.read("terrascope/metadata.txt").decode()
    assert all(n.startswith("terrascope/") for n in names)
    for needed in ("__init__.py", "protocol.py", "client.py", "plugin.py", "metadata.txt", "icon.png"):
        assert f"terrascope/{needed}" in names
    assert not any(n.endswith("package.py") or "/worker/" in n or "/model/" in n for n in names)
    for field in ("name=TerraScope", "qgisMinimumVersion=3.22", "hasProcessingProvider=yes", "license=", "icon=",
                  "about=", "description=", "version="):
        assert field in metadata
    plugins_dir = str(tmp_path / "plugins")
    saved_paths = list(qgis.utils.plugin_paths)
    sys.path.insert(0, plugins_dir)
    qgis.utils.plugin_paths[:] = [plugins_dir]
    try:
        qgis.utils.updateAvailablePlugins()
        assert "terrascope" in qgis.utils.available_plugins
        assert qgis.utils.pluginMetadata("terrascope", "hasProcessingProvider") == "yes"
        assert qgis.utils.loadPlugin("terrascope")
        assert sys.modules["terrascope"].__file__.startswith(plugins_dir)
        assert qgis.utils.startPlugin("terrascope"), qgis_iface.messageBar().get_messages(2)
        assert QgsApplication.processingRegistry().providerById("terrascope") is not None
        assert qgis.utils.unloadPlugin("terrascope")
        assert QgsApplication.processingRegistry().providerById("terrascope") is None
        assert qgis.utils.loadPlugin("terrascope") and qgis.utils.startProcessingPlugin("terrascope")
        provider = QgsApplication.processingRegistry().providerById("terrascope")
        assert provider is not None and len(provider.algorithms()) == 2
        assert qgis.utils.unloadPlugin("terrascope")
        assert QgsApplication.processingRegistry().providerById("terrascope") is None
    finally:
        qgis.utils.plugin_paths[:] = saved_paths
        sys.path.remove(plugins_dir)
        for name in [m for m in sys.modules if m == "terrascope" or m.startswith("terrascope.")]:
            del sys.modules[name]


def test_package_refuses_heavy_imports(tmp_path):
    fake = tmp_path / "repo"
    (fake / "qgis_plugin").mkdir(parents=True)
    (fake / "qgis_plugin" / "__init__.py").write_text("import torch\n")
    try:
        package.files_to_pack(fake)
    except package.PackageError as exc:
        assert "torch" in str(exc)
    else:
        raise AssertionError("a plugin file importing torch was packaged")


def test_package_command_line(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "qgis_plugin.package", "--out", str(tmp_path)], cwd=REPO, check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "terrascope.zip").exists()
    assert "terrascope.zip" in out.stdout
