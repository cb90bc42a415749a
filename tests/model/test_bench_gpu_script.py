"""``make bench-gpu``'s script runs end to end at a toy shape on CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
