"""The ``terrascope`` command line: measure, one-line errors, exit codes, ask end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Geod
from rasterio.transform import from_origin
from workerlib import REPO, TINY_MODEL, UTM33, raster


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("terrascope: error: ")
    return lines[0]


def write_tif(path: Path, data: np.ndarray, transform=None, crs: str | None = UTM33, nodata=None) -> Path:
    data = data if data.ndim == 3 else data[None]
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform or from_origin(500000, 4649000, 10, 10),
                       nodata=nodata) as ds:
        ds.write(data)
    return path


def test_measure_a_mask_in_utm(tmp_path) -> None:
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 10:30] = 1  # 200 m x 200 m = 4 ha
    mask[60:70, 60:90] = 1  # 100 m x 300 m = 3 ha
    f = write_tif(tmp_path / "m.tif", mask)
    proc = cli("measure", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # independent value: the geodesic area of the two squares' lon/lat corners
    from pyproj import Transformer

    to_ll = Transformer.from_crs(UTM33, "EPSG:4326", always_xy=True)
    geod = Geod(ellps="WGS84")
    total = 0.0
    for (x0, y0, x1, y1) in ((500100, 4648900, 500300, 4648700), (500600, 4648400, 500900, 4648300)):
        xs = np.r_[np.linspace(x0, x1, 50), np.full(50, x1), np.linspace(x1, x0, 50), np.full(50, x0)]
        ys = np.r_[np.full(50, y0), np.linspace(y0, y1, 50), np.full(50, y1), np.linspace(y1, y0, 50)]
        lon, lat = to_ll.transform(xs, ys)
        total += abs(geod.polygon_area_perimeter(lon, lat)[0])
    assert out["area_ha"] == pytest.approx(total / 1e4, rel=1e-3)
    assert out["count"] == 2
    assert out["coverage_pct"] == pytest.approx(7.0)
    text = cli("measure", str(f))
    assert text.returncode == 0 and "ha" in text.stdout and "objects:    2" in text.stdout


def test_measure_value_and_no_crs(tmp_path) -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[:5] = 3
    mask[10:] = 1
    f = write_tif(tmp_path / "m.tif", mask, crs=None)
    out = json.loads(cli("measure", str(f), "--value", "3", "--json").stdout)
    assert out["area_px"] == 100 and out["area_ha"] is None and out["units"] == "px"
    assert "CRS" in out["note"]


def test_errors_are_one_line_with_exit_codes(tmp_path) -> None:
    proc = cli("measure", str(tmp_path / "missing.tif"))
    assert proc.returncode == 2 and "missing.tif" in one_line_error(proc)
    proc = cli("ask", str(tmp_path / "nope.tif"), "-q", "x?")
    assert proc.returncode == 2 and "no such file" in one_line_error(proc)
    img = write_tif(tmp_path / "a.tif", raster())
    proc = cli("ask", str(img), "-q", "x?", "--model", str(tmp_path / "no-model"))
    assert proc.returncode == 2 and "does not exist" in one_line_error(proc)
    proc = cli("ask", str(img), "-q", "x?", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "1")
    assert proc.returncode == 3 and "no TerraScope worker reachable" in one_line_error(proc)
    proc = cli("ping", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "1")
    assert proc.returncode == 3
    one_line_error(proc)
    proc = cli("--debug", "ping", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "1")
    assert proc.returncode == 3 and "Traceback" in proc.stderr


def test_default_model_missing_says_so(tmp_path, monkeypatch, capsys) -> None:
    import worker.cli as cli_module

    # a clone without the embedded weights: the models folder is elsewhere
    monkeypatch.setattr(cli_module, "MODELS_DIR", tmp_path / "models")
    img = write_tif(tmp_path / "a.tif", raster())
    assert cli_module.main(["ask", str(img), "-q", "x?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("terrascope: error: ")
    assert "embedded model terrascope-mini not found" in err[0] and "--model DIR" in err[0]


def test_bench_and_train_pass_their_arguments_on() -> None:
    bench = cli("bench", "--help")
    assert bench.returncode == 0 and "--injection" in bench.stdout
    train = cli("train", "--help")
    assert train.returncode == 0 and "--time-budget-s" in train.stdout
    missing = cli("train", "no-such-config.json")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "no-such-config.json" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


# --- ask end to end (in-process worker, then a separate worker) ---------------------------------
def _check_answer(out: dict, question: str) -> None:
    assert out["question"] == question
    for key in ("answer", "choice", "reasoning", "text", "masks", "measurements", "timings_ms", "model"):
        assert key in out
    assert isinstance(out["text"], str) and isinstance(out["answer"], str)
    assert out["timings_ms"]["total"] > 0
    assert len(out["masks"]) == len(out["measurements"])
    for m in out["masks"]:
        assert set(m) >= {"step", "label", "image", "area_ha", "coverage_pct", "count", "score", "region_rule",
                          "geotiff", "layer"}


def test_ask_json_in_process_writes_results(tmp_path) -> None:
    img = write_tif(tmp_path / "scene.tif", raster(48, 48))
    q = "Which part of the scene is bright?"
    proc = cli("ask", str(img), "-q", q, "--model", str(TINY_MODEL), "--device", "cpu", "--max-new-tokens", "60",
               "--out", str(tmp_path / "out"), "--json", "--option", "A. the top left", "--option", "B. nothing",
               "--forced-prefix", "<think>The bright part [SEG] is", "--ground")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    _check_answer(out, q)
    assert len(out["masks"]) == 1 and out["masks"][0]["area_ha"] > 0
    gpkg = Path(out["gpkg"])
    assert gpkg.exists() and gpkg.parent == tmp_path / "out"
    import pyogrio

    layers = [name for name, _ in pyogrio.list_layers(gpkg)]
    assert "terrascope_answers" in layers
    for m in out["masks"]:
        assert Path(m["geotiff"]).exists() and m["layer"] in layers
        with rasterio.open(m["geotiff"]) as ds:  # the mask is on the input's grid and CRS
            assert ds.shape == (48, 48) and ds.crs.to_epsg() == 32633
            assert ds.transform.to_gdal() == from_origin(500000, 4649000, 10, 10).to_gdal()


def test_ask_against_a_running_worker(worker, tmp_path) -> None:
    img = write_tif(tmp_path / "scene.tif", raster(40, 40))
    proc = cli("ask", str(img), "-q", "What is here?", "--endpoint", worker.endpoint, "--max-new-tokens", "8",
               "--json")
    assert proc.returncode == 0, proc.stderr
    _check_answer(json.loads(proc.stdout), "What is here?")
    text = cli("ask", str(img), "-q", "What is here?", "--endpoint", worker.endpoint, "--max-new-tokens", "40",
               "--forced-prefix", "<think>I segment the buildings in the eastern half [SEG]")
    assert text.returncode == 0 and "Answer:" in text.stdout
    assert "  mask 1 [I segment the buildings in the eastern half] (eastern half): " in text.stdout
    # two IMAGEs = a time series t0, t1; masks come back per image and are written with --out
    later = write_tif(tmp_path / "later.tif", raster(40, 40, seed=5))
    proc = cli("ask", str(img), str(later), "-q", "What changed?", "--endpoint", worker.endpoint,
               "--max-new-tokens", "80", "--json", "--out", str(tmp_path / "series"),
               "--forced-prefix", "<think>Before [SEG] and after [SEG] the")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [m["step"] for m in out["masks"]] == [0, 1]
    assert all(m["image"] in (0, 1) and Path(m["geotiff"]).exists() for m in out["masks"])
    proc = cli("ask", str(img), str(later), "--sar", str(img), "-q", "x?", "--endpoint", worker.endpoint)
    assert proc.returncode == 2 and "time series" in one_line_error(proc)


def test_ask_bad_raster_is_one_line(worker, tmp_path) -> None:
    img = write_tif(tmp_path / "nodata.tif", np.zeros((3, 16, 16), np.uint8), nodata=0)
    for extra in ((), ("--endpoint", worker.endpoint)):
        proc = cli("ask", str(img), "-q", "x?", "--model", str(TINY_MODEL), "--device", "cpu", *extra)
        assert proc.returncode == 2
        assert "nodata" in one_line_error(proc).lower()
