"""Faults (issue 7, part 3): a worker killed mid-answer, out of memory mid-generation, a client that
vanishes mid-stream, and ``cancel`` honoured within one decode step."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from relharness import FIXTURE, WorkerProc, ask, assert_error, assert_served, long_ask, needs_model, scene

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable

pytestmark = needs_model

PLUGIN_TIMEOUT_S = 4.0  # qgis_plugin/settings.py request_timeout_s: silence before a worker counts as gone
LONG = 8000  # max_new_tokens of a request that would run for many seconds unless stopped


def test_sigkill_mid_answer_is_reported_within_5s_and_a_restarted_worker_serves() -> None:
    w = WorkerProc().start()
    w.wait_ready()
    endpoint = w.endpoint
    assert endpoint is not None
    killed: list[float] = []
    seen: list[str] = []

    def on_event(ev: dict, arrays: dict) -> None:
        seen.append(ev["event"])
        if ev["event"] == "token" and not killed:
            os.kill(w.pid, signal.SIGKILL)
            killed.append(time.monotonic())

    client = WorkerClient(endpoint, timeout_s=PLUGIN_TIMEOUT_S)
    try:
        header, arrays = long_ask(w, LONG)
        with pytest.raises(WorkerUnavailable) as exc:
            client.ask(header, arrays, on_event=on_event)
        detected_after = time.monotonic() - killed[0]
        assert "accepted" in seen and "token" in seen and "done" not in seen
        assert detected_after < 5.0, f"the client noticed the dead worker after {detected_after:.1f} s"
        print(f"\nSIGKILL mid-answer noticed by the client after {detected_after:.2f} s")
        assert "crashed" in str(exc.value) or "stopped responding" in str(exc.value)
        w.proc.wait(5)  # type: ignore[union-attr]

        restarted = WorkerProc(endpoint=endpoint).start()
        try:
            restarted.wait_ready()
            header, arrays = ask(max_new_tokens=4)
            done = client.ask(header, arrays)  # the same client object: it reconnects by itself
            assert done["event"] == "done" and done["worker"]["pid"] == restarted.pid
        finally:
            restarted.stop()
    finally:
        client.close()
        w.kill()


BUDGET = 64 << 20


@pytest.fixture(scope="module")
def budget_worker() -> Iterator[WorkerProc]:
    w = WorkerProc("--job-memory-budget-bytes", str(BUDGET)).start()
    w.wait_ready()
    yield w
    w.stop()


def test_out_of_memory_mid_generation_is_an_oom_error_memory_is_released_and_the_next_request_succeeds(
    budget_worker: WorkerProc,
) -> None:
    """A 2048x2048 request needs ~100 MiB more while generating than the 64 MiB budget allows."""
    w = budget_worker
    big = scene(2048, 2048)
    with w.raw() as raw:
        assert_served(raw)  # warm: first-request allocations are not the job's
        rss0 = w.rss()
        rss_after, peaks = [], []
        for _ in range(3):
            header, arrays = ask(big, max_new_tokens=64)
            raw.send_msg(header, arrays)
            events = raw.events(header["id"], timeout_s=60)
            names = [e["event"] for e, _ in events]
            assert names[0] == "accepted" and names[-1] == "error", names
            err = events[-1][0]
            assert_error(err, P.OOM)
            assert "memory" in err["message"] and "released" in err["message"]
            peaks.append(w.peak_rss())  # the worker restarts its peak count at each budgeted job
            rss_after.append(w.rss())
            assert_served(raw)  # the next request succeeds
        assert min(peaks) > rss0 + BUDGET, "the big request never went over the budget"
        print(f"\nOOM: RSS {rss0 / 2**20:.0f} MiB before, job peaks +{(min(peaks) - rss0) / 2**20:.0f}.."
              f"+{(max(peaks) - rss0) / 2**20:.0f} MiB (budget {BUDGET >> 20}), after each OOM "
              f"{', '.join(f'{(r - rss0) / 2**20:+.0f}' for r in rss_after)} MiB")
        # released: after each failure the worker holds less than one budget more than before it
        assert rss_after[0] - rss0 < BUDGET, (rss0, rss_after)
        assert rss_after[-1] - rss_after[0] < BUDGET, f"memory grows with each OOM: {rss_after}"
        info = w.client().info()
        assert info["state"] == "ready"


def test_gpu_and_host_oom_exceptions_are_classified_as_oom() -> None:
    """What ``_is_oom`` must recognise: torch's CUDA OOM, the CPU allocator's message, MemoryError."""
    import torch

    from worker.service import _is_oom

    assert _is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert _is_oom(MemoryError())
    assert not _is_oom(RuntimeError("shape mismatch"))


def _wait_idle(w: WorkerProc, timeout_s: float) -> float:
    """Seconds until the worker reports no running and no queued job."""
    t0 = time.monotonic()
    with w.client() as c:
        while time.monotonic() - t0 < timeout_s:
            pong = c.ping()
            if pong["running"] == 0 and pong["queue_length"] == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
    raise AssertionError(f"the abandoned job still runs after {timeout_s} s")


@pytest.mark.parametrize("mode", ["closed", "closed, no heartbeat field", "hung"])
def test_client_disconnect_mid_stream_cancels_the_job(worker: WorkerProc, mode: str) -> None:
    """A client that vanishes mid-stream: its socket closed (the next event cannot be routed), or a
    client that hangs - connected but no longer pinging (its heartbeats stop). The worker cancels
    the job and frees the model for others."""
    header, arrays = long_ask(worker, LONG)
    if mode != "closed, no heartbeat field":
        header["client_heartbeat_s"] = 0.5  # the worker expects a ping naming the job every 0.5 s
    rid = header["id"]
    raw = worker.raw()
    raw.send_msg(header, arrays)
    while True:
        ev = raw.reply(rid, timeout_s=30, skip=("alive", "pong", "accepted"))
        if ev["event"] == "token":
            break
        assert ev["event"] != "done", "finished before the disconnect"
    if mode == "hung":
        raw.sock.setsockopt(zmq.RCVHWM, 1)  # stops reading; never pings
    else:
        raw.close()
    idle_after = _wait_idle(worker, 10.0)
    assert idle_after < 5.0, f"the job of a vanished client ran {idle_after:.1f} s more"
    print(f"\nvanished client ({mode}): job stopped {idle_after:.2f} s later")
    assert any(rid in line and "cancelling" in line for line in worker.lines), worker.stderr()
    if mode == "hung":
        raw.close()
    with worker.raw() as fresh:
        done = assert_served(fresh)  # the model thread is free again
        assert done["timings_ms"]["queue"] < 1000


def test_cancel_is_honoured_within_one_decode_step(worker: WorkerProc) -> None:
    """After the worker acknowledges a ``cancel``, at most the decode step already under way emits a
    token (plus one still in flight between the threads), then ``cancelled`` arrives."""
    header, arrays = long_ask(worker, LONG)
    with worker.raw() as raw:
        rid = header["id"]
        raw.send_msg(header, arrays)
        tokens = 0
        while tokens < 5:
            ev = raw.reply(rid, timeout_s=30, skip=("alive", "pong", "accepted"))
            assert ev["event"] == "token", ev
            tokens += 1
        raw.send_msg(P.request("cancel", "c-1", target=rid))
        after_ack: list[str] | None = None
        t_ack = 0.0
        while True:
            msg = raw.recv(10.0)
            assert msg is not None, "no cancelled error"
            ev = msg[0]
            if ev.get("id") == "c-1":
                assert ev["event"] == "ack" and ev["found"] is True, ev
                after_ack, t_ack = [], time.monotonic()
            elif ev.get("id") == rid and ev["event"] not in ("alive",):
                if after_ack is not None:
                    after_ack.append(ev["event"])
                if ev["event"] in ("done", "error"):
                    break
        stop_s = time.monotonic() - t_ack
        assert ev["event"] == "error" and ev["code"] == P.CANCELLED, ev
        assert after_ack is not None and after_ack.count("token") <= 2, after_ack
        assert stop_s < 1.0, f"cancelled {stop_s:.2f} s after the ack"
        print(f"\ncancel: {after_ack.count('token')} token(s) after the ack, 'cancelled' {stop_s * 1000:.1f} ms after it")
        assert_served(raw)


class _StopAfter:
    """A ``should_stop`` that says yes from its (n+1)-th poll on."""

    def __init__(self, n: int):
        self.n, self.polls = n, 0

    def __call__(self) -> bool:
        self.polls += 1
        return self.polls > self.n


def test_should_stop_is_polled_every_decode_step() -> None:
    """In-process, on the real model: once ``should_stop`` says yes, not one more token is decoded."""
    from model.api import TerraScope
    from model.types import GenerationSettings, ImageInput

    m = TerraScope.load(str(FIXTURE), device="cpu")
    image = [ImageInput(np.moveaxis(scene(seed=1), 0, -1).copy())]
    for stop_at in (1, 7, 20):
        stopper = _StopAfter(stop_at)
        r = m.answer(image, "Where is the water?", settings=GenerationSettings(max_new_tokens=LONG),
                     should_stop=stopper)
        assert r.stopped == "cancelled"
        assert stopper.polls == stop_at + 1, "should_stop was not polled once per decode step"
        assert len(r.token_ids) == stop_at, (stop_at, len(r.token_ids))
