"""Several workers behind one endpoint: ZeroMQ's own ROUTER/DEALER ``zmq.proxy``.

The parent binds the public endpoint (a ROUTER, with CURVE when configured) and a private
DEALER; each member is a normal worker process whose ROUTER connects to that DEALER, so the
DEALER spreads requests round-robin over the members (one per GPU via CUDA_VISIBLE_DEVICES, or
N CPU members with ``--workers N``). A second ``zmq.proxy`` (XSUB/XPUB) is the members' control
bus: a ``cancel``, a client keepalive or a ``shutdown`` that reaches one member is published to
all, because the round-robin may have routed it away from the member that runs the job.

The parent restarts a member that dies; it exits when every member has exited after a
``shutdown``, or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

log = logging.getLogger("terrascope.pool")


def cpu_share(members: int) -> int:
    """Threads for one of ``members`` worker processes on this host (at least 1)."""
    return max(1, (os.cpu_count() or 1) // max(1, members))


def parse_cpulist(text: str) -> set[int]:
    """A kernel CPU list (``0-15,32-47``) as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def gpu_local_cpus(device: int = 0) -> set[int] | None:
    """The CPUs of the NUMA node that holds CUDA ``device`` (sysfs ``local_cpulist``), among those this process
    may use; None when unknown or when that is all of them (nothing to pin)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(device)
        bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        local = parse_cpulist(Path(f"/sys/bus/pci/devices/{bus}/local_cpulist").read_text())
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None
    allowed = os.sched_getaffinity(0)
    cpus = local & allowed
    return cpus if cpus and cpus != allowed else None


def core_groups(cpus: set[int]) -> list[list[int]]:
    """``cpus`` grouped by physical core (hyperthread siblings together, from sysfs), in core order."""
    groups: dict[int, list[int]] = {}
    for c in sorted(cpus):
        try:
            key = min(parse_cpulist(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text()))
        except (OSError, ValueError):
            key = c
        groups.setdefault(key, []).append(c)
    return [groups[k] for k in sorted(groups)]


def split_cpus(cpus: set[int], n: int) -> list[set[int]]:
    """``cpus`` in ``n`` disjoint shares of whole physical cores, as even as the cores allow (every share gets
    at least one core; with fewer cores than shares, every share gets them all)."""
    cores = core_groups(cpus)
    if n < 1:
        raise ValueError(f"cannot split CPUs into {n} shares")
    if len(cores) < n:
        return [set(cpus) for _ in range(n)]
    shares: list[set[int]] = [set() for _ in range(n)]
    for i, core in enumerate(cores):
        shares[i * n // len(cores)].update(core)
    return shares


def format_cpulist(cpus: set[int]) -> str:
    """The kernel's CPU list notation of ``cpus`` (``0-3,8``)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


#: The pool gives each member a disjoint share of whole physical cores (``TERRASCOPE_CPUS`` in the member's
#: environment); ``TERRASCOPE_POOL_CPU_SPLIT=0`` lets members share every core. Why: on a 2 x H100 host (32
#: cores, one NUMA node) the second of two sharing members served a question 13-15 % slower than the first
#: (1022-1026 against 891-908 ms, in two runs); with 16 cores each they served at 934 and 945 ms, as one
#: member alone does (928 ms).
CPU_SPLIT_ENV = "TERRASCOPE_POOL_CPU_SPLIT"
MEMBER_CPUS_ENV = "TERRASCOPE_CPUS"


def pin_member(cuda: bool) -> set[int] | None:
    """A pool member's CPU placement, before it starts its threads: the share the pool gave it
    (``TERRASCOPE_CPUS``), else on CUDA the CPUs next to its GPU (``pin_to_gpu``). The shares are whole cores
    in CPU order, not per NUMA node: on a host with several nodes, set ``TERRASCOPE_POOL_CPU_SPLIT=0`` to
    have each GPU member pin itself to its GPU's node instead."""
    given = os.environ.get(MEMBER_CPUS_ENV, "").strip()
    if given:
        cpus = parse_cpulist(given) & os.sched_getaffinity(0)
        if cpus:
            os.sched_setaffinity(0, cpus)
            log.info("pinned to CPUs %s (the pool's share)", format_cpulist(cpus))
            return cpus
    return pin_to_gpu() if cuda else None


def pin_to_gpu(device: int = 0) -> set[int] | None:
    """Keep this process (threads started from now on) on the CPUs next to its GPU. Why: in a 2-GPU pool one
    member served a question 13 % slower than the other (1026 against 908 ms) with the same GPUs; host work
    on the far NUMA node (copies, per-token syncs) is the usual cause. Returns the CPUs, or None if unpinned."""
    cpus = gpu_local_cpus(device)
    if cpus:
        os.sched_setaffinity(0, cpus)
        log.info("pinned to the %d CPUs local to GPU %d", len(cpus), device)
    return cpus


@dataclass
class Member:
    index: int
    gpu: str | None
    args: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] | None = None


