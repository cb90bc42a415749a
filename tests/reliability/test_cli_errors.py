"""The bad-input corpus through the ``terrascope`` command line: one clear line, no traceback, a
non-zero exit, and awkward-but-valid rasters (complex SAR, 13 bands, 16-bit, no CRS) answered."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from relharness import DATA, FIXTURE, REPO, WorkerProc, needs_model, utm_wkt, worker_env

pytestmark = needs_model


def terrascope(*args: str | bytes, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=worker_env(),
                          capture_output=True, timeout=timeout, check=False)


def one_line_error(proc: subprocess.CompletedProcess, code: int | None = None) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, (proc.returncode, err, proc.stdout[-500:])
    if code is not None:
        assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("terrascope: error: "), err
    return lines[0]


def _tif(path: Path, data: np.ndarray, crs: str | None = "utm", nodata: float | None = None,
         transform: object = from_origin(500000, 5000000, 10, 10)) -> Path:
    profile = {"driver": "GTiff", "width": data.shape[-1], "height": data.shape[-2], "count": data.shape[0],
               "dtype": data.dtype, "nodata": nodata}
    if crs is not None:
        profile.update(crs=rasterio.crs.CRS.from_wkt(utm_wkt()) if crs == "utm" else crs, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    good = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
    f = {
        "good": _tif(d / "good.tif", good),
        "all_nodata": _tif(d / "all_nodata.tif", np.zeros((3, 32, 32), np.uint8), nodata=0),
        "all_nan": _tif(d / "all_nan.tif", np.full((1, 32, 32), np.nan, np.float32)),
        "strip": _tif(d / "strip.tif", good[:, :1, :]),
        "no_crs": _tif(d / "no_crs.tif", good, crs=None),
        "corrupt": d / "corrupt.tif",
        "empty": d / "empty.tif",
        "text": d / "notes.tif",
        "mask_no_crs": _tif(d / "mask_no_crs.tif", (good[:1] > 128).astype(np.uint8), crs=None),
        "big": _tif(d / "big.tif", np.ones((4, 2048, 2048), np.uint16)),  # 32 MiB read; the worker takes 16
    }
    f["corrupt"].write_bytes(b"II*\x00" + rng.bytes(5000))  # a TIFF signature, then garbage
    f["empty"].write_bytes(b"")
    f["text"].write_text("not a raster\n")
    return f


def ask_args(worker: WorkerProc, *images: Path | str, question: str | bytes = "Where is the water?") -> list:
    return ["ask", *map(str, images), "-q", question, "--endpoint", worker.endpoint, "--max-new-tokens", "4"]


REFUSED = [
    # (case, builds the arguments, exit code, words the line must contain)
    ("missing file", lambda w, f: ask_args(w, f["good"].parent / "nope.tif"), 2, "no such file"),
    ("corrupt GeoTIFF", lambda w, f: ask_args(w, f["corrupt"]), 2, "corrupt.tif"),
    ("empty file", lambda w, f: ask_args(w, f["empty"]), 2, "empty.tif"),
    ("text file", lambda w, f: ask_args(w, f["text"]), 2, "notes.tif"),
    ("all-nodata raster", lambda w, f: ask_args(w, f["all_nodata"]), 2, "no valid pixels"),
    ("all-NaN raster", lambda w, f: ask_args(w, f["all_nan"]), 2, "no valid pixels"),
    ("1xN raster", lambda w, f: ask_args(w, f["strip"]), 2, "1x32"),
    ("over the worker's size limit", lambda w, f: ask_args(w, f["big"]), 2, "too_large"),
    ("empty question", lambda w, f: ask_args(w, f["good"], question=""), 2, "empty"),
    ("20,000-character question", lambda w, f: ask_args(w, f["good"], question="Where is it? " * 1700), 2,
     "limit is 4000"),
    ("non-UTF-8 question", lambda w, f: ask_args(w, f["good"], question=b"\xff\xfe water?"), 2, "not valid Unicode"),
    ("one option", lambda w, f: [*ask_args(w, f["good"]), "--option", "water"], 2, "options"),
    ("nine options", lambda w, f: [*ask_args(w, f["good"]), *["--option", "x"] * 9], 2, "options"),
    ("max-new-tokens 0", lambda w, f: [*ask_args(w, f["good"]), "--max-new-tokens", "0"], 2, "max_new_tokens"),
    ("max-new-tokens 10^9", lambda w, f: [*ask_args(w, f["good"]), "--max-new-tokens", "1000000000"], 2,
     "max_new_tokens"),
    ("SAR with a series", lambda w, f: [*ask_args(w, f["good"], f["good"]), "--sar", str(f["good"])], 2, "--sar"),
    ("measure a text file", lambda w, f: ["measure", str(f["text"])], 2, "notes.tif"),
    ("nobody listening", lambda w, f: ["ping", "--endpoint", "tcp://127.0.0.1:9", "--timeout", "1"], 3,
     "no TerraScope worker"),
]


@pytest.mark.parametrize(("name", "build", "code", "words"), REFUSED, ids=[c[0] for c in REFUSED])
def test_cli_refuses_with_one_clear_line(worker: WorkerProc, files: dict[str, Path], name: str, build: object,
                                         code: int, words: str) -> None:
    line = one_line_error(terrascope(*build(worker, files)), code)  # type: ignore[operator]
    assert words in line, line


def test_cli_usage_errors_have_no_traceback(worker: WorkerProc, files: dict[str, Path]) -> None:
    for args in (["frobnicate"], [*ask_args(worker, files["good"]), "--max-new-tokens", "lots"], ["ask"]):
        proc = terrascope(*args)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith(
            "terrascope"), err


SERVED = [
    ("complex SAR SLC, rotated geotransform", [DATA / "spacenet6_rotterdam" / "sar_vv.tif"]),
    ("13-band Sentinel-2", [DATA / "sen1floods11" / "Spain_7370579_S2Hand.tif"]),
    ("optical + float SAR pair", [DATA / "sen1floods11" / "Spain_7370579_S2Hand.tif", "--sar",
                                  DATA / "sen1floods11" / "Spain_7370579_S1Hand.tif"]),
    ("16-bit 4-band", [DATA / "cloud_s2" / "adwp_B02_B03_B04_B08.tif"]),
    ("no CRS", ["NO_CRS"]),
]


@pytest.mark.parametrize(("name", "images"), SERVED, ids=[c[0] for c in SERVED])
def test_cli_answers_awkward_rasters(worker: WorkerProc, files: dict[str, Path], name: str, images: list) -> None:
    images = [files["no_crs"] if i == "NO_CRS" else i for i in images]
    proc = terrascope(*ask_args(worker, *images), "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert out["text"] and out["timings_ms"]["total"] > 0


def test_cli_measure_without_crs_refuses_hectares_clearly(files: dict[str, Path]) -> None:
    proc = terrascope("measure", str(files["mask_no_crs"]))
    text = proc.stdout.decode()
    assert proc.returncode == 0 and " px " in text and "no ha" in text and "CRS" in text, text
    got = json.loads(terrascope("measure", str(files["mask_no_crs"]), "--json").stdout)
    assert got["area_ha"] is None and got["area_px"] > 0 and "CRS" in got["note"]


def test_cli_in_process_worker_refuses_a_bad_raster_in_one_line(files: dict[str, Path]) -> None:
    """Without --endpoint the CLI runs the worker in-process (same service code path)."""
    proc = terrascope("ask", str(files["all_nodata"]), "-q", "Where is the water?", "--model", str(FIXTURE),
                      "--device", "cpu", "--max-new-tokens", "4", timeout=120)
    assert "no valid pixels" in one_line_error(proc, 2)


def test_cli_out_never_overwrites_user_files(worker: WorkerProc, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "answer.gpkg"
    mine.write_bytes(b"the user's own file, not a GeoPackage")
    before = hashlib.sha256(mine.read_bytes()).hexdigest()
    written = []
    for _ in range(2):
        proc = terrascope(*ask_args(worker, files["good"]), "--out", str(out), "--json")
        assert proc.returncode == 0, proc.stderr.decode()
        written.append(json.loads(proc.stdout)["gpkg"])
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == before
    assert [Path(p).name for p in written] == ["answer-2.gpkg", "answer-3.gpkg"]
    assert not list(out.glob(".*partial*")), "temporary files left behind"
