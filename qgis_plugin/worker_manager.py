"""Starting, stopping and watching the worker, without ever blocking the QGIS UI thread.

The local worker is a QProcess running the worker venv's Python (QGIS's own Python never imports torch).
Its health is polled by a QThread with its own ZeroMQ client (one socket per thread); results reach the
UI as queued signals. A worker that exits while it should be running is reported at once through
`workerDied`, which is faster than any heartbeat timeout.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, QProcess, QProcessEnvironment, QThread, QTimer, pyqtSignal

from .client import WorkerClient, WorkerError, WorkerUnavailable
from .errors import one_line
from .settings import CurveKeys, PluginSettings, load_curve_keys

UNREACHABLE, STARTING, CONNECTED, BUSY, FAILED, STOPPED = (
    "unreachable", "starting", "connected", "busy", "failed", "stopped")


@dataclass
class WorkerStatus:
    """What the dock's status line shows."""

    state: str = UNREACHABLE
    model: str = ""
    device: str = ""
    gpu: str = ""
    message: str = ""
    pid: int | None = None
    queue: int = 0
    max_side: int | None = None
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        words = {UNREACHABLE: "Unreachable", STARTING: "Starting…", CONNECTED: "Connected", BUSY: "Busy",
                 FAILED: "Model failed", STOPPED: "Stopped"}
        parts = [words.get(self.state, self.state)]
        parts += [p for p in (self.device, self.gpu, self.model) if p]
        return " · ".join(parts)


def gpu_text(gpu: dict | None) -> str:
    if not gpu or "name" not in gpu:
        return ""
    total = gpu.get("memory_total_bytes") or 0
    free = gpu.get("memory_free_bytes")
    if total and free is not None:
        return f"{gpu['name']} {(total - free) / 2**30:.1f}/{total / 2**30:.0f} GB"
    return str(gpu["name"])


def status_from(pong: dict, info: dict | None) -> WorkerStatus:
    """Fold a pong (and the last info) into a status; pure, so it is tested without a worker."""
    info = info or {}
    state = str(pong.get("state") or info.get("state") or "")
    model = info.get("model") or {}
    limits = info.get("limits") or {}
    st = WorkerStatus(model=str(model.get("name") or model.get("preset") or ""),
                      device=str(info.get("device") or model.get("device") or ""),
                      gpu=gpu_text(info.get("gpu")), pid=pong.get("pid") or info.get("pid"),
                      queue=int(pong.get("queue_length") or 0), info=info,
                      max_side=limits.get("max_side") if isinstance(limits.get("max_side"), int) else None)
    if state == "failed":
        st.state, st.message = FAILED, one_line(info.get("error") or "the model failed to load")
    elif state in ("loading", "starting"):
        st.state = STARTING
    elif pong.get("running") or st.queue:
        st.state = BUSY
    else:
        st.state = CONNECTED
    return st


def make_client(settings: PluginSettings, keys: CurveKeys | None = None, timeout_s: float | None = None
                ) -> WorkerClient:
    """A fresh client for the endpoint; `keys` come from `load_curve_keys` on the UI thread (the auth
    database may prompt for the master password there)."""
    timeout = timeout_s or settings.request_timeout_s
    if keys is None:
        return WorkerClient(settings.endpoint, timeout_s=timeout)
    return WorkerClient(settings.endpoint, timeout_s=timeout, curve_server_key=keys.server_public,
                        curve_client_keys=(keys.client_public, keys.client_secret))


