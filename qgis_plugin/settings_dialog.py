"""The settings dialog: worker endpoint, local auto-start, device, timeouts, output folder, remote key."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .settings import (
    DEVICES,
    CurveKeys,
    PluginSettings,
    SettingsError,
    load_curve_keys,
    remove_curve_keys,
    save_settings,
    store_curve_keys,
)


def read_key_file(path: str) -> tuple[str | None, str | None]:
    """(public, secret) z85 keys from a key file: a bare 40-character key, or a ZeroMQ certificate
    (`public-key = "..."` / `secret-key = "..."`)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    pub = re.search(r'public-key\s*=\s*"([^"]{40})"', text)
    sec = re.search(r'secret-key\s*=\s*"([^"]{40})"', text)
    if pub or sec:
        return (pub.group(1) if pub else None), (sec.group(1) if sec else None)
    bare = text.strip()
    if len(bare) == 40:
        return (None, bare) if "secret" in Path(path).name else (bare, None)
    raise SettingsError(f"{path} holds no 40-character CURVE key.")


def keys_from_folder(folder: str | Path) -> CurveKeys:
    """The keys `terrascope keys DIR` wrote: server.public, client.public, client.secret."""
    folder = Path(folder)
    values = []
    for name in ("server.public", "client.public", "client.secret"):
        path = folder / name
        if not path.exists():
            raise SettingsError(f"{folder} has no {name} (make the keys with `terrascope keys {folder}`).")
        pub, sec = read_key_file(str(path))
        values.append(sec if name.endswith("secret") else pub)
    keys = CurveKeys(*values)
    keys.validate()
    return keys


