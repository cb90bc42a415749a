"""Throughput of the worker pool on 2 GPUs vs 1: ``terrascope worker --gpus all`` vs ``--gpus 0``.

    python3 -m bench.gpu_pool --out DIR                     # CUDA: the 8B shape, random bf16 weights
    python3 -m bench.gpu_pool --device cpu --shape tiny     # seconds: 1 vs 2 CPU workers, checks the script

A random-weight model of the preset is saved once as a native checkpoint (the worker loads checkpoints, not
presets), then each pool is started as a real process tree (ZeroMQ ROUTER/DEALER proxy + one worker per GPU),
warmed up, and fed the same forced-trace questions from several concurrent clients over its TCP endpoint.
Questions/s = answered questions / wall time. The ratio 2-GPU / 1-GPU is the figure issue 6 asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FORCED = ("<think>I first find the flooded fields [SEG] and then the roads crossing them [SEG] to compare "
          "their extent with the whole scene.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_checkpoint(args: argparse.Namespace, folder: Path) -> Path:
    """A native checkpoint with random weights of the requested shape (built on the device, saved once)."""
    import torch

    from bench.gpu import TINY, TOKENIZER
    from model.api import TerraScope
    from model.configuration_terrascope import TerraScopeConfig, preset_config
    from model.loading import save_native

    cfg = TerraScopeConfig.from_dict(TINY) if args.shape == "tiny" else preset_config(args.preset)
    device = "cuda" if args.device == "cuda" else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    t0 = time.perf_counter()
    ts = TerraScope.random(cfg, TOKENIZER, device=device, dtype=dtype, seed=0)
    out = save_native(ts.model, folder / cfg.name, TOKENIZER)
    del ts
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"[checkpoint] {cfg.name} saved to {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def request(args: argparse.Namespace) -> tuple[dict, dict]:
    from qgis_plugin import protocol as P

    rng = np.random.default_rng(0)
    side = args.image
    img = rng.integers(0, 255, size=(3, side, side), dtype=np.uint8)
    header, arrays = P.build_ask("Which share of this scene is flooded?", [P.RasterPayload(img)],
                                 settings={"max_new_tokens": args.tokens})
    header["forced_prefix"] = FORCED
    return header, arrays


def wait_ready(endpoint: str, proc: subprocess.Popen, timeout_s: float) -> None:
    from qgis_plugin.client import WorkerClient, WorkerUnavailable

    deadline = time.monotonic() + timeout_s
    with WorkerClient(endpoint, timeout_s=2.0) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} while starting")
            try:
                c.ping()
                return
            except WorkerUnavailable:
                continue
    raise RuntimeError("the worker never answered a ping")


def run_questions(endpoint: str, n: int, clients: int, args: argparse.Namespace,
                  served: list[dict] | None = None) -> tuple[float, list[str]]:
    """``n`` questions from ``clients`` concurrent clients; returns (seconds, problems). ``served`` gets each
    answer's worker pid and server-side timings (to tell uneven spreading from slower members)."""
    from qgis_plugin.client import WorkerClient

    header, arrays = request(args)
    todo = list(range(n))
    lock = threading.Lock()
    problems: list[str] = []

    def client() -> None:
        with WorkerClient(endpoint, timeout_s=args.timeout) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                try:
                    done = c.ask(dict(header), arrays, max_wait_s=args.timeout * 4)
                    if done.get("event") != "done":
                        problems.append(f"unexpected final event {done.get('event')}")
                    elif served is not None:
                        with lock:
                            served.append({"pid": (done.get("worker") or {}).get("pid"),
                                           **(done.get("timings_ms") or {})})
                except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                    problems.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, problems


def per_member(served: list[dict]) -> list[dict[str, Any]]:
    """Answers per worker process with their mean service time (total - queue), model time and queue wait."""
    out = []
    for pid in sorted({d["pid"] for d in served}, key=str):
        mine = [d for d in served if d["pid"] == pid]

        def mean(key: str, rows: list[dict] = mine) -> float:
            return float(np.mean([r.get(key, 0.0) for r in rows]))

        out.append({"pid": pid, "answered": len(mine), "service_ms": mean("total") - mean("queue"),
                    "model_ms": mean("total_ms"), "queue_ms": mean("queue")})
    return out


