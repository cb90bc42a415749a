"""Helpers for the plugin tests in real QGIS: a real worker process, GeoTIFFs, event-loop waits, a UI probe."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import numpy as np
from osgeo import gdal, osr
from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, QElapsedTimer, QEventLoop, QTimer

from qgis_plugin.client import WorkerClient, WorkerUnavailable

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"
DATA = REPO / "tests" / "data"
SAMPLE_4326 = REPO / "resources" / "samples" / "Spain_7370579_S2Hand.tif"  # Sentinel-2, EPSG:4326
ATLANTA_UTM = DATA / "spacenet_atlanta" / "sample_geotiff.tif"  # WorldView-2 pan, EPSG:32616


def worker_python() -> str:
    """The worker venv's interpreter: $TERRASCOPE_WORKER_PYTHON, else the repository's .venv."""
    path = os.environ.get("TERRASCOPE_WORKER_PYTHON") or str(REPO / ".venv" / "bin" / "python")
    if not Path(path).exists():
        raise RuntimeError(f"worker interpreter {path} not found: run `make deps` or set TERRASCOPE_WORKER_PYTHON")
    return path


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class RealWorker:
    """A `terrascope worker` subprocess on the tiny official fixture checkpoint."""

    def __init__(self, folder: Path, *extra: str, endpoint: str | None = None):
        self.endpoint = endpoint or free_endpoint()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"worker-{time.monotonic_ns()}.log"
        cmd = [worker_python(), "-m", "worker.cli", "worker", "--endpoint", self.endpoint, "--model", str(TINY_MODEL),
               "--device", "cpu", *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for var in ("PYTHONHOME", "PYTHONPATH", "QT_QPA_PLATFORM"):
            env.pop(var, None)
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout_s
        with WorkerClient(self.endpoint, timeout_s=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    info = client.info()
                    if info.get("state") == "ready":
                        return info
                except WorkerUnavailable:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"worker not ready within {timeout_s} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def write_geotiff(path: Path, data: np.ndarray, transform: tuple, epsg: int | None, nodata: float | None = None,
                  band_names: list[str] | None = None) -> Path:
    """A GeoTIFF written by GDAL (bands, rows, cols)."""
    data = data if data.ndim == 3 else data[None]
    types = {np.dtype(np.uint8): gdal.GDT_Byte, np.dtype(np.uint16): gdal.GDT_UInt16, np.dtype(np.int16): gdal.GDT_Int16,
             np.dtype(np.float32): gdal.GDT_Float32, np.dtype(np.complex64): gdal.GDT_CFloat32}
    ds = gdal.GetDriverByName("GTiff").Create(str(path), data.shape[2], data.shape[1], data.shape[0],
                                              types[data.dtype])
    ds.SetGeoTransform(list(transform))
    if epsg is not None:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(epsg)
        ds.SetProjection(srs.ExportToWkt())
    for i, band in enumerate(data):
        b = ds.GetRasterBand(i + 1)
        b.WriteArray(band)
        if nodata is not None:
            b.SetNoDataValue(nodata)
        if band_names:
            b.SetDescription(band_names[i])
    ds.FlushCache()
    ds = None
    return path


def scene(rows: int = 48, cols: int = 64, seed: int = 0) -> np.ndarray:
    """3-band uint8 scene with a bright rectangle on texture."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 90, size=(3, rows, cols), dtype=np.uint8)
    img[:, rows // 4: rows // 2, cols // 4: cols // 2] = 220
    return img


def process_events_until(predicate, timeout_s: float, step_ms: int = 20) -> bool:
    """Run the Qt event loop (as QGIS would) until `predicate()` or the timeout; returns predicate()."""
    deadline = time.monotonic() + timeout_s
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(step_ms)
    timer.timeout.connect(lambda: (predicate() or time.monotonic() > deadline) and loop.quit())
    timer.start()
    if not (predicate() or time.monotonic() > deadline):
        loop.exec_()
    timer.stop()
    QCoreApplication.processEvents()
    return bool(predicate())


class UiProbe:
    """Measures the longest gap between ticks of a 10 ms QTimer on the UI thread."""

    def __init__(self, interval_ms: int = 10):
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.clock = QElapsedTimer()
        self.max_gap_ms = 0.0
        self.ticks = 0
        self._last = 0
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = self.clock.elapsed()
        if self.ticks:
            self.max_gap_ms = max(self.max_gap_ms, now - self._last)
        self._last = now
        self.ticks += 1

    def __enter__(self) -> Self:
        self.clock.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.stop()


def wait_for_tasks(timeout_s: float = 30.0) -> bool:
    return process_events_until(lambda: QgsApplication.taskManager().countActiveTasks() == 0, timeout_s)


def quadrangle_area_m2(lat1: float, lat2: float, dlon_deg: float, a: float = 6378137.0,
                       f: float = 1 / 298.257223563) -> float:
    """Exact area of a lat/lon quadrangle on the ellipsoid (authalic formula): an independent reference."""
    e2 = f * (2 - f)
    e = math.sqrt(e2)
    b2 = a * a * (1 - e2)

    def q(phi: float) -> float:
        s = math.sin(phi)
        return s / (1 - e2 * s * s) + math.log((1 + e * s) / (1 - e * s)) / (2 * e)

    return abs(b2 / 2 * math.radians(dlon_deg) * (q(math.radians(lat2)) - q(math.radians(lat1))))


class _FirstMask(Exception):
    pass


_SEED_CACHE: dict[tuple, int] = {}


def find_seg_seed(endpoint: str, question: str, windows: list, temperature: float = 5.0, budget_tokens: int = 400,
                  seeds: range = range(60), options: list[str] | None = None) -> int:
    """A sampling seed with which the random-weight fixture model's first [SEG] gives a non-empty mask
    for this exact request (ask with it and max_seg=1: generation stops right after that mask).

    The fixture checkpoint has random weights, so greedy decoding never says [SEG]; sampling at a high
    temperature does now and then. Searching the seed keeps the end-to-end tests on the real model path.
    """
    import numpy as np

    from qgis_plugin import protocol as P
    from qgis_plugin.request import build_request

    key = (endpoint, question, tuple(options or ()),
           tuple((w.data.shape, w.transform, int(np.asarray(w.data).sum())) for w in windows))
    if key in _SEED_CACHE:
        return _SEED_CACHE[key]
    with WorkerClient(endpoint, timeout_s=10.0) as client:
        for seed in seeds:
            header, arrays = build_request(question, windows, options, {"max_new_tokens": budget_tokens, "max_seg": 1,
                                                                      "temperature": temperature, "seed": seed})
            first: list[bool] = []

            def on_event(ev, arr, first=first):
                if ev.get("event") == "mask":
                    first.append(bool(np.asarray(arr["mask"]).any()))

            try:
                client.ask(header, arrays, on_event=on_event)
            except Exception as exc:
                if getattr(exc, "code", None) != P.CANCELLED:
                    raise
            if first and first[0]:
                _SEED_CACHE[key] = seed
                return seed
    raise RuntimeError(f"no seed in {seeds} makes the fixture model draw a [SEG] mask within {budget_tokens} tokens")