class StatusPoller(QThread):
    """Pings every `interval_s` (sooner after `poke`) and emits a WorkerStatus."""

    status = pyqtSignal(object)

    def __init__(self, settings: PluginSettings, keys: CurveKeys | None, interval_s: float = 2.0,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.settings = settings
        self.keys = keys
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        client: WorkerClient | None = None
        info: dict | None = None
        info_at = 0.0
        while not self._stop.is_set():
            try:
                if client is None:
                    client = make_client(self.settings, self.keys, timeout_s=min(2.0, self.settings.request_timeout_s))
                pong = client.ping()
                if info is None or time.monotonic() - info_at > 15 or pong.get("state") != info.get("state"):
                    info, info_at = client.info(), time.monotonic()
                self.status.emit(status_from(pong, info))
            except (WorkerUnavailable, WorkerError, OSError, ValueError) as exc:
                info = None
                if client is not None:
                    client.close()
                    client = None
                self.status.emit(WorkerStatus(UNREACHABLE, message=one_line(str(exc))))
            self._wake.wait(self.interval_s)
            self._wake.clear()
        if client is not None:
            client.close()


def worker_command(settings: PluginSettings) -> tuple[str, list[str]]:
    """Program and arguments that start a local worker (raises ValueError when not configured)."""
    if not settings.python:
        raise ValueError("Set the worker's Python interpreter in TerraScope settings to auto-start a worker.")
    return settings.python, ["-m", "worker.cli", "worker", "--endpoint", settings.endpoint, "--model",
                             settings.model, "--device", settings.device]


def _kill_if_running(proc: QProcess) -> None:
    """SIGKILL a process that ignored SIGTERM (it may already be gone and deleted)."""
    if not sip.isdeleted(proc) and proc.state() != QProcess.NotRunning:
        proc.kill()


class WorkerManager(QObject):
    """Owns the local worker process and the status poller."""

    statusChanged = pyqtSignal(object)
    workerDied = pyqtSignal(str)

    def __init__(self, settings: PluginSettings, parent: QObject | None = None):
        super().__init__(parent)
        self.settings = settings
        self.status = WorkerStatus()
        self.process: QProcess | None = None
        self._expect_exit = False
        self._restart_after_exit = False
        self._log: deque[str] = deque(maxlen=200)
        self._busy = False
        self.poller: StatusPoller | None = None
        self.keys: CurveKeys | None = None

    # --- status -----------------------------------------------------------------------------
    def start_polling(self, interval_s: float = 2.0) -> None:
        if self.poller is None:
            self.keys = self._load_keys()
            self.poller = StatusPoller(self.settings, self.keys, interval_s)
            self.poller.status.connect(self._on_status)
            self.poller.start()

    def _load_keys(self) -> CurveKeys | None:
        try:
            return load_curve_keys(self.settings.auth_cfg)
        except ValueError as exc:
            self.status = WorkerStatus(UNREACHABLE, message=one_line(str(exc)))
            return None

    def client(self, timeout_s: float | None = None) -> WorkerClient:
        """A new client with the current settings and keys (use it in one thread only)."""
        return make_client(self.settings, self.keys, timeout_s)

    def refresh(self) -> None:
        if self.poller is not None:
            self.poller.poke()

    def set_busy(self, busy: bool) -> None:
        """Our own ask is running: show 'busy' until the next poll says otherwise."""
        self._busy = busy
        if busy and self.status.state == CONNECTED:
            self.status.state = BUSY
            self.statusChanged.emit(self.status)
        self.refresh()

    def _on_status(self, st: WorkerStatus) -> None:
        if st.state == UNREACHABLE and self.is_running():
            st.state, st.message = STARTING, "starting the local worker"
        if st.state == CONNECTED and self._busy:
            st.state = BUSY
        self.status = st
        self.statusChanged.emit(st)

    def apply_settings(self, settings: PluginSettings) -> None:
        """New settings: restart the poller (endpoint or keys may have changed)."""
        self.settings = settings
        self.keys = self._load_keys()
        if self.poller is not None:
            self.stop_polling()
            self.start_polling()

    def stop_polling(self) -> None:
        if self.poller is not None:
            self.poller.stop()
            self.poller.wait(5000)
            self.poller.deleteLater()
            self.poller = None

    # --- process ----------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.NotRunning

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._log)[-lines:])

    def start(self) -> None:
        """Start a local worker (no-op if ours is running). Raises ValueError when not configured."""
        if self.is_running():
            return
        if not self.settings.is_local():
            raise ValueError(f"{self.settings.endpoint} is not on this machine; start that worker where it runs.")
        program, args = worker_command(self.settings)
        proc = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for var in ("PYTHONHOME", "PYTHONPATH"):  # QGIS's own Python must not leak into the worker venv
            env.remove(var)
        env.insert("PYTHONUNBUFFERED", "1")
        proc.setProcessEnvironment(env)
        proc.setProcessChannelMode(QProcess.MergedChannels)
        proc.readyReadStandardOutput.connect(self._read_output)
        proc.finished.connect(self._on_finished)
        proc.errorOccurred.connect(self._on_error)
        self._expect_exit = False
        self.process = proc
        self._log.append(f"$ {program} {' '.join(args)}")
        proc.start(program, args)
        self.status = WorkerStatus(STARTING, message="starting the local worker")
        self.statusChanged.emit(self.status)
        self.refresh()

    def stop(self) -> None:
        """Stop our worker: SIGTERM, then kill after 5 s if it is still there. Never waits."""
        proc = self.process
        if proc is None or proc.state() == QProcess.NotRunning:
            return
        self._expect_exit = True
        proc.terminate()
        QTimer.singleShot(5000, lambda p=proc: _kill_if_running(p))

    def restart(self) -> None:
        if self.is_running():
            self._restart_after_exit = True
            self.stop()
        else:
            self.start()

    def _read_output(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self._log.append(line.rstrip())

    def _last_error_line(self) -> str:
        for line in reversed(self._log):
            if any(w in line for w in ("Error", "error", "refused", "failed", "Traceback")):
                return line.strip()
        return self._log[-1].strip() if self._log else ""

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart:
            self._expect_exit = True
            msg = one_line(f"The worker could not be started with '{self.settings.python}': check the Python "
                           "interpreter in TerraScope settings.")
            self.status = WorkerStatus(STOPPED, message=msg)
            self.statusChanged.emit(self.status)
            self.workerDied.emit(msg)

    def _on_finished(self, code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read_output()
        expected = self._expect_exit
        self._expect_exit = False
        if self.process is not None:
            self.process.deleteLater()
        self.process = None
        if self._restart_after_exit:
            self._restart_after_exit = False
            self.start()
            return
        if expected:
            self.status = WorkerStatus(STOPPED, message="the worker was stopped")
        else:
            how = "crashed" if exit_status == QProcess.CrashExit else f"exited with code {code}"
            detail = self._last_error_line()
            msg = one_line(f"The TerraScope worker {how}" + (f": {detail}" if detail else "."))
            self.status = WorkerStatus(UNREACHABLE, message=msg)
            self.workerDied.emit(msg)
        self.statusChanged.emit(self.status)
        self.refresh()

    def shutdown(self, wait_ms: int = 3000) -> None:
        """On plugin unload: stop polling and our worker (this one may block up to `wait_ms`)."""
        self.stop_polling()
        proc = self.process
        if proc is not None and proc.state() != QProcess.NotRunning:
            self._expect_exit = True
            proc.terminate()
            if not proc.waitForFinished(wait_ms):
                proc.kill()
                proc.waitForFinished(1000)
        self.process = None
