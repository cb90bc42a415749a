"""The worker process over real sockets: liveness, big arrays, malformed traffic, limits, hangs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from workerlib import REPO, RawDealer, free_tcp_endpoint, start_worker

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError, WorkerUnavailable


@pytest.fixture(scope="module")
def io_worker(tmp_path_factory):
    """A worker on tcp loopback whose model may still be loading: these tests use the IO thread only."""
    wp = start_worker(tmp_path_factory.mktemp("io"), "--max-message-bytes", "80000000",
                      endpoint=free_tcp_endpoint(), ready=False)
    yield wp
    wp.stop()


def test_ping_and_info(io_worker) -> None:
    with io_worker.client() as c:
        pong = c.ping()
        info = c.info()
    assert pong["event"] == "pong" and pong["pid"] == io_worker.proc.pid
    assert pong["state"] in ("loading", "ready", "failed")
    assert info["protocol_version"] == P.PROTOCOL_VERSION
    assert info["limits"]["max_message_bytes"] == 80_000_000
    assert {"python", "numpy", "pyzmq", "libzmq"} <= set(info["versions"])
    assert info["curve"] is False and info["pool_size"] == 1


def test_round_trip_of_a_60_mb_array(io_worker) -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 2**16, size=(3, 3000, 3500), dtype=np.uint16)  # 63 MB
    assert big.nbytes >= 50e6
    with io_worker.client(timeout_s=20) as c:
        ev, arrays = c.echo({"big": big, "small": np.arange(5.0)})
    assert ev["event"] == "echo"
    back = arrays["big"]
    assert back.shape == big.shape and back.dtype == big.dtype
    assert hashlib.sha256(back.tobytes()).digest() == hashlib.sha256(big.tobytes()).digest()
    np.testing.assert_array_equal(arrays["small"], np.arange(5.0))


def _header(**fields) -> bytes:
    return json.dumps({"protocol": 1, "id": "bad", **fields}).encode()


MALFORMED = [
    ("no delimiter", [b"garbage"], P.BAD_FRAME),
    ("not utf-8", [b"", b"\xff\xfe\xfd"], P.BAD_JSON),
    ("not json", [b"", b"{oops"], P.BAD_JSON),
    ("deep json", [b"", b"[" * 100_000 + b"]" * 100_000], P.BAD_JSON),
    ("json array", [b"", b"[1,2,3]"], P.BAD_JSON),
    ("wrong version", [b"", _header(protocol=7, op="ping")], P.BAD_VERSION),
    ("no version", [b"", json.dumps({"id": "x", "op": "ping"}).encode()], P.MISSING_FIELD),
    ("no id", [b"", json.dumps({"protocol": 1, "op": "ping"}).encode()], P.MISSING_FIELD),
    ("no op", [b"", _header()], P.MISSING_FIELD),
    ("unknown op", [b"", _header(op="format_disk")], P.UNKNOWN_OP),
    ("unknown non-ascii op", [b"", _header(op="pïng ✓")], P.UNKNOWN_OP),
    ("lone surrogate", [b"", b'{"protocol": 1, "id": "s", "op": "\\ud800"}'], P.BAD_JSON),
    ("frames != arrays", [b"", _header(op="echo"), b"\x00" * 8], P.BAD_FRAME),
    ("shape x dtype != bytes", [b"", _header(op="echo", arrays=[{"name": "a", "dtype": "f4", "shape": [3, 3]}]),
                                b"\x00" * 35], P.BAD_ARRAY),
    ("dtype not allowed", [b"", _header(op="echo", arrays=[{"name": "a", "dtype": "O", "shape": [1]}]),
                           b"\x00" * 8], P.BAD_ARRAY),
    ("ask missing question", [b"", _header(op="ask", images=[])], P.MISSING_FIELD),
    ("ask empty question", [b"", _header(op="ask", question="", images=[])], P.BAD_FIELD),
    ("ask 20k question", [b"", _header(op="ask", question="x" * 20_000, images=[])], P.BAD_FIELD),
    ("ask remote path", [b"", _header(op="ask", question="q?", images=[{"path": "/etc/passwd"}])],
     P.PATH_NOT_ALLOWED),
    ("ask options out of range", [b"", _header(op="ask", question="q?", options=["A"], images=[])], P.BAD_FIELD),
    ("cancel without target", [b"", _header(op="cancel")], P.MISSING_FIELD),
]


@pytest.mark.parametrize(("case", "frames", "code"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_messages_get_error_events_and_service_continues(io_worker, case, frames, code) -> None:
    raw = RawDealer(io_worker.endpoint)
    try:
        raw.send(frames)
        reply = raw.recv(5.0)
        assert reply is not None, f"{case}: no answer"
        ev, _ = reply
        assert ev["event"] == "error" and ev["code"] == code, ev
        assert isinstance(ev["message"], str) and len(ev["message"]) > 5
        # the same connection and a fresh client are both still served
        raw.send([b""] + P.encode_message(P.request("ping", "after")))
        ev, _ = raw.recv(5.0)
        assert ev["event"] == "pong" and ev["id"] == "after"
    finally:
        raw.close()
    with io_worker.client() as c:
        assert c.ping()["pid"] == io_worker.proc.pid


def test_over_the_size_limit(io_worker) -> None:
    # two frames under the per-frame cap but 90 MB together: a "too_large" error event
    raw = RawDealer(io_worker.endpoint)
    try:
        part = np.zeros(45_000_000, np.uint8)
        raw.send([b""] + P.encode_message(P.request("echo", "big"), {"a": part, "b": part}))
        ev, _ = raw.recv(10.0)
        assert ev["code"] == P.TOO_LARGE and ev["id"] == "big"  # the (small) header is read first
    finally:
        raw.close()
    # one frame above the limit is dropped by libzmq before allocation (the connection with it)
    raw = RawDealer(io_worker.endpoint)
    try:
        raw.send([b""] + P.encode_message(P.request("echo", "huge"), {"a": np.zeros(85_000_000, np.uint8)}))
        assert raw.recv(2.0) is None
    finally:
        raw.close()
    # the client refuses to send what the worker advertised it would refuse
    with io_worker.client() as c:
        c.info()
        with pytest.raises(WorkerError) as e:
            c.echo({"a": np.zeros(81_000_000, np.uint8)})
        assert e.value.code == P.TOO_LARGE
        assert c.ping()["event"] == "pong"


def test_cancel_of_unknown_request_is_acknowledged(io_worker) -> None:
    with io_worker.client() as c:
        ack = c.cancel("no-such-request")
    assert ack["event"] == "ack" and ack["found"] is False


def test_many_clients_no_cross_talk(io_worker) -> None:
    results: dict[int, list] = {}

    def run(k: int) -> None:
        out = []
        with io_worker.client(timeout_s=10) as c:
            for j in range(10):
                arr = np.full((64, 64), k * 100 + j, np.int32)
                _, back = c.echo({"a": arr})
                out.append(int(back["a"][0, 0]) == k * 100 + j and (back["a"] == arr).all())
        results[k] = out

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == list(range(6))
    assert all(all(v) and len(v) == 10 for v in results.values())


def test_a_client_is_not_used_from_two_threads_at_once(io_worker) -> None:
    with io_worker.client() as c:
        c._lock.acquire()
        try:
            with pytest.raises(RuntimeError):
                c.ping()
        finally:
            c._lock.release()
        assert c.ping()["event"] == "pong"


def test_nothing_listening_is_reported_within_the_timeout(tmp_path) -> None:
    with WorkerClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=1.0) as c:
        t0 = time.monotonic()
        with pytest.raises(WorkerUnavailable):
            c.ping()
        assert time.monotonic() - t0 < 3.0


def test_non_loopback_bind_requires_curve() -> None:
    proc = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--endpoint", "tcp://0.0.0.0:5599",
                           "--model", "tests/fixtures/terrascope-official-tiny/checkpoint"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CURVE" in lines[0] and "Traceback" not in proc.stderr


def test_a_hung_worker_is_detected_then_recovers(io_worker) -> None:
    with io_worker.client(timeout_s=2.0) as c:
        assert c.ping()["event"] == "pong"
        os.kill(io_worker.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(WorkerUnavailable):
                c.ping()
            assert time.monotonic() - t0 < 4.0
        finally:
            os.kill(io_worker.proc.pid, signal.SIGCONT)
        assert c.ping()["event"] == "pong"


def test_shutdown_stops_the_worker_cleanly(io_worker) -> None:
    """Last in this module: it ends the shared worker."""
    with io_worker.client() as c:
        assert c.shutdown()["event"] == "bye"
    assert io_worker.proc.wait(20) == 0
