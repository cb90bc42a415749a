"""The "Ask TerraScope" dock: pick layers and a region, ask, watch the reasoning stream, get layers back."""

from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsTask,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsMapLayerComboBox, QgsMapToolExtent
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QStandardPaths, Qt, pyqtSignal
from qgis.PyQt.QtGui import QImage
from qgis.PyQt.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .ask_task import AskSpec, AskTask, SourceSpec
from .client import WorkerUnavailable
from .errors import one_line
from .geometry import effective_ellipsoid
from .layers import LoadResultsTask, add_results, find_group
from .output_view import OutputView
from .record import AskRecord, StepRecord, to_markdown
from .region import (
    CANVAS,
    POLYGON,
    RECTANGLE,
    REGION_LABELS,
    WHOLE,
    Region,
    RegionError,
    selected_polygon_region,
)
from .settings import PluginSettings, SettingsError
from .web_render import RenderRequest, WebRenderer, is_web_layer
from .worker_manager import BUSY, CONNECTED, FAILED, STARTING, UNREACHABLE, WorkerManager, make_client

EXAMPLES = [
    "What share of this area is covered by water?",
    "Which areas are flooded? Give the flooded area in hectares.",
    "How many buildings are in this image?",
    "What changed between the two dates?",
    "Is there more vegetation or more built-up land here?",
    "How far is the river from the nearest building?",
]
STATE_COLORS = {CONNECTED: "#2e9e44", BUSY: "#e6a100", STARTING: "#e6a100", UNREACHABLE: "#c62828",
                FAILED: "#c62828"}


def results_folder(settings: PluginSettings, project: QgsProject | None = None) -> Path:
    """Where GeoPackages go: the chosen folder, else `<project folder>/TerraScope`, else ~/Documents."""
    if settings.output_dir:
        return Path(settings.output_dir)
    project = project or QgsProject.instance()
    if project.fileName():
        return Path(project.absolutePath()) / "TerraScope"
    docs = QStandardPaths.writableLocation(QStandardPaths.DocumentsLocation) or str(Path.home())
    return Path(docs) / "TerraScope"


