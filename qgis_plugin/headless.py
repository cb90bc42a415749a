"""Asking without the dock (Processing, scripts): connect to or start a worker, ask, measure.

Processing algorithms run in their own thread (or on the caller's, for processing.run), so here every
call may block; nothing in this module touches widgets.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from qgis.core import QgsCoordinateTransformContext

from .client import WorkerClient, WorkerError, WorkerUnavailable
from .gpkg import measure_steps
from .rasters import RasterWindow
from .record import AskRecord
from .request import EventFolder, build_request
from .settings import CurveKeys, PluginSettings, load_curve_keys
from .worker_manager import make_client, worker_command


class StartedWorker:
    """A worker process this module started, stopped again by `close`."""

    def __init__(self, proc: subprocess.Popen, log_file):
        self.proc = proc
        self.log_file = log_file  # a temporary file: a pipe nobody reads would block the worker

    def last_line(self) -> str:
        self.log_file.seek(0)
        lines = self.log_file.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self, client: WorkerClient | None = None) -> None:
        if self.proc.poll() is None:
            try:
                if client is not None:
                    client.shutdown()
            except (WorkerError, WorkerUnavailable):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        self.log_file.close()


@dataclass
class Connection:
    client: WorkerClient
    info: dict
    started: StartedWorker | None = None

    @property
    def max_side(self) -> int | None:
        side = (self.info.get("limits") or {}).get("max_side")
        return side if isinstance(side, int) and side > 0 else None

    def close(self) -> None:
        if self.started is not None:
            self.started.close(self.client)
        self.client.close()


def connect(settings: PluginSettings, keys: CurveKeys | None = None, is_cancelled: Callable[[], bool] = lambda: False,
            log: Callable[[str], None] = lambda _m: None) -> Connection:
    """A client whose worker is ready; starts a local worker (and stops it on `close`) when allowed."""
    if keys is None:
        keys = load_curve_keys(settings.auth_cfg)
    client = make_client(settings, keys)
    try:
        info = client.info()
        started = None
    except WorkerUnavailable:
        if not (settings.auto_start and settings.is_local() and settings.python):
            client.close()
            raise
        program, args = worker_command(settings)
        log(f"Starting a local worker: {program} {' '.join(args)}")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        log_file = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker; closed in close()
        proc = subprocess.Popen([program, *args], env=env, stdout=log_file, stderr=subprocess.STDOUT)
        started = StartedWorker(proc, log_file)
        info = {}
    deadline = time.monotonic() + settings.start_timeout_s
    while info.get("state") != "ready":
        if info.get("state") == "failed":
            _abandon(client, started)
            raise WorkerError("model_unavailable", str(info.get("error") or "the model failed to load"))
        if started is not None and started.proc.poll() is not None:
            last = started.last_line()
            _abandon(client, started)
            raise WorkerUnavailable(f"the local worker exited with code {started.proc.returncode}"
                                    + (f": {last}" if last else ""))
        if is_cancelled():
            _abandon(client, started)
            raise WorkerError("cancelled", "cancelled while waiting for the worker")
        if time.monotonic() > deadline:
            _abandon(client, started)
            raise WorkerUnavailable(f"the worker was not ready within {settings.start_timeout_s:g} s")
        time.sleep(0.5)
        try:
            info = client.info()
        except WorkerUnavailable:
            info = {}
    return Connection(client, info, started)


def _abandon(client: WorkerClient, started: StartedWorker | None) -> None:
    if started is not None:
        started.close(None)
    client.close()


def ask_windows(client: WorkerClient, question: str, windows: list[RasterWindow], options: list[str] | None,
                settings: dict, context: QgsCoordinateTransformContext, ellipsoid: str,
                is_cancelled: Callable[[], bool] = lambda: False,
                on_text: Callable[[str], None] | None = None, measure_grounding: bool = False) -> AskRecord:
    """Ask synchronously and return the measured record (raises WorkerError / WorkerUnavailable)."""
    record = AskRecord(question=question, options=list(options or []), layer_names=[w.name for w in windows])
    header, arrays = build_request(question, windows, options, settings, measure_grounding)
    folder = EventFolder(record, windows)

    def on_event(ev: dict, arr: dict) -> None:
        out = folder.on_event(ev, arr)
        if isinstance(out, str) and on_text is not None:
            on_text(out)

    client.ask(header, arrays, on_event=on_event, should_cancel=is_cancelled)
    measure_steps(record, context, ellipsoid)
    return record