class SettingsDialog(QDialog):
    """Edits a copy of the settings; `saved` holds the result after Accept."""

    def __init__(self, settings: PluginSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("TerraScope settings")
        self.original = settings
        self.saved: PluginSettings | None = None
        self._clear_key = False
        layout = QVBoxLayout(self)
        layout.addWidget(self._worker_box(settings))
        layout.addWidget(self._local_box(settings))
        layout.addWidget(self._key_box(settings))
        layout.addWidget(self._output_box(settings))
        self.error_label = QLabel(self)
        self.error_label.setStyleSheet("color:#c62828;")
        self.error_label.setWordWrap(True)
        layout.addWidget(self.error_label)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _worker_box(self, s: PluginSettings) -> QGroupBox:
        box = QGroupBox("Worker", self)
        form = QFormLayout(box)
        self.endpoint = QLineEdit(s.endpoint, box)
        self.endpoint.setToolTip("ZeroMQ address of the worker, e.g. tcp://127.0.0.1:5557")
        self.timeout = QDoubleSpinBox(box)
        self.timeout.setRange(0.5, 600)
        self.timeout.setSuffix(" s")
        self.timeout.setValue(s.request_timeout_s)
        self.timeout.setToolTip("A worker silent for this long counts as gone (it sends a heartbeat every second)")
        self.max_side = QSpinBox(box)
        self.max_side.setRange(64, 8192)
        self.max_side.setSuffix(" px")
        self.max_side.setValue(s.max_side)
        self.max_side.setToolTip("Larger regions are decimated by a whole factor before sending; masks keep the grid")
        self.max_tokens = QSpinBox(box)
        self.max_tokens.setRange(1, 8192)
        self.max_tokens.setValue(s.max_new_tokens)
        self.max_seg = QSpinBox(box)
        self.max_seg.setRange(0, 20)
        self.max_seg.setValue(s.max_seg)
        self.temperature = QDoubleSpinBox(box)
        self.temperature.setRange(0.0, 5.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(s.temperature)
        self.temperature.setToolTip("0 = greedy: the same question on the same pixels gives the same answer")
        self.grounding = QCheckBox("Feed measured areas back into the reasoning", box)
        self.grounding.setChecked(s.measure_grounding)
        self.grounding.setToolTip("After each [SEG], the worker measures the mask and the model continues with "
                                  "the measured numbers (measurement grounding)")
        self.seed = QSpinBox(box)
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(s.seed)
        form.addRow("Endpoint", self.endpoint)
        form.addRow("Response timeout", self.timeout)
        form.addRow("Largest image side", self.max_side)
        form.addRow("Longest answer (tokens)", self.max_tokens)
        form.addRow("Most [SEG] steps", self.max_seg)
        form.addRow("Temperature", self.temperature)
        form.addRow("Seed", self.seed)
        form.addRow(self.grounding)
        return box

    def _local_box(self, s: PluginSettings) -> QGroupBox:
        box = QGroupBox("Local worker", self)
        form = QFormLayout(box)
        self.auto_start = QCheckBox("Start a local worker when none answers", box)
        self.auto_start.setChecked(s.auto_start)
        self.python = QgsFileWidget(box)
        self.python.setFilePath(s.python)
        self.python.setToolTip("The worker venv's interpreter, e.g. <repository>/.venv/bin/python")
        self.model = QComboBox(box)
        self.model.setEditable(True)
        self.model.addItems(["terrascope-mini", "terrascope-8b"])
        self.model.setEditText(s.model)
        self.model.setToolTip("A preset name or a checkpoint folder")
        browse = QPushButton("Folder…", box)
        browse.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model, 1)
        model_row.addWidget(browse)
        self.device = QComboBox(box)
        self.device.addItems(list(DEVICES))
        self.device.setCurrentText(s.device)
        self.start_timeout = QDoubleSpinBox(box)
        self.start_timeout.setRange(1, 3600)
        self.start_timeout.setSuffix(" s")
        self.start_timeout.setValue(s.start_timeout_s)
        form.addRow(self.auto_start)
        form.addRow("Python interpreter", self.python)
        form.addRow("Model", model_row)
        form.addRow("Device", self.device)
        form.addRow("Start timeout", self.start_timeout)
        return box

    def _key_box(self, s: PluginSettings) -> QGroupBox:
        box = QGroupBox("Remote worker key (CURVE)", self)
        form = QFormLayout(box)
        self.key_state = QLabel(box)
        self.server_key = QLineEdit(box)
        self.server_key.setPlaceholderText("server public key (40 characters)")
        self.client_public = QLineEdit(box)
        self.client_public.setPlaceholderText("client public key")
        self.client_secret = QLineEdit(box)
        self.client_secret.setPlaceholderText("client secret key")
        self.client_secret.setEchoMode(QLineEdit.Password)
        row = QHBoxLayout()
        load = QPushButton("Import keys folder…", box)
        load.setToolTip("The folder written by `terrascope keys DIR` (server.public, client.public, client.secret)")
        load.clicked.connect(self._import_keys)
        clear = QPushButton("Forget stored key", box)
        clear.clicked.connect(self._forget_key)
        row.addWidget(load)
        row.addWidget(clear)
        form.addRow(self.key_state)
        form.addRow("Server public", self.server_key)
        form.addRow("Client public", self.client_public)
        form.addRow("Client secret", self.client_secret)
        form.addRow(row)
        self.auth_cfg = s.auth_cfg
        self._show_key_state()
        return box

    def _output_box(self, s: PluginSettings) -> QGroupBox:
        box = QGroupBox("Results", self)
        form = QFormLayout(box)
        self.output_dir = QgsFileWidget(box)
        self.output_dir.setStorageMode(QgsFileWidget.GetDirectory)
        self.output_dir.setFilePath(s.output_dir)
        self.output_dir.setToolTip("Empty: a TerraScope folder next to the project file")
        form.addRow("GeoPackage folder", self.output_dir)
        return box

    def _show_key_state(self) -> None:
        if self.auth_cfg and not self._clear_key:
            try:
                keys = load_curve_keys(self.auth_cfg)
            except SettingsError as exc:
                self.key_state.setText(str(exc))
                return
            if keys is not None:
                self.server_key.setText(keys.server_public)
                self.client_public.setText(keys.client_public)
            self.key_state.setText(f"Stored in the QGIS authentication database (id {self.auth_cfg}).")
        else:
            self.key_state.setText("No key: only a worker on this machine (or without CURVE) can be used.")

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Checkpoint folder", self.model.currentText())
        if folder:
            self.model.setEditText(folder)

    def _import_keys(self, folder: str | None = None) -> None:
        folder = folder or QFileDialog.getExistingDirectory(self, "Folder written by `terrascope keys`")
        if not folder:
            return
        try:
            keys = keys_from_folder(folder)
        except (OSError, SettingsError) as exc:
            self.error_label.setText(str(exc))
            return
        self.server_key.setText(keys.server_public)
        self.client_public.setText(keys.client_public)
        self.client_secret.setText(keys.client_secret)
        self._clear_key = False

    def _forget_key(self) -> None:
        self._clear_key = True
        for w in (self.server_key, self.client_public, self.client_secret):
            w.clear()
        self._show_key_state()

    def collect(self) -> PluginSettings:
        """The edited settings (not saved); raises SettingsError for a bad value."""
        s = replace(self.original, endpoint=self.endpoint.text().strip(), request_timeout_s=self.timeout.value(),
                    max_side=self.max_side.value(), max_new_tokens=self.max_tokens.value(),
                    max_seg=self.max_seg.value(), temperature=self.temperature.value(), seed=self.seed.value(),
                    measure_grounding=self.grounding.isChecked(),
                    auto_start=self.auto_start.isChecked(), python=self.python.filePath().strip(),
                    model=self.model.currentText().strip(), device=self.device.currentText(),
                    start_timeout_s=self.start_timeout.value(), output_dir=self.output_dir.filePath().strip())
        s.validate()
        return s

    def accept(self) -> None:
        try:
            settings = self.collect()
            secret = self.client_secret.text().strip()
            if self._clear_key and self.auth_cfg:
                remove_curve_keys(self.auth_cfg)
                self.auth_cfg = ""
            if secret:
                keys = CurveKeys(self.server_key.text().strip(), self.client_public.text().strip(), secret)
                self.auth_cfg = store_curve_keys(keys, self.auth_cfg)
            settings.auth_cfg = self.auth_cfg
            save_settings(settings)
        except SettingsError as exc:
            self.error_label.setText(str(exc))
            return
        self.saved = settings
        super().accept()