def narrow(combo: QComboBox) -> QComboBox:
    """Long layer names or examples must not widen the dock."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
    return combo


def raster_combo(parent: QWidget, allow_empty: bool = False) -> QgsMapLayerComboBox:
    combo = QgsMapLayerComboBox(parent)
    narrow(combo)
    combo.setFilters(QgsMapLayerProxyModel.RasterLayer)
    combo.setAllowEmptyLayer(allow_empty)
    if allow_empty:
        combo.setLayer(None)
    return combo


class AskDock(QgsDockWidget):
    """The dock. `ask()` starts a question; signals tell tests and the plugin what happened."""

    askFinished = pyqtSignal(object)
    settingsRequested = pyqtSignal()

    def __init__(self, iface, manager: WorkerManager, parent: QWidget | None = None):
        super().__init__("Ask TerraScope", parent)
        self.setObjectName("TerraScopeAskDock")
        self.iface = iface
        self.manager = manager
        self.history: list[AskRecord] = []
        self.thumbs: dict[int, dict[int, QImage]] = {}
        self.task: AskTask | None = None
        self.current: AskRecord | None = None
        self._drawn: Region | None = None
        self._map_tool: QgsMapToolExtent | None = None
        self._renderer: WebRenderer | None = None
        self._reloads: list[LoadResultsTask] = []
        self._connections: tuple = ()
        self._build()
        manager.statusChanged.connect(self.show_status)
        manager.workerDied.connect(self._on_worker_died)
        self.show_status(manager.status)

    # --- building ---------------------------------------------------------------------------
    def _build(self) -> None:
        root = QWidget(self)
        outer = QVBoxLayout(root)
        outer.setContentsMargins(6, 6, 6, 6)
        outer.addLayout(self._status_row(root))
        outer.addWidget(self._banner(root))
        inputs = self._inputs(root)
        inputs.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)
        outer.addWidget(inputs)
        outer.addWidget(self._outputs(root), 1)
        self.setWidget(root)
        self.setMinimumWidth(320)

    def _status_row(self, parent: QWidget) -> QHBoxLayout:
        row = QHBoxLayout()
        self.status_dot = QLabel("●", parent)
        self.status_label = QLabel(parent)
        self.status_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        row.addWidget(self.status_dot)
        row.addWidget(self.status_label, 1)
        self.start_button = self._tool(parent, "mActionPlay.svg", "Start the local worker", self._start_worker)
        self.stop_button = self._tool(parent, "mActionStop.svg", "Stop the local worker", self.manager.stop)
        self.restart_button = self._tool(parent, "mActionRefresh.svg", "Restart the local worker", self._restart)
        self.settings_button = self._tool(parent, "mActionOptions.svg", "TerraScope settings",
                                          self.settingsRequested.emit)
        for b in (self.start_button, self.stop_button, self.restart_button, self.settings_button):
            row.addWidget(b)
        return row

    def _tool(self, parent: QWidget, icon: str, tip: str, slot) -> QToolButton:
        button = QToolButton(parent)
        button.setIcon(QgsApplication.getThemeIcon(icon))
        button.setToolTip(tip)
        button.setAutoRaise(True)
        button.clicked.connect(lambda _checked=False: slot())
        return button

    def _banner(self, parent: QWidget) -> QFrame:
        self.banner = QFrame(parent)
        self.banner.setObjectName("terrascopeBanner")
        self.banner.setStyleSheet("#terrascopeBanner { background:#fdecea; border:1px solid #e0a4a0; "
                                  "border-radius:4px; }")
        row = QHBoxLayout(self.banner)
        row.setContentsMargins(6, 4, 6, 4)
        self.banner_label = QLabel(self.banner)
        self.banner_label.setWordWrap(True)
        self.banner_restart = QPushButton("Restart worker", self.banner)
        self.banner_restart.clicked.connect(self._restart)
        close = QToolButton(self.banner)
        close.setText("✕")
        close.setAutoRaise(True)
        close.clicked.connect(self.banner.hide)
        row.addWidget(self.banner_label, 1)
        row.addWidget(self.banner_restart)
        row.addWidget(close)
        self.banner.hide()
        return self.banner

    def _inputs(self, parent: QWidget) -> QWidget:
        box = QWidget(parent)
        form = QFormLayout(box)
        form.setContentsMargins(0, 0, 0, 0)
        self.optical_combo = raster_combo(box)
        self.sar_combo = raster_combo(box, allow_empty=True)
        form.addRow("Image", self.optical_combo)
        form.addRow("SAR (optional)", self.sar_combo)
        form.addRow(self._series_box(box))
        region_row = QHBoxLayout()
        self.region_combo = narrow(QComboBox(box))
        for key in (WHOLE, CANVAS, RECTANGLE, POLYGON):
            self.region_combo.addItem(REGION_LABELS[key], key)
        self.draw_button = QPushButton("Draw", box)
        self.draw_button.setToolTip("Drag a rectangle on the map")
        self.draw_button.clicked.connect(self._draw_rectangle)
        region_row.addWidget(self.region_combo, 1)
        region_row.addWidget(self.draw_button)
        form.addRow("Region", region_row)
        self.polygon_combo = narrow(QgsMapLayerComboBox(box))
        self.polygon_combo.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.polygon_combo.setAllowEmptyLayer(True)
        self.polygon_combo.setLayer(None)
        self.polygon_label = QLabel("Polygons from", box)
        form.addRow(self.polygon_label, self.polygon_combo)
        self.region_combo.currentIndexChanged.connect(self._region_changed)
        self._region_changed()
        self.question_edit = QPlainTextEdit(box)
        self.question_edit.setPlaceholderText("Ask a question about the image, e.g. " + EXAMPLES[0])
        self.question_edit.setMaximumHeight(64)
        form.addRow("Question", self.question_edit)
        self.examples_combo = narrow(QComboBox(box))
        self.examples_combo.addItem("Examples…")
        self.examples_combo.addItems(EXAMPLES)
        self.examples_combo.activated.connect(self._use_example)
        form.addRow("", self.examples_combo)
        self.options_box = QgsCollapsibleGroupBox("Multiple-choice options (optional)", box)
        self.options_box.setCollapsed(True)
        ob = QVBoxLayout(self.options_box)
        self.options_edit = QPlainTextEdit(self.options_box)
        self.options_edit.setPlaceholderText("One option per line, e.g.\nA. Less than 10%\nB. 10-50%\nC. More than 50%")
        self.options_edit.setMaximumHeight(70)
        ob.addWidget(self.options_edit)
        form.addRow(self.options_box)
        buttons = QHBoxLayout()
        self.ask_button = QPushButton("Ask", box)
        self.ask_button.setDefault(True)
        self.ask_button.setStyleSheet("font-weight:bold; padding:4px 18px;")
        self.ask_button.clicked.connect(self.ask)
        self.cancel_button = QPushButton("Cancel", box)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar(box)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.progress.setFormat("Ready")
        buttons.addWidget(self.ask_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        form.addRow(buttons)
        return box

    def _series_box(self, parent: QWidget) -> QWidget:
        self.series_check = QCheckBox("Time series (ordered; before/after is two)", parent)
        wrap = QWidget(parent)
        lay = QVBoxLayout(wrap)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.series_check)
        self.series_panel = QWidget(wrap)
        sp = QHBoxLayout(self.series_panel)
        sp.setContentsMargins(0, 0, 0, 0)
        self.series_list = QListWidget(self.series_panel)
        self.series_list.setMaximumHeight(64)
        col = QVBoxLayout()
        for text, slot in (("Add", self._series_add), ("Remove", self._series_remove), ("▲", lambda: self._series_move(-1)),
                           ("▼", lambda: self._series_move(1))):
            b = QPushButton(text, self.series_panel)
            b.clicked.connect(lambda _c=False, s=slot: s())
            col.addWidget(b)
        sp.addWidget(self.series_list, 1)
        sp.addLayout(col)
        lay.addWidget(self.series_panel)
        self.series_panel.setVisible(False)
        self.series_check.toggled.connect(self.series_panel.setVisible)
        return wrap

    def _outputs(self, parent: QWidget) -> QWidget:
        box = QWidget(parent)
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        self.output = OutputView(box)
        lay.addWidget(self.output, 1)
        hist_row = QHBoxLayout()
        hist_row.addWidget(QLabel("<b>This session</b>", box), 1)
        self.copy_button = QPushButton("Copy Markdown", box)
        self.copy_button.clicked.connect(self.copy_markdown)
        self.export_button = QPushButton("Export…", box)
        self.export_button.clicked.connect(self.export_markdown)
        hist_row.addWidget(self.copy_button)
        hist_row.addWidget(self.export_button)
        lay.addLayout(hist_row)
        self.history_list = QListWidget(box)
        self.history_list.setMaximumHeight(72)
        self.history_list.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.history_list.setTextElideMode(Qt.ElideRight)
        self.history_list.itemClicked.connect(self._history_clicked)
        lay.addWidget(self.history_list)
        return box

    # --- small UI handlers ------------------------------------------------------------------
    def _use_example(self, index: int) -> None:
        if index > 0:
            self.question_edit.setPlainText(self.examples_combo.itemText(index))
        self.examples_combo.setCurrentIndex(0)

    def _region_changed(self) -> None:
        kind = self.region_combo.currentData()
        self.draw_button.setVisible(kind == RECTANGLE)
        self.polygon_combo.setVisible(kind == POLYGON)
        self.polygon_label.setVisible(kind == POLYGON)

    def _draw_rectangle(self) -> None:
        canvas = self.iface.mapCanvas()
        self._map_tool = QgsMapToolExtent(canvas)
        self._map_tool.extentChanged.connect(self._rectangle_drawn)
        canvas.setMapTool(self._map_tool)

    def _rectangle_drawn(self, rect) -> None:
        canvas = self.iface.mapCanvas()
        self._drawn = Region(RECTANGLE, rect, canvas.mapSettings().destinationCrs())
        if self._map_tool is not None:
            canvas.unsetMapTool(self._map_tool)
        self.progress.setFormat("Rectangle set")

    def set_drawn_rectangle(self, region: Region) -> None:
        """Programmatic equivalent of drawing (also used by tests)."""
        self._drawn = region
        self.region_combo.setCurrentIndex(self.region_combo.findData(RECTANGLE))

    def _series_add(self) -> None:
        layer = self.optical_combo.currentLayer()
        if layer is not None:
            item = QListWidgetItem(layer.name())
            item.setData(Qt.UserRole, layer.id())
            self.series_list.addItem(item)

    def _series_remove(self) -> None:
        for item in self.series_list.selectedItems():
            self.series_list.takeItem(self.series_list.row(item))

    def _series_move(self, delta: int) -> None:
        row = self.series_list.currentRow()
        if row < 0 or not 0 <= row + delta < self.series_list.count():
            return
        item = self.series_list.takeItem(row)
        self.series_list.insertItem(row + delta, item)
        self.series_list.setCurrentRow(row + delta)

    def set_series(self, layers: list[QgsRasterLayer]) -> None:
        self.series_list.clear()
        for layer in layers:
            item = QListWidgetItem(layer.name())
            item.setData(Qt.UserRole, layer.id())
            self.series_list.addItem(item)
        self.series_check.setChecked(bool(layers))

    def set_layer(self, layer: QgsRasterLayer) -> None:
        """Point the dock at a layer (the Layers panel's right-click action)."""
        self.optical_combo.setLayer(layer)
        self.series_check.setChecked(False)

    # --- status -----------------------------------------------------------------------------
    def show_status(self, status) -> None:
        color = STATE_COLORS.get(status.state, "#888888")
        self.status_dot.setStyleSheet(f"color:{color}; font-size:16px;")
        self.status_label.setText(status.summary())
        self.status_label.setToolTip(status.message or status.summary())
        running = self.manager.is_running()
        self.stop_button.setEnabled(running)
        self.start_button.setEnabled(not running and status.state in (UNREACHABLE, "stopped"))

    def show_banner(self, message: str, offer_restart: bool) -> None:
        self.banner_label.setText(one_line(message))
        self.banner_restart.setVisible(offer_restart)
        self.banner.show()

    def _start_worker(self) -> None:
        try:
            self.manager.start()
        except ValueError as exc:
            self.show_banner(str(exc), offer_restart=False)

    def _restart(self) -> None:
        self.banner.hide()
        try:
            self.manager.restart()
        except ValueError as exc:
            self.show_banner(str(exc), offer_restart=False)

    # --- asking -----------------------------------------------------------------------------
    def _layers(self) -> list[tuple[QgsRasterLayer, str]]:
        if self.series_check.isChecked():
            project = QgsProject.instance()
            layers = [project.mapLayer(self.series_list.item(i).data(Qt.UserRole))
                      for i in range(self.series_list.count())]
            layers = [lay for lay in layers if lay is not None]
            if len(layers) < 2:
                raise ValueError("A time series needs at least two layers (add them in order).")
            return [(lay, f"t{i}") for i, lay in enumerate(layers)]
        optical = self.optical_combo.currentLayer()
        if optical is None:
            raise ValueError("Pick a raster layer first.")
        out = [(optical, "optical")]
        sar = self.sar_combo.currentLayer()
        if sar is not None and sar is not optical:
            out.append((sar, "sar"))
        return out

    def _region(self) -> Region:
        kind = self.region_combo.currentData()
        if kind == CANVAS:
            canvas = self.iface.mapCanvas()
            return Region(CANVAS, canvas.extent(), canvas.mapSettings().destinationCrs())
        if kind == RECTANGLE:
            if self._drawn is None:
                raise RegionError("Draw a rectangle on the map first (press Draw).")
            return self._drawn
        if kind == POLYGON:
            return selected_polygon_region(self.polygon_combo.currentLayer())
        return Region(WHOLE)

    def _sources(self, region: Region, max_side: int) -> tuple[list[SourceSpec], list[RenderRequest]]:
        """Provider clones to read in the task, and web layers to render first (on the canvas grid)."""
        sources, renders = [], []
        canvas = self.iface.mapCanvas()
        for layer, role in self._layers():
            if not layer.isValid():
                raise ValueError(f"Layer '{layer.name()}' is not valid.")
            if is_web_layer(layer):
                if region.kind == WHOLE:
                    raise RegionError(f"Layer '{layer.name()}' is a web map: pick the map extent, a rectangle or "
                                      "a polygon as the region.")
                crs = canvas.mapSettings().destinationCrs()
                rect, geom = region.in_crs(crs)
                renders.append(RenderRequest(len(sources), layer, rect, crs, canvas.mapUnitsPerPixel(), max_side,
                                             role))
                sources.append(SourceSpec(name=layer.name(), role=role, region_geometry=geom))
                continue
            rect, geom = region.for_layer(layer)
            sources.append(SourceSpec(name=layer.name(), role=role, provider=layer.dataProvider().clone(),
                                      region=rect, region_geometry=geom))
        return sources, renders

    def ask(self) -> AskTask | None:
        """Start a question from the widgets; returns the task (None when the input was refused)."""
        if self.task is not None:
            return None
        self.banner.hide()
        try:
            settings = self.manager.settings
            settings.validate()
            question = self.question_edit.toPlainText().strip()
            if not question:
                raise ValueError("Type a question first.")
            options = [line.strip() for line in self.options_edit.toPlainText().splitlines() if line.strip()]
            if len(options) == 1:
                raise ValueError("Give at least two options, or none.")
            sources, renders = self._sources(self._region(), settings.max_side)
            wait = self._ensure_worker(settings)
        except (ValueError, RegionError, SettingsError) as exc:
            self.show_banner(str(exc), offer_restart=False)
            return None
        project = QgsProject.instance()
        spec = AskSpec(question=question, sources=sources, options=options,
                       settings=settings.generation(), max_side=settings.max_side,
                       results_dir=results_folder(settings), context=project.transformContext(),
                       ellipsoid=effective_ellipsoid(project.ellipsoid()), wait_ready_s=wait,
                       measure_grounding=settings.measure_grounding)
        keys = self.manager.keys
        task = AskTask(spec, lambda: make_client(settings, keys))
        self.current = task.record
        self.output.clear()
        self._connect(task, [(task.textDelta, self.output.append_text), (task.stepReady, self._on_step),
                             (task.stageChanged, self.progress.setFormat),
                             (task.progressChanged, lambda v: self.progress.setValue(int(v))),
                             (task.taskCompleted, lambda t=task: self._on_finished(t)),
                             (task.taskTerminated, lambda t=task: self._on_finished(t))])
        self.task = task
        self._set_running(True)
        if renders:
            self.progress.setFormat("Rendering web layers…")
            self._renderer = WebRenderer(renders, self)
            self._renderer.finished.connect(lambda windows, t=task: self._rendered(t, windows))
            self._renderer.failed.connect(lambda message, t=task: self._render_failed(t, message))
            self._renderer.start()
        else:
            QgsApplication.taskManager().addTask(task)
        return task

    def _rendered(self, task: AskTask, windows: dict) -> None:
        self._renderer = None
        if self.task is not task:
            return
        for index, window in windows.items():
            task.spec.sources[index].window = window
        QgsApplication.taskManager().addTask(task)

    def _render_failed(self, task: AskTask, message: str) -> None:
        self._renderer = None
        if self.task is task:
            self.task = None
            task.record.error = one_line(message)
            self.show_banner(message, offer_restart=False)
            self._finish_record(task.record, failed=True)

    def _connect(self, task: AskTask, pairs: list) -> None:
        """Connect the task's signals to this dock, remembering them: a task that outlives the dock
        (plugin unload mid-answer) must not call into deleted widgets."""
        for signal, slot in pairs:
            signal.connect(slot)
        self._connections = (task, pairs)

    def _disconnect(self) -> None:
        """Drop the connections to a still-running task (the task manager deletes finished tasks)."""
        if not self._connections:
            return
        task, pairs = self._connections
        self._connections = ()
        if sip.isdeleted(task) or task.status() in (QgsTask.Complete, QgsTask.Terminated):
            return
        for signal, slot in pairs:
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass

    def _ensure_worker(self, settings: PluginSettings) -> float:
        """Auto-start a local worker when none answers; returns how long the task may wait for it."""
        state = self.manager.status.state
        if self.manager.is_running() or state == STARTING:
            return settings.start_timeout_s
        if state in (CONNECTED, BUSY):
            return 0.0
        if settings.auto_start and settings.is_local() and settings.python:
            self.manager.start()
            return settings.start_timeout_s
        return 0.0

    def cancel(self) -> None:
        if self._renderer is not None and self.task is not None:  # still rendering: nothing was sent yet
            self._renderer.cancel()
            self._renderer = None
            task, self.task = self.task, None
            task.record.error = "Cancelled."
            self._finish_record(task.record, failed=True)
            return
        if self.task is not None:
            self.progress.setFormat("Cancelling…")
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.ask_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.manager.set_busy(running)
        if running:
            self.progress.setValue(0)
            self.progress.setFormat("Sending…")

    def _on_step(self, step: StepRecord, thumb: QImage | None) -> None:
        self.output.add_step(step, thumb)
        if self.current is not None and thumb is not None:
            self.thumbs.setdefault(id(self.current), {})[step.step] = thumb

    def _on_worker_died(self, message: str) -> None:
        self.show_banner(message, offer_restart=True)
        task = self.task
        if task is not None:
            # Report now, not after the heartbeat timeout; the task ends on its own shortly.
            record = task.record
            record.error = message
            self._finish_record(record, failed=True)
            task.cancel()
            self.task = None

    def _on_finished(self, task: AskTask) -> None:
        if self._connections and self._connections[0] is task:
            self._connections = ()  # the task manager deletes the task after this
        if self.task is not task:
            return  # already reported (worker died) or superseded
        self.task = None
        record = task.record
        ok = task.status() == QgsTask.Complete and not task.error
        if ok and task.gpkg_path is not None:
            try:
                add_results(record, task.gpkg_path, built=task.built)
            except OSError as exc:
                record.error = one_line(str(exc))
                ok = False
        elif not ok:
            record.error = task.error or "The question failed."
            worker_gone = isinstance(task.exception, WorkerUnavailable)
            if record.error != "Cancelled.":
                self.show_banner(record.error, offer_restart=worker_gone and self.manager.settings.is_local())
        self._finish_record(record, failed=not ok)

    def _finish_record(self, record: AskRecord, failed: bool) -> None:
        self._set_running(False)
        self.progress.setValue(100 if not failed else 0)
        self.progress.setFormat("Cancelled" if record.error == "Cancelled." else ("Failed" if failed else "Done"))
        self.output.finish()
        if failed:
            self.output.set_error(record.error)
        else:
            self.output.set_answer(record)
        self.history.append(record)
        item = QListWidgetItem(self._history_text(record))
        item.setData(Qt.UserRole, len(self.history) - 1)
        item.setToolTip(record.question)
        self.history_list.insertItem(0, item)
        self.askFinished.emit(record)

    @staticmethod
    def _history_text(record: AskRecord) -> str:
        when = record.created[11:16]
        outcome = record.answer or record.error
        return one_line(f"{when}  {record.question}  →  {outcome}", 140)

    def _history_clicked(self, item: QListWidgetItem) -> None:
        record = self.history[item.data(Qt.UserRole)]
        self.current = record
        self.output.show_record(record, self.thumbs.get(id(record)))
        group = find_group(record)
        if group is not None:
            group.setItemVisibilityChecked(True)
            group.setExpanded(True)
        elif record.gpkg_path and Path(record.gpkg_path).exists():
            reload = LoadResultsTask(record, record.gpkg_path)
            reload.loaded.connect(lambda built, r=record: add_results(r, r.gpkg_path, built=built))
            self._reloads.append(reload)
            reload.taskCompleted.connect(lambda t=reload: self._reloads.remove(t))
            reload.taskTerminated.connect(lambda t=reload: self._reloads.remove(t))
            QgsApplication.taskManager().addTask(reload)

    # --- Markdown ---------------------------------------------------------------------------
    def _selected_record(self) -> AskRecord | None:
        return self.current if self.current is not None and self.current.finished else (
            self.history[-1] if self.history else None)

    def copy_markdown(self) -> str:
        record = self._selected_record()
        if record is None:
            return ""
        text = to_markdown(record)
        QApplication.clipboard().setText(text)
        return text

    def export_markdown(self, path: str | None = None) -> Path | None:
        record = self._selected_record()
        if record is None:
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Export reasoning as Markdown", "", "Markdown (*.md)")
            if not path:
                return None
        out = Path(path)
        out.write_text(to_markdown(record), encoding="utf-8")
        return out

    # --- teardown ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel a running ask and disconnect from it and the manager (plugin unload)."""
        self._disconnect()
        if self._renderer is not None:
            self._renderer.cancel()
            self._renderer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        for reload in self._reloads:
            try:
                reload.loaded.disconnect()
            except TypeError:
                pass
        try:
            self.manager.statusChanged.disconnect(self.show_status)
            self.manager.workerDied.disconnect(self._on_worker_died)
        except TypeError:
            pass
        if self._map_tool is not None:
            self.iface.mapCanvas().unsetMapTool(self._map_tool)
            self._map_tool = None
