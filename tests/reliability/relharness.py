"""Harness for the reliability suite: real worker processes, real sockets, the fixture checkpoint.

Every worker here is ``python -m worker.cli worker`` in its own process, bound to an ephemeral
loopback port, serving the official-layout tiny checkpoint on CPU: the same code path a user runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zmq

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"
DATA = REPO / "tests" / "data"
_LISTEN = re.compile(r"TerraScope worker on (\S+)")
#: A client limit generous enough to read anything a test worker sends.
READ_LIMITS = P.Limits(max_message_bytes=1 << 32, max_header_bytes=64 << 20)


def model_available() -> bool:
    """Whether the model runtime exists (found without importing torch, which is slow)."""
    import importlib.util

    return importlib.util.find_spec("model.api") is not None


needs_model = pytest.mark.skipif(not model_available(), reason="model/api.py (the model runtime) has not landed")


def worker_env(**extra: str) -> dict[str, str]:
    """One torch thread per worker: the CI machine has 2 cores shared by everything."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class WorkerProc:
    """A ``terrascope worker`` subprocess; its stderr is kept (drained by a thread) for assertions."""

    def __init__(self, *args: str, endpoint: str | None = "tcp://127.0.0.1:*", model: str | None = None,
                 env: dict[str, str] | None = None):
        """``endpoint=None`` leaves the worker's default endpoint."""
        where = [] if endpoint is None else ["--endpoint", endpoint]
        self.args = [*where, "--model", model or str(FIXTURE), "--device", "cpu", *args]
        self.env = env or worker_env()
        self.lines: list[str] = []
        self.endpoint: str | None = None
        self.proc: subprocess.Popen | None = None
        self.client_kw: dict[str, Any] = {}  # e.g. CURVE keys for wait_ready/stop

    def start(self, timeout_s: float = 60.0) -> WorkerProc:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", *self.args], cwd=REPO, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="replace",
        )
        found = threading.Event()

        def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = _LISTEN.search(line)
                if m and self.endpoint is None:
                    self.endpoint = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(timeout_s) or self.endpoint is None:
            self.kill()
            raise RuntimeError("worker did not start:\n" + self.stderr())
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> dict:
        """The ``pong`` once the model finished loading (ready or failed)."""
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                pong = c.ping()
                if pong["state"] != "loading":
                    return pong
                time.sleep(0.2)
        raise RuntimeError("model did not load in time:\n" + self.stderr())

    def client(self, timeout_s: float = 5.0, **kw: Any) -> WorkerClient:
        assert self.endpoint is not None
        return WorkerClient(self.endpoint, timeout_s=timeout_s, **{**self.client_kw, **kw})

    def raw(self) -> RawClient:
        assert self.endpoint is not None
        return RawClient(self.endpoint)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def peak_rss(self) -> int:
        """VmHWM: the highest RSS the process ever had (catches a transient allocation)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return "\n".join(self.lines[-60:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """Graceful ``shutdown`` first; SIGKILL if it does not exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with self.client(timeout_s=3.0) as c:
                c.shutdown()
            self.proc.wait(15)
        except (WorkerUnavailable, subprocess.TimeoutExpired, Exception):  # noqa: BLE001
            self.kill()