def bench_pool(label: str, pool_args: list[str], members: int, ckpt: Path, args: argparse.Namespace,
               out: Path | None) -> dict[str, Any]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "worker.cli", "worker", "--endpoint", endpoint, "--model", str(ckpt),
           "--max-queue", "64", *pool_args]
    log_path = (out or Path(tempfile.gettempdir())) / f"pool_{label.replace(' ', '_')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result: dict[str, Any] = {"label": label, "members": members, "cmd": " ".join(cmd[1:])}
    try:
        t0 = time.perf_counter()
        wait_ready(endpoint, proc, args.start_timeout)
        # warm-up: every member loads the model and captures its graphs before the clock starts
        _, warm_problems = run_questions(endpoint, 2 * members, 2 * members, args)
        result["start_and_warmup_s"] = time.perf_counter() - t0
        if warm_problems:
            raise RuntimeError(f"warm-up failed: {warm_problems[:3]}")
        served: list[dict] = []
        secs, problems = run_questions(endpoint, args.questions, args.clients, args, served)
        answered = args.questions - len(problems)
        result.update({"questions": args.questions, "answered": answered, "s": secs, "q_per_s": answered / secs,
                       "problems": problems[:5], "per_member": per_member(served)})
        print(f"[pool] {label}: {answered}/{args.questions} questions in {secs:.2f}s -> {answered / secs:.2f} q/s "
              f"(start + warm-up {result['start_and_warmup_s']:.1f}s)", flush=True)
        for m in result["per_member"]:
            print(f"[pool]   member pid {m['pid']}: {m['answered']} answered, service {m['service_ms']:.0f} ms "
                  f"(model {m['model_ms']:.0f} ms) a question, queued {m['queue_ms']:.0f} ms", flush=True)
    finally:
        try:
            from qgis_plugin.client import WorkerClient

            with WorkerClient(endpoint, timeout_s=3.0) as c:
                c.shutdown()
            proc.wait(30)
        except Exception:  # noqa: BLE001 - fall back to signalling our own process group
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu_pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="terrascope-8b")
    p.add_argument("--shape", default="full", choices=["full", "tiny"])
    p.add_argument("--model", default=None, help="an existing checkpoint folder (skips the random one)")
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128, help="max_new_tokens of each question")
    p.add_argument("--image", type=int, default=896, help="side of the square test raster")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if args.device == "cuda":
        import torch

        n_gpu = torch.cuda.device_count()
        if n_gpu < 2:
            print(f"bench.gpu_pool: needs 2 GPUs, {n_gpu} visible", file=sys.stderr)
            return 2
        configs = [("1 GPU", ["--gpus", "0"], 1), ("2 GPUs", ["--gpus", "0,1"], 2)]
    else:
        configs = [("1 worker", ["--workers", "1", "--device", "cpu"], 1),
                   ("2 workers", ["--workers", "2", "--device", "cpu"], 2)]
    with tempfile.TemporaryDirectory(prefix="terrascope-poolbench-") as tmp:
        ckpt = Path(args.model) if args.model else save_random_checkpoint(args, Path(tmp))
        results = [bench_pool(label, extra, members, ckpt, args, out) for label, extra, members in configs]
    ratio = results[1]["q_per_s"] / results[0]["q_per_s"] if results[0].get("q_per_s") else float("nan")
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results, "ratio": ratio,
               "questions": args.questions, "clients": args.clients, "tokens": args.tokens}
    if out is not None:
        (out / "bench_gpu_pool.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n== bench-gpu-pool {summary['date']} ==")
    for r in results:
        print(f"{r['label']:<10} {r.get('q_per_s', float('nan')):6.2f} q/s  ({r.get('answered')}/{r.get('questions')} "
              f"in {r.get('s', float('nan')):.1f}s)")
    print(f"scaling {ratio:.2f}x")
    return 0 if all(not r.get("problems") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
