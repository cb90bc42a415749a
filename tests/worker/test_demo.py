"""``make run`` (worker.demo) end to end, on the tiny checkpoint instead of the embedded model."""

from __future__ import annotations

import subprocess
import sys

import pyogrio
from workerlib import REPO, TINY_MODEL


def test_demo_answers_and_writes_a_geopackage(tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "worker.demo", "--model", str(TINY_MODEL), "--device", "cpu",
                           "--out", str(out), "--max-new-tokens", "12"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Answer:" in proc.stdout and "Results:" in proc.stdout
    gpkg = out / "answer.gpkg"
    assert str(gpkg) in proc.stdout
    assert "terrascope_answers" in [name for name, _ in pyogrio.list_layers(gpkg)]
    assert "worker stopped" in (out / "worker.log").read_text()  # shut down cleanly, not killed
