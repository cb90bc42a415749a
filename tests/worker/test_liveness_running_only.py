"""Keepalive pings only for running jobs: queued asks stay silent and are never judged by the worker.

Why: in a pool every client message passes a round-robin DEALER; pings of clients whose asks were
still queued made the spread of asks over the members random (docs/PROTOCOL.md, *Pools*).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import zmq
from workerlib import RawDealer, WorkerProc, long_ask, small_ask

from qgis_plugin import protocol as P
from qgis_plugin.client import FIRST_PING_HEARTBEATS, WorkerClient

#: The worker's shortest liveness window, max(3 x client_heartbeat_s, 3 s): queue waits exceed it.
WINDOW_S = 3.0


def _until(raw: RawDealer, rid: str, names: tuple[str, ...], timeout_s: float = 30.0) -> dict:
    """The first event for ``rid`` whose name is in ``names`` (other events are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = raw.recv(max(0.05, deadline - time.monotonic()))
        if got is not None and got[0].get("id") == rid and got[0]["event"] in names:
            return got[0]
    raise AssertionError(f"no {names} for {rid} within {timeout_s} s")


def test_queued_jobs_are_not_judged_and_the_window_counts_from_the_start(worker: WorkerProc) -> None:
    """A runs long; C (a WorkerClient) and then B (raw, promises pings every 0.5 s, never pings) queue
    behind it for longer than the liveness window. Neither is cancelled while queued: C completes,
    and B, once running, is cancelled for missing pings about 3 s after its start - not at once."""
    blocker, silent = RawDealer(worker.endpoint), RawDealer(worker.endpoint)
    result: dict = {}
    c_accepted = threading.Event()

    def ask_c() -> None:
        header, arrays = small_ask(max_new_tokens=4)
        header["id"] = "liveness-c"

        def on_event(ev: dict, _arrays: dict) -> None:
            if ev["event"] == "accepted":
                c_accepted.set()

        try:
            with worker.client(heartbeat_s=0.5) as c:
                result["done"] = c.ask(header, arrays, on_event=on_event, max_wait_s=60)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc
            c_accepted.set()

    try:
        a_header, a_arrays = long_ask()  # no client_heartbeat_s: never judged by pings
        a_header["id"] = "liveness-a"
        blocker.send([b""] + P.encode_message(a_header, a_arrays))
        _until(blocker, "liveness-a", ("token",))

        thread = threading.Thread(target=ask_c, daemon=True)
        thread.start()
        assert c_accepted.wait(10), "C was not accepted"
        assert "error" not in result, result
        b_header, b_arrays = long_ask()
        b_header["id"] = "liveness-b"
        b_header["client_heartbeat_s"] = 0.5
        silent.send([b""] + P.encode_message(b_header, b_arrays))
        assert _until(silent, "liveness-b", ("accepted", "error"))["event"] == "accepted"

        time.sleep(WINDOW_S + 0.7)  # longer than the window, with B and C queued and silent
        blocker.send([b""] + P.encode_message(P.request("cancel", target="liveness-a")))

        # C runs next (and completes), then B; B's alive state=running is sent the moment it starts
        started = _until(silent, "liveness-b", ("alive", "error"))
        while not (started["event"] == "error" or started.get("state") == "running"):
            started = _until(silent, "liveness-b", ("alive", "error"))
        assert started["event"] == "alive", f"B was cancelled while queued: {started}"
        t_run = time.monotonic()
        ended = _until(silent, "liveness-b", ("error", "done"), timeout_s=20)
        ran = time.monotonic() - t_run
        assert ended["event"] == "error" and ended["code"] == P.CANCELLED, ended
        assert WINDOW_S - 0.5 < ran < WINDOW_S + 4, f"B was cancelled {ran:.2f} s after its start"

        thread.join(30)
        assert not thread.is_alive(), "C did not finish"
        assert "error" not in result, f"the queued WorkerClient ask failed: {result.get('error')!r}"
        assert result["done"]["timings_ms"]["queue"] > WINDOW_S * 1000
        assert "request liveness-b stopped pinging" in worker.logs()
    finally:
        blocker.close()
        silent.close()


class FakeWorker:
    """A ROUTER that plays the worker for one ask and records when the client pinged."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.peer: bytes | None = None
        self.rid: str | None = None
        self.pings: list[tuple[float, list]] = []

    def pump(self, seconds: float) -> None:
        """Reads the client's messages for ``seconds``: the ask, then pings (recorded, answered)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                continue
            frames = self.sock.recv_multipart()
            header, _ = P.decode_message(frames[2:], P.Limits())
            if header["op"] == "ask":
                self.peer, self.rid = frames[0], header["id"]
                self.send(P.event("accepted", self.rid, position=1, state="ready"))
            elif header["op"] == "ping":
                self.pings.append((time.monotonic(), header.get("active")))
                self.sock.send_multipart([frames[0], b""] + P.encode_message(P.event("pong", header["id"])))

    def send(self, ev: dict) -> None:
        assert self.peer is not None
        self.sock.send_multipart([self.peer, b""] + P.encode_message(ev))

    def phase(self, seconds: float, event: dict, period_s: float = 0.2) -> None:
        """Sends ``event`` every ``period_s`` for ``seconds`` while reading the client."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.send(event)
            self.pump(min(period_s, max(0.0, end - time.monotonic())))

    def close(self) -> None:
        self.sock.close(0)


@pytest.mark.parametrize("signal", ["alive", "token"])
def test_worker_client_pings_only_while_its_job_runs(tmp_path: Path, signal: str) -> None:
    """Queued (alive state=queued) for 1.5 s: no ping. Running (an ``alive`` state=running, or only
    tokens) for 1.5 s: the first ping 1.5 ``heartbeat_s`` after the first sign of running, then every
    ``heartbeat_s``, each naming the job."""
    hb = 0.25
    fake = FakeWorker(f"ipc://{tmp_path}/fake.sock")
    result: dict = {}

    def ask() -> None:
        header, arrays = small_ask()
        try:
            with WorkerClient(fake.sock.getsockopt_string(zmq.LAST_ENDPOINT), timeout_s=3.0,
                              heartbeat_s=hb) as c:
                result["done"] = c.ask(header, arrays, max_wait_s=20)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            result["error"] = exc

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while fake.rid is None and time.monotonic() < deadline:
            fake.pump(0.1)
        assert fake.rid is not None, f"no ask reached the fake worker: {result}"
        rid = fake.rid
        fake.phase(1.5, P.event("alive", rid, state="queued", position=1))
        assert fake.pings == [], "the client pinged while its job was queued"

        t_run = time.monotonic()
        if signal == "alive":
            fake.phase(1.5, P.event("alive", rid, state="running", position=0))
        else:
            fake.phase(1.5, P.event("token", rid, text="x"))
        pings = list(fake.pings)
        fake.send(P.event("done", rid, answer="a", choice=None, reasoning="", text="x", stopped="eos"))
        thread.join(10)
        assert not thread.is_alive() and "error" not in result, result
        assert result["done"]["event"] == "done"

        assert all(active == [rid] for _, active in pings), pings
        times = [t - t_run for t, _ in pings]
        first = FIRST_PING_HEARTBEATS * hb
        assert times and times[0] >= first - 0.05, f"first ping too early: {times}"
        assert times[0] < first + 0.5, f"first ping too late: {times}"
        # every hb (0.25 s) over the 1.5 s phase after the first 1.5 hb: ~5; allow for a loaded machine
        assert 3 <= len(times) <= 7, times
    finally:
        fake.close()
