"""The plugin object QGIS loads: actions, menu, toolbar button, dock, Layers-panel action, Processing.

Everything added in `initGui` is removed in `unload`, so reloading the plugin leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsApplication, QgsMapLayerType, QgsRasterLayer
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .dock import AskDock
from .processing_provider import TerraScopeProvider
from .settings import load_settings
from .worker_manager import WorkerManager

MENU = "&TerraScope"
ACTION_PREFIX = "terrascope_"


def icon_path() -> Path:
    """The plugin icon: next to the code in an installed plugin, under resources/ in the repository."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "icon.png", here.parent / "resources" / "icons" / "terrascope.png"):
        if candidate.exists():
            return candidate
    return here / "icon.png"


def plugin_icon() -> QIcon:
    path = icon_path()
    return QIcon(str(path)) if path.exists() else QgsApplication.getThemeIcon("mActionIdentify.svg")


class TerraScopePlugin:
    def __init__(self, iface):
        self.iface = iface
        self.actions: list[QAction] = []
        self.layer_action: QAction | None = None
        self.dock: AskDock | None = None
        self.manager: WorkerManager | None = None
        self.provider: TerraScopeProvider | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def initProcessing(self) -> None:
        """Register the Processing provider (all that qgis_process and headless QGIS call)."""
        if self.provider is None:
            self.provider = TerraScopeProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        self.manager = WorkerManager(load_settings())
        icon = plugin_icon()
        window = self.iface.mainWindow()
        ask = self._action("ask", icon, "Ask TerraScope", self.toggle_dock, window)
        ask.setCheckable(True)
        self._action("settings", QgsApplication.getThemeIcon("mActionOptions.svg"), "TerraScope Settings…",
                     self.show_settings, window)
        self.iface.addToolBarIcon(ask)
        for action in self.actions:
            self.iface.addPluginToMenu(MENU, action)
        self.layer_action = QAction(icon, "Ask TerraScope about this layer…", window)
        self.layer_action.setObjectName(ACTION_PREFIX + "layer")
        self.layer_action.triggered.connect(self.ask_about_current_layer)
        self.iface.addCustomActionForLayerType(self.layer_action, "", QgsMapLayerType.RasterLayer, True)

    def _action(self, name: str, icon: QIcon, text: str, slot, parent) -> QAction:
        action = QAction(icon, text, parent)
        action.setObjectName(ACTION_PREFIX + name)
        action.triggered.connect(lambda _checked=False: slot())
        self.actions.append(action)
        return action

    def unload(self) -> None:
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        for action in self.actions:
            self.iface.removePluginMenu(MENU, action)
            self.iface.removeToolBarIcon(action)
            action.setParent(None)
            action.deleteLater()
        self.actions = []
        if self.layer_action is not None:
            self.iface.removeCustomActionForLayerType(self.layer_action)
            self.layer_action.setParent(None)
            self.layer_action.deleteLater()
            self.layer_action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        if self.manager is not None:
            self.manager.shutdown()
            self.manager.deleteLater()
            self.manager = None

    # --- actions ----------------------------------------------------------------------------
    def ensure_dock(self) -> AskDock:
        if self.dock is None:
            assert self.manager is not None
            self.dock = AskDock(self.iface, self.manager, self.iface.mainWindow())
            self.dock.settingsRequested.connect(self.show_settings)
            self.dock.visibilityChanged.connect(self._dock_visibility)
            self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
            self.manager.start_polling()
        return self.dock

    def _dock_visibility(self, visible: bool) -> None:
        if self.actions:
            self.actions[0].setChecked(visible)

    def toggle_dock(self) -> None:
        dock = self.ensure_dock()
        dock.setUserVisible(not dock.isUserVisible())

    def show_dock(self) -> AskDock:
        dock = self.ensure_dock()
        dock.setUserVisible(True)
        dock.raise_()
        return dock

    def ask_about_current_layer(self) -> None:
        """Layers panel right-click: open the dock set to the clicked raster layer."""
        layer = self.iface.activeLayer()
        dock = self.show_dock()
        if isinstance(layer, QgsRasterLayer):
            dock.set_layer(layer)
            dock.question_edit.setFocus()

    def show_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        assert self.manager is not None
        dialog = SettingsDialog(self.manager.settings, self.iface.mainWindow())
        if dialog.exec_():
            self.manager.apply_settings(dialog.saved)
