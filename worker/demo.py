"""``make run``: a worker on the embedded model answers a question about a bundled Sentinel-2 chip.

Starts ``terrascope worker`` as a separate process on a private endpoint, waits for the model,
asks through the same client the plugin uses (``terrascope ask --endpoint``), streams the
reasoning, writes the GeoPackage and mask GeoTIFFs to ``out/`` and shuts the worker down.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qgis_plugin.client import WorkerClient, WorkerUnavailable
from worker.cli import REPO, CliError, private_endpoint, resolve_model
from worker.cli import main as cli_main

SAMPLE = REPO / "resources" / "samples" / "Spain_7370579_S2Hand.tif"
QUESTION = "What share of this area is covered by water? Segment the water before answering."


def _wait_ready(endpoint: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with WorkerClient(endpoint, timeout_s=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise CliError(f"the worker exited with code {proc.returncode} (see the lines above)", 1)
            try:
                pong = client.ping()
            except WorkerUnavailable:
                continue
            if pong["state"] == "ready":
                return
            if pong["state"] == "failed":
                raise CliError(f"the model failed to load: {client.info().get('error')}", 1)
            time.sleep(0.3)
    raise CliError(f"the worker was not ready within {timeout_s:g} s", 1)


def run(model: str, device: str, out: Path, question: str, sample: Path, max_new_tokens: int) -> int:
    model_dir = resolve_model(model)
    if not sample.is_file():
        raise CliError(f"bundled sample {sample} is missing from this checkout")
    endpoint, tmp = private_endpoint()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "worker.log"
    print(f"Starting a TerraScope worker ({Path(model_dir).name}, device {device}); its log: {log_path}", flush=True)
    log = log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--endpoint", endpoint,
                             "--model", model_dir, "--device", device], cwd=REPO, stdout=log, stderr=log)
    try:
        try:
            _wait_ready(endpoint, proc, timeout_s=600)
        except CliError:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            print("\n".join(tail), file=sys.stderr)
            raise
        print(f"\nQuestion about {sample.name} (Sen1Floods11, Sentinel-2 L1C, 13 bands):\n  {question}\n", flush=True)
        code = cli_main(["ask", str(sample), "-q", question, "--endpoint", endpoint, "--out", str(out),
                         "--timeout", "10", "--max-new-tokens", str(max_new_tokens)])
        if code == 0:
            gpkgs = sorted(out.glob("*.gpkg"), key=lambda p: p.stat().st_mtime)
            if gpkgs:
                print(f"\nOpen {gpkgs[-1].resolve()} in QGIS to see the masks as polygon layers.")
        return code
    finally:
        try:
            with WorkerClient(endpoint, timeout_s=3.0) as client:
                client.shutdown()
            proc.wait(30)
        except (WorkerUnavailable, subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait(10)
        log.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__)
    p.add_argument("--model", default="terrascope-mini", help="checkpoint folder or preset (default %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="out", help="results folder (default %(default)s)")
    p.add_argument("--question", default=QUESTION)
    p.add_argument("--sample", default=str(SAMPLE))
    p.add_argument("--max-new-tokens", type=int, default=512)
    args = p.parse_args(argv)
    try:
        return run(args.model, args.device, Path(args.out), args.question, Path(args.sample), args.max_new_tokens)
    except CliError as exc:
        print(f"make run: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("make run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
