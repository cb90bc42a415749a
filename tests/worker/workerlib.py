"""Helpers for the worker tests: real worker subprocesses, small rasters, a raw DEALER."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = REPO / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"
UTM33 = "EPSG:32633"
GT10 = [500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0]


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class WorkerProc:
    """A ``terrascope worker`` subprocess; its log is shown when something goes wrong."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log: Path):
        self.proc, self.endpoint, self.log = proc, endpoint, log

    def client(self, **kw) -> WorkerClient:
        kw.setdefault("timeout_s", 5.0)
        return WorkerClient(self.endpoint, **kw)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(
    folder: Path, *args: str, endpoint: str | None = None, ready: bool = True, model: Path | None = TINY_MODEL,
    timeout_s: float = 120.0, client_kw: dict | None = None,
) -> WorkerProc:
    """Starts a worker and waits until it answers ``ping`` (and, with ``ready``, has loaded its model)."""
    folder.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint or f"ipc://{folder}/worker.sock"
    log = folder / f"worker-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--endpoint", endpoint, "--device", "cpu", *args]
    if model is not None:
        cmd += ["--model", str(model)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wp = WorkerProc(proc, endpoint, log)
    deadline = time.monotonic() + timeout_s
    with wp.client(timeout_s=1.0, **(client_kw or {})) as c:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{wp.logs()}")
            if time.monotonic() > deadline:
                wp.stop()
                raise RuntimeError(f"worker not ready in {timeout_s} s:\n{wp.logs()}")
            try:
                state = c.ping()["state"]
            except WorkerUnavailable:
                continue
            if not ready or state != "loading":
                break
            time.sleep(0.2)
    if ready and state != "ready":
        logs = wp.logs()
        wp.stop()
        raise RuntimeError(f"worker model state is {state}:\n{logs}")
    return wp


def raster(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    """A small 3-band scene with structure (a bright square on a textured background)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 90, size=(3, h, w), dtype=np.uint8)
    img[:, h // 4 : h // 2, w // 4 : w // 2] = 220
    return img


def small_ask(question: str = "Where is the bright square?", max_new_tokens: int = 12, **kw):
    return P.build_ask(question, [P.RasterPayload(raster(), GT10, UTM33)],
                       settings={"max_new_tokens": max_new_tokens}, **kw)


class RawDealer:
    """A bare DEALER that sends arbitrary frames (for malformed-message tests)."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def try_send(self, frames: list, timeout_s: float = 3.0) -> bool:
        """Queue ``frames``; False when no connection took them within ``timeout_s``. A DEALER blocks while it
        has no connected peer (e.g. a refused CURVE handshake between reconnects), so a bare send could hang."""
        self.sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        try:
            self.sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return False
        return True

    def send(self, frames: list, timeout_s: float = 10.0) -> None:
        assert self.try_send(frames, timeout_s), f"no connection to the worker took the frames in {timeout_s} s"

    def recv(self, timeout_s: float = 5.0) -> tuple[dict, dict] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart()
        assert frames[0] == b"", "worker replies start with the empty delimiter"
        return P.decode_message(frames[1:], P.Limits(max_message_bytes=1 << 33))

    def close(self) -> None:
        self.sock.close(0)


def long_ask(max_new_tokens: int = 3000):
    """A request the random-weight fixture answers with a long, [SEG]-free ramble (it never hits
    </answer> on noise), so there is time to cancel, kill or abandon it mid-generation."""
    noise = np.random.default_rng(0).integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
    return P.build_ask("Describe the scene.", [P.RasterPayload(noise, GT10, UTM33)],
                       settings={"max_new_tokens": max_new_tokens, "max_seg": 0})
