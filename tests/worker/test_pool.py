"""``terrascope worker --workers 2``: two CPU worker processes behind one zmq.proxy endpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from workerlib import GT10, REPO, TINY_MODEL, UTM33, long_ask, small_ask

from qgis_plugin import protocol as P
from qgis_plugin.client import INFO_TTL_S, WorkerClient, WorkerError, WorkerUnavailable


def _wait_ping(endpoint: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with WorkerClient(endpoint, timeout_s=1.0) as c:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "pool exited"
            try:
                c.ping()
                return
            except WorkerUnavailable:
                continue
    raise AssertionError("pool never answered")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    endpoint = f"ipc://{folder}/pool.sock"
    log = (folder / "pool.log").open("wb")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--workers", "2", "--endpoint", endpoint,
                             "--model", str(TINY_MODEL), "--device", "cpu"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    _wait_ping(endpoint, proc)
    yield proc, endpoint
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _member_pids(endpoint: str, n: int = 8) -> set[int]:
    pids = set()
    with WorkerClient(endpoint, timeout_s=5) as c:
        for _ in range(n):
            info = c.info()
            assert info["pool_size"] == 2
            pids.add(info["pid"])
    return pids


def test_requests_are_spread_over_both_members(pool) -> None:
    proc, endpoint = pool
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:  # the second member may still be starting
        pids |= _member_pids(endpoint)
    assert len(pids) == 2 and proc.pid not in pids
    big = np.arange(2_000_000, dtype=np.float32)
    with WorkerClient(endpoint, timeout_s=5) as c:
        _, back = c.echo({"a": big})
    np.testing.assert_array_equal(back["a"], big)


def test_members_share_the_cores_unless_the_user_chose(pool, monkeypatch) -> None:
    from worker.pool import cpu_share

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert (cpu_share(1), cpu_share(2), cpu_share(3), cpu_share(64)) == (32, 16, 10, 1)
    # the fixture's own OMP_NUM_THREADS=1 reaches each member untouched (setdefault, never override)
    _, endpoint = pool
    for pid in _member_pids(endpoint):
        raw = Path(f"/proc/{pid}/environ").read_text()
        env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        assert env["OMP_NUM_THREADS"] == "1"


def test_asks_from_new_clients_alternate_members(pool) -> None:
    """Every message takes a round-robin turn at the pool's DEALER. A new client used to send ``info`` before
    its first big ask, so one new client per ask sent every ask to the same member; now a process asks for
    the limit once per endpoint and minute, and consecutive asks alternate."""
    _, endpoint = pool
    pixels = np.random.default_rng(5).integers(0, 255, size=(3, 720, 720), dtype=np.uint8)  # 1.5 MB: "big"
    header, arrays = P.build_ask("Where is the water?", [P.RasterPayload(pixels, GT10, UTM33)],
                                 settings={"max_new_tokens": 4, "max_seg": 0})
    for readiness_check in (False, True):  # True: as the plugin's AskTask does before each ask
        served = []
        for _ in range(6):
            with WorkerClient(endpoint, timeout_s=30) as c:
                if readiness_check:
                    assert c.info(INFO_TTL_S)["state"] == "ready"
                served.append(c.ask(dict(header, id=P.new_id()), arrays)["worker"]["pid"])
        counts = sorted(served.count(pid) for pid in set(served))
        assert counts == [3, 3], (readiness_check, served)


def test_members_run_on_disjoint_cores(pool) -> None:
    """By default each member is pinned to its own share of whole cores (``TERRASCOPE_CPUS``)."""
    from worker.pool import core_groups, parse_cpulist

    _, endpoint = pool
    pids = _member_pids(endpoint)
    allowed = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("Cpus_allowed_list:"))
        allowed.append(parse_cpulist(line.split(":", 1)[1]))
    if len(core_groups(os.sched_getaffinity(0))) >= len(pids):
        assert all(allowed) and not set.intersection(*allowed), allowed
    else:
        assert all(a == os.sched_getaffinity(0) for a in allowed)


def test_pool_answers_questions_from_concurrent_clients(pool) -> None:
    _, endpoint = pool
    done: dict[int, dict] = {}

    def ask(k: int) -> None:
        header, arrays = small_ask(max_new_tokens=4)
        with WorkerClient(endpoint, timeout_s=10) as c:
            done[k] = c.ask(header, arrays, max_wait_s=300)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert sorted(done) == [0, 1, 2, 3]
    assert all(d["event"] == "done" for d in done.values())
    assert len({d["worker"]["pid"] for d in done.values()}) == 2


def test_cancel_reaches_the_member_running_the_job(pool) -> None:
    _, endpoint = pool
    header, arrays = long_ask()
    seen = []

    def on_event(ev, _):
        seen.append(ev["event"])

    with WorkerClient(endpoint, timeout_s=10) as c, pytest.raises(WorkerError) as e:
        c.ask(header, arrays, on_event=on_event, should_cancel=lambda: "token" in seen, max_wait_s=300)
    assert e.value.code == P.CANCELLED


def test_a_killed_member_is_replaced(pool) -> None:
    proc, endpoint = pool
    deadline = time.monotonic() + 60
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        pids |= _member_pids(endpoint)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    # the survivor keeps answering while the pool starts a replacement
    deadline = time.monotonic() + 120
    seen: set[int] = set()
    while time.monotonic() < deadline and not (seen - pids):
        try:
            seen |= _member_pids(endpoint, n=4)
        except WorkerUnavailable:
            pass  # a request routed to the dead member's slot before the proxy noticed
    new = seen - pids
    assert new and victim not in seen and proc.poll() is None
    header, arrays = small_ask(max_new_tokens=4)
    with WorkerClient(endpoint, timeout_s=10) as c:
        assert c.ask(header, arrays, max_wait_s=120)["event"] == "done"


def test_shutdown_stops_every_member(pool) -> None:
    """Last in this module: it ends the shared pool."""
    proc, endpoint = pool
    time.sleep(1.0)  # let both members connect, so the shutdown must travel over the bus
    with WorkerClient(endpoint, timeout_s=5) as c:
        assert c.shutdown()["event"] == "bye"
    assert proc.wait(60) == 0


def test_gpu_lists_map_into_cuda_visible_devices(monkeypatch) -> None:
    from worker.pool import visible_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus("0,1") == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus("1") == ["3"]  # indexes are relative to what this process may see
    for bad in ("", "a,b", "0;1", "5"):
        with pytest.raises(ValueError):
            visible_gpus(bad)
    import torch

    if not torch.cuda.is_available():
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            visible_gpus("all")



def test_cpu_lists_parse_as_the_kernel_writes_them() -> None:
    from worker.pool import parse_cpulist

    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("5") == {5} and parse_cpulist("") == set()


def test_a_member_without_a_numa_local_gpu_is_not_pinned() -> None:
    """No CUDA here: nothing is known about a GPU's node, so nothing is pinned and the CPU set is unchanged."""
    from worker.pool import gpu_local_cpus, pin_to_gpu

    before = os.sched_getaffinity(0)
    assert gpu_local_cpus(0) is None and pin_to_gpu(0) is None
    assert os.sched_getaffinity(0) == before


def test_cpu_shares_are_disjoint_whole_cores() -> None:
    from worker.pool import core_groups, format_cpulist, split_cpus

    cpus = os.sched_getaffinity(0)
    shares = split_cpus(cpus, 2)
    if len(core_groups(cpus)) >= 2:
        assert shares[0] and shares[1] and not shares[0] & shares[1] and shares[0] | shares[1] == cpus
        for core in core_groups(cpus):  # a core's hyperthreads stay together
            assert any(set(core) <= s for s in shares)
    else:
        assert shares == [cpus, cpus]
    assert format_cpulist({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11" and format_cpulist({5}) == "5"


def test_a_member_takes_the_cpu_share_the_pool_gave_it() -> None:
    """``TERRASCOPE_CPUS`` (set by the pool with TERRASCOPE_POOL_CPU_SPLIT=1) pins the member process."""
    cpu = min(os.sched_getaffinity(0))
    code = "import os; from worker.pool import pin_member; pin_member(False); print(sorted(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, TERRASCOPE_CPUS=str(cpu)), check=True).stdout
    assert out.strip() == f"[{cpu}]"
