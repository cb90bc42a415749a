"""``make bench-gpu``'s script runs end to end at a toy shape on CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_bench_gpu_tiny_shape_on_cpu_writes_every_section(tmp_path):
    cmd = [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--shape", "tiny", "--batches", "2",
           "--prepare", "many", "--early-ab", "--repeats", "1", "--naive-repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["errors"] == []
    assert [w["kind"] for w in result["workloads"]] == ["optical"] and len(result["naive"]) == 1
    fast, naive = result["workloads"][0], result["naive"][0]
    # forced traces: both paths do the same work (128 tokens, 2 masks)
    assert fast["tokens"] == naive["tokens"] and fast["seg"] == naive["seg"] == 2
    assert [(t["batch"], t["shared"]) for t in result["throughput"]] == [(2, True), (2, True), (2, False)]  # --early-ab: a lazy-SAM-2 rerun
    assert all(t["all_two_masks"] and t["q_per_s"] > 0 for t in result["throughput"])
    assert "end to end" in proc.stdout


def test_gpu_gaps_charges_each_idle_gap_to_the_innermost_open_phase():
    from bench.gpu import gpu_gaps

    def x(name: str, cat: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        x("ts:generate", "user_annotation", 0, 1000), x("ts:seg_handler", "user_annotation", 300, 200),
        x("k1", "kernel", 0, 100), x("k2", "kernel", 50, 150),  # overlapping: one busy span [0, 200)
        x("m", "gpu_memcpy", 210, 40),  # a 10 us gap: under the 50 us floor, not counted
        x("k3", "kernel", 350, 100),  # gap [250, 350): its middle 300 is inside ts:seg_handler
        x("k4", "kernel", 600, 100),  # gap [450, 600): middle 525 only inside ts:generate
        x("k5", "kernel", 1200, 10),  # gap [700, 1200): middle 950 inside ts:generate
        x("cpu", "cpu_op", 0, 5000),  # host ops are not device work
    ]}
    g = gpu_gaps(trace)
    assert g["span_ms"] == pytest.approx(1.21) and g["busy_ms"] == pytest.approx(0.45)  # 200+40+100+100+10 us
    assert g["gaps"] == {"ts:generate": {"ms": pytest.approx(0.65), "count": 2},
                         "ts:seg_handler": {"ms": pytest.approx(0.1), "count": 1}}
    assert list(g["gaps"]) == ["ts:generate", "ts:seg_handler"]  # largest first
