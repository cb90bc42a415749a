"""``make bench``: every CPU benchmark in turn, each as its own process, then a summary table.

    .venv/bin/python -m bench.run_all [--quick] [--only NAME,...] [--skip NAME,...] [--timeout S]

Runs, in order: ``bench.protocol_roundtrip`` (tcp round trip of a 1024² tile, 10,000² GeoTIFF request),
``bench.raster_prep`` (10,000² GeoTIFF to the model view), the CPU model bench (``bench.gpu --device cpu
--preset terrascope-mini``: one question on a 512x512 tile) and ``bench.load`` (full-size load) when that
module exists. Each bench's own output is streamed as it runs; a failing or hanging bench is reported and
the next one runs. Exit status: 0 when none failed (skipped ones do not count), 1 otherwise.
``--quick`` passes small sizes to every bench: seconds to minutes, to check this script, not to quote.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MINI_WEIGHTS = ROOT / "resources" / "models" / "terrascope-mini"


@dataclass
class Bench:
    name: str
    module: str
    args: list[str]
    quick_args: list[str]
    headline: str  # regex: the output lines quoted in the summary
    about: str = ""


@dataclass
class Outcome:
    bench: Bench
    status: str  # ok | FAILED | TIMEOUT | skipped
    seconds: float = 0.0
    rc: int | None = None
    figures: list[str] = field(default_factory=list)
    note: str = ""


BENCHES = [
    Bench("protocol_roundtrip", "bench.protocol_roundtrip", [], ["--repeat", "5", "--side", "2000"],
          r"round trip via the worker|echo \(floor\)|x3 GeoTIFF, |total \(target"),
    Bench("raster_prep", "bench.raster_prep", [], ["--size", "2000", "--layouts", "tiled-deflate"],
          r"\| (OK|OVER TARGET)\s*$|FAILED"),
    Bench("model_cpu", "bench.gpu",
          ["--device", "cpu", "--preset", "terrascope-mini", "--no-profile"],
          ["--device", "cpu", "--shape", "tiny", "--no-profile", "--repeats", "1", "--naive-repeats", "1",
           "--tokens", "32"],
          r"^\s*(prefill|decode|SAM-2 encode|per \[SEG\]|end to end)\s|^naive |^== bench-gpu|ERRORS"),
    Bench("load", "bench.load", [], ["--clients", "2", "--requests", "3", "--rss-requests", "100"],
          r"^(model|load|RSS over|exactly once)|requests/s"),
]


def _skip_reason(b: Bench) -> str | None:
    if importlib.util.find_spec(b.module) is None:
        return f"{b.module.replace('.', '/')}.py is not in this checkout yet"
    return None


def _note(b: Bench, quick: bool) -> str:
    if b.name != "model_cpu":
        return ""
    if quick:
        return "toy model shape (--quick)"
    # bench.gpu builds random weights of the preset's shape and a forced trace: its timings do not depend on
    # the trained weights, so it runs whether or not the embedded model has been trained yet.
    have = "present" if (MINI_WEIGHTS / "config.json").is_file() else "not present"
    return f"random weights of the terrascope-mini shape (resources/models/terrascope-mini {have}; not loaded)"


def run_one(b: Bench, quick: bool, timeout_s: float) -> Outcome:
    """Runs one bench in its own process group, streaming its output; a hang is killed after ``timeout_s``."""
    cmd = [sys.executable, "-m", b.module, *(b.quick_args if quick else b.args)]
    print(f"\n=== {b.name}: {' '.join(['python', *cmd[1:]])}", flush=True)
    note = _note(b, quick)
    if note:
        print(f"    ({note})", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    timed_out = False
    while True:
        left = timeout_s - (time.monotonic() - t0)
        try:
            line = lines.get(timeout=max(0.1, left))
        except queue.Empty:
            if time.monotonic() - t0 >= timeout_s:
                timed_out = True
                _kill(proc)
                break
            continue
        if line is None:
            break
        out.append(line.rstrip("\n"))
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    secs = time.monotonic() - t0
    pattern = re.compile(b.headline)
    figures = [ln.strip() for ln in out if pattern.search(ln)]
    if not figures:  # no known figure line (e.g. a crash): quote its last line
        figures = [ln.strip() for ln in out if ln.strip()][-1:]
    if timed_out:
        return Outcome(b, "TIMEOUT", secs, rc, figures, f"killed after {timeout_s:g} s")
    return Outcome(b, "ok" if rc == 0 else "FAILED", secs, rc, figures, note)


def _kill(proc: subprocess.Popen) -> None:
    """Ends the bench's own process group (it may have started a worker)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def summary(outcomes: list[Outcome]) -> str:
    rows = ["", "== bench summary ==", f"{'bench':<20} {'status':<10} {'time':>9}  figures"]
    for o in outcomes:
        status = f"FAILED({o.rc})" if o.status == "FAILED" else o.status
        time_s = f"{o.seconds:7.1f} s" if o.status != "skipped" else f"{'-':>9}"
        first, *rest = o.figures or [o.note or ""]
        rows.append(f"{o.bench.name:<20} {status:<10} {time_s}  {first}")
        rows.extend(f"{'':<43}{line}" for line in rest)
        if o.note and o.figures and o.status != "skipped":
            rows.append(f"{'':<43}({o.note})")
    failed = [o.bench.name for o in outcomes if o.status in ("FAILED", "TIMEOUT")]
    rows.append(f"{len(outcomes) - len(failed)} of {len(outcomes)} without failure"
                + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the benches run, figures not quotable")
    ap.add_argument("--only", default="", help=f"comma list of {','.join(b.name for b in BENCHES)}")
    ap.add_argument("--skip", default="", help="comma list of benches to leave out")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per bench before it is killed")
    args = ap.parse_args(argv)
    names = {b.name for b in BENCHES}
    only = {n for n in args.only.split(",") if n}
    skip = {n for n in args.skip.split(",") if n}
    unknown = (only | skip) - names
    if unknown:
        ap.error(f"unknown bench(es) {', '.join(sorted(unknown))}; known: {', '.join(b.name for b in BENCHES)}")
    outcomes = []
    for b in BENCHES:
        if (only and b.name not in only) or b.name in skip:
            continue
        why = _skip_reason(b)
        if why:
            print(f"\n=== {b.name}: SKIPPED ({why})", flush=True)
            outcomes.append(Outcome(b, "skipped", note=why))
            continue
        outcomes.append(run_one(b, args.quick, args.timeout))
    print(summary(outcomes), flush=True)
    return 1 if any(o.status in ("FAILED", "TIMEOUT") for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
