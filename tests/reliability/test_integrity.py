"""Data integrity (issue 7, parts 5-6): results are written atomically and never over a user's file.

A real writer process (worker.output.write_results) is SIGKILLed while its GeoPackage is being
written - the moment its hidden ``.partial`` file exists. Every earlier result must still read
completely and byte-identically, no half-written file may carry a real name, and the next writer
cleans up what the dead one left.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from relharness import REPO, utm_wkt, worker_env

from worker.measure import Georef
from worker.output import ANSWERS_TABLE, write_results

WRITER = r"""
import sys
import numpy as np
from pyproj import CRS
from worker.measure import Georef
from worker.output import write_results

out, n = sys.argv[1], int(sys.argv[2])
georef = Georef.from_gdal([500000, 1, 0, 5000000, 0, -1], CRS.from_epsg(32633).to_wkt())
mask = np.kron(np.indices((100, 100)).sum(0) % 2 == 0, np.ones((8, 8), bool))  # 5,000 squares
mask[::4] = False
for i in range(n):
    r = write_results(out, f"question {i}", {"answer": f"answer {i}"},
                      [(mask, georef, "checkerboard", 0.9, 0, None)])
    print(r["gpkg"], flush=True)
"""


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _check_gpkg(p: Path) -> int:
    """Opens a results GeoPackage completely: SQLite integrity, every layer, the answers table."""
    with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", p
    layers = [name for name, _ in pyogrio.list_layers(p)]
    assert ANSWERS_TABLE in layers and any(n.startswith("step1_") for n in layers), (p, layers)
    rows = 0
    for name in layers:
        rows += len(pyogrio.read_dataframe(p, layer=name))
    return rows


def _finals(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def test_killing_a_writer_mid_write_leaves_every_earlier_result_readable(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-c", WRITER, str(out), "1"], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    first = Path(done.stdout.split()[0])
    before = {p: _sha(p) for p in _finals(out)}
    rows = _check_gpkg(first)
    killed_mid_write = 0
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "5"], cwd=REPO, env=worker_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if any(out.glob(".answer*.gpkg.*.partial*")):  # its GeoPackage is being written right now
                proc.send_signal(signal.SIGKILL)
                killed_mid_write += 1
                break
            time.sleep(0.002)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        for p, digest in before.items():  # everything written before is untouched ...
            assert _sha(p) == digest, f"{p.name} changed"
        for p in _finals(out):  # ... and nothing under a real name is half-written
            if p.suffix == ".gpkg":
                assert _check_gpkg(p) >= 1
            before.setdefault(p, _sha(p))
        assert _check_gpkg(first) == rows
    assert killed_mid_write == 3
    assert list(out.glob(".*partial*")), "the dead writers' partial files should still be there"
    # the next writer works, names its file freshly and removes the dead writers' leftovers
    done = subprocess.run([sys.executable, "-c", WRITER, str(out), "1"], cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=120, check=True)
    newest = Path(done.stdout.split()[0])
    assert newest not in before and _check_gpkg(newest) == rows
    assert not list(out.glob(".*partial*"))
    for p, digest in before.items():
        assert _sha(p) == digest


def test_results_never_overwrite_user_files(tmp_path: Path) -> None:
    georef = Georef.from_gdal([500000, 10, 0, 5000000, 0, -10], utm_wkt())
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    users = {tmp_path / "answer.gpkg": b"my own notes, not a GeoPackage",
             tmp_path / "answer-step1.tif": b"my own raster",
             tmp_path / "answer-2.gpkg": b"another file of mine"}
    for p, data in users.items():
        p.write_bytes(data)
    got = write_results(tmp_path, "q", {"answer": "a"}, [(mask, georef, "square", 0.9, 0, None)])
    for p, data in users.items():
        assert p.read_bytes() == data
    assert Path(got["gpkg"]).name == "answer-3.gpkg"
    assert all(Path(t).name not in {p.name for p in users} for t in got["geotiffs"])
    assert _check_gpkg(Path(got["gpkg"])) >= 2


@pytest.mark.parametrize("name", ["answer.gpkg", "answer-step1.tif"])
def test_a_name_taken_during_the_write_is_not_overwritten(tmp_path: Path, name: str) -> None:
    """The final name is claimed with link(), which fails rather than replace a file that appeared
    while the result was being written (another program, a second writer): the next free name is used."""
    from worker.output import _partial_path, _publish

    final = tmp_path / name
    tmp = _partial_path(final)
    tmp.write_bytes(b"the new result")
    final.write_bytes(b"appeared while we were writing")
    got = _publish(tmp, final)
    assert got != final and got.read_bytes() == b"the new result"
    assert final.read_bytes() == b"appeared while we were writing"
    assert not tmp.exists()
