"""Full-size load on a real worker process: N concurrent clients x M requests, then worker RSS over
1,000 more requests (issue 7, part 4). Prints the figures; not a test.

    .venv/bin/python -m bench.load [--clients 16] [--requests 50] [--rss-requests 1000] [--model DIR]

Model: the embedded ``resources/models/terrascope-mini`` if present, else the tiny test checkpoint.
Each client is a bare DEALER that sees every event on its socket, so an event for a request it did
not send (cross-talk) or a second terminal event for one it did (not exactly once) is counted. The
worker keeps its default bounded queue (8): a client answered ``busy`` waits briefly and retries
with a new request id, as a real client would. Answers use seeded sampling, so a sample of them is
checked against the same request asked alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from qgis_plugin import protocol as P

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "resources" / "models" / "terrascope-mini"
TINY = REPO / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"
QUESTIONS = ["Where is the water?", "Where are the buildings?", "Is there a road?", "What covers most of it?"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(k: int, j: int, tokens: int) -> tuple[dict, dict]:
    """Request j of client k: its own raster size, question and sampling seed."""
    side = 32 + 8 * (k % 8)
    rng = np.random.default_rng(k)
    img = rng.integers(0, 255, (3, side, side), dtype=np.uint8)
    payload = P.RasterPayload(data=img, geotransform=[500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0],
                              crs_wkt="EPSG:32633")
    settings = {"max_new_tokens": tokens, "temperature": 1.0, "seed": 100_000 * k + j}
    return P.build_ask(QUESTIONS[k % len(QUESTIONS)], [payload], settings=settings)


class Client:
    """One DEALER; sends a request, reads its events until the terminal one, checks every event."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.terminal: dict[str, int] = {}
        self.strays = 0

    def ask(self, header: dict, arrays: dict, timeout_s: float = 120.0) -> dict:
        rid = header["id"]
        self.sock.send_multipart([b"", *P.encode_message(header, arrays)], copy=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(1000):
                continue
            frames = self.sock.recv_multipart(copy=False)
            ev, _ = P.decode_message(frames[1:], P.Limits(max_message_bytes=1 << 32))
            if ev.get("event") in ("alive", "pong"):
                continue
            if ev.get("id") != rid:
                self.strays += 1  # an event for a request this socket is not waiting for
                continue
            if ev.get("event") in ("done", "error"):
                self.terminal[rid] = self.terminal.get(rid, 0) + 1
                return ev
        raise TimeoutError(f"request {rid} unanswered after {timeout_s} s")

    def drain(self, wait_s: float = 0.5) -> None:
        """Anything still arriving is a duplicate or a stray."""
        while self.sock.poll(int(wait_s * 1000)):
            frames = self.sock.recv_multipart(copy=False)
            ev, _ = P.decode_message(frames[1:], P.Limits(max_message_bytes=1 << 32))
            if ev.get("event") not in ("alive", "pong"):
                self.strays += 1

    def close(self) -> None:
        self.sock.close(0)


def start_worker(model: Path, torch_threads: int | None = None) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{_port()}"
    env = dict(os.environ)
    if torch_threads:
        env["OMP_NUM_THREADS"] = str(torch_threads)
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--endpoint", endpoint, "--model",
                             str(model), "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    from qgis_plugin.client import WorkerClient, WorkerUnavailable

    deadline = time.monotonic() + 300
    with WorkerClient(endpoint, timeout_s=2.0) as c:
        while time.monotonic() < deadline:
            try:
                if c.ping()["state"] == "ready":
                    return proc, endpoint
            except WorkerUnavailable:
                pass
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the worker did not become ready")


def load_phase(endpoint: str, clients: int, requests: int, tokens: int) -> dict[str, Any]:
    latencies: list[float] = []
    busy = [0]
    answers: dict[tuple[int, int], str] = {}
    socks = [Client(endpoint) for _ in range(clients)]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def run(k: int) -> None:
        c = socks[k]
        barrier.wait()
        for j in range(requests):
            while True:
                header, arrays = _request(k, j, tokens)
                t0 = time.perf_counter()
                ev = c.ask(header, arrays)
                if ev["event"] == "error" and ev["code"] == P.BUSY:
                    with lock:
                        busy[0] += 1
                    time.sleep(random.uniform(0.02, 0.1))
                    continue
                with lock:
                    if ev["event"] == "done":
                        latencies.append(time.perf_counter() - t0)
                        answers[k, j] = ev["text"]
                    else:
                        errors.append(f"{ev.get('code')}: {ev.get('message')}")
                break

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in socks:
        c.drain()
    terminal = [n for c in socks for n in c.terminal.values()]
    strays = sum(c.strays for c in socks)
    for c in socks:
        c.close()
    # cross-talk check on a sample: the same request asked alone must give the same answer
    rng = random.Random(0)
    sample = rng.sample(sorted(answers), min(32, len(answers)))
    solo = Client(endpoint)
    mismatched = sum(solo.ask(*_request(k, j, tokens))["text"] != answers[k, j] for k, j in sample)
    solo.close()
    lat = sorted(latencies)
    return {
        "clients": clients, "requests_per_client": requests, "answered": len(answers), "errors": errors,
        "busy_answers": busy[0], "terminal_events": len(terminal), "duplicate_terminals": sum(n - 1 for n in terminal),
        "stray_events": strays, "sample_checked": len(sample), "sample_mismatched": mismatched,
        "wall_s": wall, "throughput_rps": len(answers) / wall,
        "latency_ms_p50": 1000 * statistics.median(lat), "latency_ms_p95": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "latency_ms_max": 1000 * lat[-1],
    }


def rss_phase(endpoint: str, pid: int, total: int, tokens: int, clients: int = 4) -> dict[str, Any]:
    proc = psutil.Process(pid)
    samples: list[tuple[int, int]] = [(0, proc.memory_info().rss)]
    count = [0]
    lock = threading.Lock()

    def run(k: int) -> None:
        c = Client(endpoint)
        j = 0
        while True:
            with lock:
                if count[0] >= total:
                    break
                count[0] += 1
                n = count[0]
            ev = c.ask(*_request(k, j, tokens))
            j += 1
            if ev["event"] == "error" and ev["code"] == P.BUSY:
                with lock:
                    count[0] -= 1
                time.sleep(0.05)
                continue
            if n % 100 == 0:
                with lock:
                    samples.append((n, proc.memory_info().rss))
        c.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples.sort()
    samples.append((total, proc.memory_info().rss))
    after_warmup = next(r for n, r in samples if n >= 100)
    warm = [(n, r / 2**20) for n, r in samples if n >= 100]
    slope = float(np.polyfit([n for n, _ in warm], [m for _, m in warm], 1)[0]) * 1000 if len(warm) > 2 else 0.0
    return {
        "slope_mib_per_1000": slope, "rss_min_mib": min(m for _, m in warm), "rss_max_mib": max(m for _, m in warm),
        "requests": total, "rss_mib": [(n, round(r / 2**20, 1)) for n, r in samples],
        "rss_start_mib": samples[0][1] / 2**20, "rss_after_100_mib": after_warmup / 2**20,
        "rss_end_mib": samples[-1][1] / 2**20,
        "growth_after_warmup_mib": (samples[-1][1] - after_warmup) / 2**20,
        "growth_total_mib": (samples[-1][1] - samples[0][1]) / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--rss-requests", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="worker OMP threads (default 1: on a small shared CPU more threads only contend; 0 = torch default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    model = args.model or (EMBEDDED if EMBEDDED.is_dir() else TINY)
    proc, endpoint = start_worker(model, args.torch_threads)
    try:
        load = load_phase(endpoint, args.clients, args.requests, args.max_new_tokens)
        rss = rss_phase(endpoint, proc.pid, args.rss_requests, args.max_new_tokens)
    finally:
        proc.terminate()
        proc.wait(30)
    if args.json:
        print(json.dumps({"model": str(model), "load": load, "rss": rss}, indent=2))
        return 0
    print(f"model: {model.relative_to(REPO) if model.is_relative_to(REPO) else model} (CPU, "
          f"{args.torch_threads or 'default'} torch thread(s), {args.max_new_tokens} new tokens per request)")
    print(f"load: {load['clients']} clients x {load['requests_per_client']} requests: {load['answered']} answered, "
          f"{len(load['errors'])} errors, {load['busy_answers']} 'busy' answers (retried), "
          f"{load['duplicate_terminals']} duplicate answers, {load['stray_events']} cross-talk events, "
          f"{load['sample_mismatched']}/{load['sample_checked']} sampled answers differ from a solo run")
    print(f"      {load['wall_s']:.1f} s, {load['throughput_rps']:.1f} requests/s, latency p50 "
          f"{load['latency_ms_p50']:.0f} ms, p95 {load['latency_ms_p95']:.0f} ms, max {load['latency_ms_max']:.0f} ms")
    print(f"RSS over {rss['requests']} requests: {rss['rss_after_100_mib']:.1f} MiB after 100 -> "
          f"{rss['rss_end_mib']:.1f} MiB after {rss['requests']} (growth {rss['growth_after_warmup_mib']:+.1f} MiB; "
          f"{rss['growth_total_mib']:+.1f} MiB from the idle worker)")
    print(f"      trend {rss['slope_mib_per_1000']:+.1f} MiB per 1,000 requests (least squares after the first 100); "
          f"range {rss['rss_min_mib']:.1f}-{rss['rss_max_mib']:.1f} MiB")
    print("      samples (requests, MiB): " + ", ".join(f"{n}: {m}" for n, m in rss["rss_mib"]))
    ok = not load["errors"] and load["duplicate_terminals"] == 0 and load["stray_events"] == 0 \
        and load["sample_mismatched"] == 0 and load["answered"] == args.clients * args.requests
    print("exactly once, no cross-talk: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