class RawClient:
    """A bare DEALER for sending anything, malformed frames included."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def try_send(self, frames: list[Any], timeout_s: float = 3.0) -> bool:
        """Queue ``frames``; False when no connection took them within ``timeout_s``. A DEALER blocks while it
        has no connected peer (e.g. a refused CURVE handshake between reconnects), so a bare send could hang."""
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        try:
            self.sock.send_multipart([b""] + list(frames), copy=False)
        except zmq.Again:
            return False
        return True

    def send(self, frames: list[Any], timeout_s: float = 10.0) -> None:
        assert self.try_send(frames, timeout_s), f"no connection to the worker took the frames in {timeout_s} s"

    def send_msg(self, header: dict, arrays: dict | None = None) -> None:
        self.send(P.encode_message(header, arrays))

    def recv(self, timeout_s: float = 5.0) -> tuple[dict, dict] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart(copy=False)
        assert len(frames[0].buffer) == 0, "worker reply without the delimiter frame"
        return P.decode_message(frames[1:], READ_LIMITS)

    def reply(self, rid: str | None, timeout_s: float = 5.0, skip: tuple[str, ...] = ("alive", "pong")) -> dict:
        """The next event for ``rid`` (``None``: an event that could not carry an id) other than ``skip``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            msg = self.recv(left) if left > 0 else None
            if msg is None:
                raise AssertionError(f"no reply for id {rid!r} within {timeout_s} s")
            ev = msg[0]
            if ev.get("id") == rid and ev.get("event") not in skip:
                return ev

    def events(self, rid: str, timeout_s: float = 30.0, foreign: list[dict] | None = None) -> list[tuple[dict, dict]]:
        """All events of request ``rid`` up to its terminal ``done``/``error`` (heartbeats excluded).

        Events of other requests are skipped, or collected into ``foreign`` when given.
        """
        out: list[tuple[dict, dict]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            msg = self.recv(left) if left > 0 else None
            if msg is None:
                raise AssertionError(f"request {rid} not finished within {timeout_s} s; got {[e['event'] for e, _ in out]}")
            ev, arrays = msg
            if ev.get("event") in ("alive", "pong"):
                continue
            if ev.get("id") != rid:
                if foreign is not None:
                    foreign.append(ev)
                continue
            out.append((ev, arrays))
            if ev.get("event") in ("done", "error"):
                return out

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> RawClient:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- requests ---------------------------------------------------------------------------------
def utm_wkt(zone: int = 33) -> str:
    from pyproj import CRS

    return CRS.from_epsg(32600 + zone).to_wkt()


def scene(h: int = 32, w: int = 32, bands: int = 3, seed: int = 0) -> np.ndarray:
    """A small uint8 scene with structure (a bright square on a textured background)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 90, size=(bands, h, w), dtype=np.uint8)
    img[:, h // 4 : h // 2, w // 4 : w // 2] = 230
    return img


def ask(data: np.ndarray | None = None, *, question: str = "Where is the bright square?",
        gt: list[float] | None = (500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0), crs: str | None = "utm",
        max_new_tokens: int = 8, rid: str | None = None, **fields: Any) -> tuple[dict, dict]:
    """A valid ``ask`` (header, arrays) for a real raster; override any field by keyword."""
    data = scene() if data is None else data
    crs_wkt = utm_wkt() if crs == "utm" else crs
    payload = P.RasterPayload(data=data, geotransform=None if gt is None else list(gt), crs_wkt=crs_wkt)
    header, arrays = P.build_ask(question, [payload], settings={"max_new_tokens": max_new_tokens},
                                 request_id=rid)
    header.update(fields)
    return header, arrays


def assert_served(raw: RawClient, max_new_tokens: int = 4) -> dict:
    """A valid ``ask`` on the same socket is answered with ``done`` (the worker kept serving), and
    nothing else arrives meanwhile: replies come in order, so a second reply to an earlier bad
    message would show up here."""
    header, arrays = ask(max_new_tokens=max_new_tokens)
    raw.send_msg(header, arrays)
    foreign: list[dict] = []
    events = raw.events(header["id"], timeout_s=60, foreign=foreign)
    assert not foreign, f"unexpected extra events: {foreign}"
    last = events[-1][0]
    assert last["event"] == "done", f"valid request after a bad one failed: {last}"
    return last


LONG_CANDIDATES = [("Where is the water?", 0), ("Where is the water?", 1), ("Where is the bright square?", 1),
                   ("Where is the bright square?", 3), ("Where is the water?", 2)]


def long_ask(worker: WorkerProc, max_new_tokens: int = 8000) -> tuple[dict, dict]:
    """An ``ask`` the random-weights fixture keeps generating for (no early end-of-answer token):
    the first candidate that runs to 200 tokens on this worker, scaled to ``max_new_tokens``."""
    global _LONG
    if _LONG is None:
        with worker.client(timeout_s=10) as c:
            for question, seed in LONG_CANDIDATES:
                done = c.ask(*ask(scene(seed=seed), question=question, max_new_tokens=200))
                if done["stopped"] == "max_new_tokens":
                    _LONG = (question, seed)
                    break
        assert _LONG is not None, "no candidate question makes the fixture model generate 200 tokens"
    question, seed = _LONG
    return ask(scene(seed=seed), question=question, max_new_tokens=max_new_tokens)


_LONG: tuple[str, int] | None = None


def assert_error(ev: dict, code: str | set[str]) -> None:
    codes = {code} if isinstance(code, str) else code
    assert ev["event"] == "error", ev
    assert ev["code"] in codes, ev
    assert ev["code"] in P.ERROR_CODES
    msg = ev["message"]
    assert isinstance(msg, str) and 10 <= len(msg) <= 1500 and "Traceback" not in msg, msg