def visible_gpus(spec: str) -> list[str]:
    """GPU ids for ``--gpus all`` or ``--gpus 0,1`` (kept inside any CUDA_VISIBLE_DEVICES already set)."""
    parent = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--gpus all: no CUDA GPU is visible to this process")
        return parent[:n] if parent else [str(i) for i in range(n)]
    ids = [g.strip() for g in spec.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise ValueError(f"--gpus takes 'all' or a comma list of GPU indexes like 0,1; got {spec!r}")
    if parent:
        bad = [g for g in ids if int(g) >= len(parent)]
        if bad:
            raise ValueError(f"--gpus {spec}: only {len(parent)} GPU(s) visible (CUDA_VISIBLE_DEVICES)")
        return [parent[int(g)] for g in ids]
    return ids


def _proxy(a: zmq.Socket, b: zmq.Socket) -> None:
    try:
        zmq.proxy(a, b)
    except zmq.ContextTerminated:
        pass
    finally:
        a.close(0)
        b.close(0)


class Pool:
    """Runs the proxy and supervises the member processes."""

    def __init__(
        self,
        endpoint: str,
        member_args: Sequence[str],
        gpus: Sequence[str | None],
        *,
        curve_secret: bytes | None = None,
        client_keys: Sequence[bytes] | None = None,
        max_message_bytes: int = 1 << 30,
        python: str = sys.executable,
    ):
        self.endpoint = endpoint
        self.curve_secret = curve_secret
        self.client_keys = client_keys
        self.max_message_bytes = max_message_bytes
        self.python = python
        self.members = [Member(i, g, list(member_args)) for i, g in enumerate(gpus)]
        self._stop = threading.Event()
        self._dir = tempfile.mkdtemp(prefix="terrascope-pool-")  # 0700: only we can reach the ipc sockets
        self._ctx = zmq.Context()
        self._auth = None
        self.bound: str | None = None

    def stop(self) -> None:
        self._stop.set()

    def _ep(self, name: str) -> str:
        return f"ipc://{self._dir}/{name}"

    def _start_proxies(self) -> None:
        front = self._ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        front.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        front.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        front.setsockopt(zmq.LINGER, 0)
        if self.curve_secret is not None:
            from worker.service import start_authenticator

            self._auth = start_authenticator(self._ctx, self.client_keys)
            front.curve_server = True
            front.curve_secretkey = self.curve_secret
            front.curve_publickey = zmq.curve_public(self.curve_secret)
        front.bind(self.endpoint)
        self.bound = front.getsockopt(zmq.LAST_ENDPOINT).decode()
        back = self._ctx.socket(zmq.DEALER)
        back.setsockopt(zmq.LINGER, 0)
        back.bind(self._ep("backend"))
        xsub = self._ctx.socket(zmq.XSUB)
        xsub.bind(self._ep("bus-in"))
        xpub = self._ctx.socket(zmq.XPUB)
        xpub.bind(self._ep("bus-out"))
        for a, b in ((front, back), (xsub, xpub)):
            threading.Thread(target=_proxy, args=(a, b), daemon=True, name="terrascope-proxy").start()

    def _spawn(self, m: Member) -> None:
        env = dict(os.environ)
        if m.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = m.gpu
        # each member gets its share of the cores: N processes with a thread per core each oversubscribe the
        # host in their CPU phases (raster preparation, tiling) and slow every GPU's feed
        env.setdefault("OMP_NUM_THREADS", str(cpu_share(len(self.members))))
        if os.environ.get(CPU_SPLIT_ENV, "1") != "0":
            share = split_cpus(os.sched_getaffinity(0), len(self.members))[m.index]
            env[MEMBER_CPUS_ENV] = format_cpulist(share)
        cmd = [
            self.python, "-m", "worker.cli", "worker", "--pool-member",
            "--endpoint", self._ep("backend"),
            "--bus-pub", self._ep("bus-in"), "--bus-sub", self._ep("bus-out"),
            "--pool-size", str(len(self.members)), *m.args,
        ]
        m.proc = subprocess.Popen(cmd, env=env)
        log.info("pool member %d started (pid %d, gpu %s)", m.index, m.proc.pid, m.gpu or "-")

    def run(self) -> int:
        """Serve until every member exits after ``shutdown`` (0) or stop() / a signal."""
        try:
            self._start_proxies()
            log.info("pool of %d workers on %s", len(self.members), self.bound)
            for m in self.members:
                self._spawn(m)
            return self._supervise()
        finally:
            self._terminate()
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)

    def _supervise(self) -> int:
        while not self._stop.wait(0.3):
            codes = [m.proc.poll() if m.proc else None for m in self.members]
            if all(c == 0 for c in codes):
                log.info("all pool members shut down")
                return 0
            if any(c == 0 for c in codes):
                continue  # a shutdown is spreading over the bus; the others follow
            for m, code in zip(self.members, codes):
                if code is None:
                    continue
                now = time.monotonic()
                m.restarts = [t for t in (m.restarts or []) if now - t < 60] + [now]
                if len(m.restarts) > 5:
                    log.error("pool member %d keeps failing (exit %s); stopping the pool", m.index, code)
                    return 1
                log.warning("pool member %d exited with %s; restarting it", m.index, code)
                self._spawn(m)
        return 0

    def _terminate(self) -> None:
        procs = [m.proc for m in self.members if m.proc is not None and m.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
