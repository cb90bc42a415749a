"""Result files: GeoPackage layers and attributes, mask GeoTIFFs, no overwrite, atomic under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from affine import Affine
from pyproj import CRS, Proj, Transformer

from worker.measure import Georef, measure_mask
from worker.output import ANSWERS_TABLE, write_results

UTM33 = CRS.from_epsg(32633).to_wkt()
G = Georef(Affine(10.0, 0, 500_000, 0, -10.0, 5_000_000), UTM33)
RESULT = {"answer": "About 1 ha of water.", "choice": "B", "reasoning": "I segmented [SEG] the water.",
          "text": "<think>...[SEG]...</think><answer>B</answer>", "model": {"name": "tiny"}}


def _masks() -> tuple[np.ndarray, np.ndarray]:
    water = np.zeros((200, 200), bool)
    water[10:110, 10:110] = True  # 1 km², one object
    water[150:160, 150:160] = True  # 1 ha
    roads = np.zeros_like(water)
    roads[180:182, :] = True
    return water, roads


def test_geopackage_layers_attributes_and_geotiffs(tmp_path):
    water, roads = _masks()
    out = write_results(tmp_path, "How much water?", RESULT,
                        [(water, G, "the water regions", 0.91, 0, None),
                         (roads, G, "the roads", 0.5, 0, measure_mask(roads, G))])
    gpkg = Path(out["gpkg"])
    assert gpkg.name == "answer.gpkg"
    names = [n for n, _ in pyogrio.list_layers(gpkg)]
    assert names == ["step1_the_water_regions", "step2_the_roads", ANSWERS_TABLE]
    water_df = pyogrio.read_dataframe(gpkg, layer="step1_the_water_regions")
    assert len(water_df) == 2 and set(water_df.columns) >= {"step", "label", "area_ha", "perimeter_m", "score",
                                                             "image", "geometry"}
    assert CRS.from_user_input(water_df.crs).to_epsg() == 32633
    assert (water_df["step"] == 0).all() and (water_df["label"] == "the water regions").all()
    assert water_df["score"].iloc[0] == pytest.approx(0.91)
    # UTM 33N on the central meridian: ground area = planar / 0.9996² (pyproj's areal scale factor)
    lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(500_600, 4_999_400)
    k2 = Proj("EPSG:32633").get_factors(lon, lat).areal_scale
    assert sorted(water_df["area_ha"]) == pytest.approx(sorted([100.0 / k2, 1.0 / k2]), rel=1e-4)
    assert water_df["perimeter_m"].max() == pytest.approx(4000.0 / 0.9996, rel=1e-3)
    assert water_df.geometry.area.sum() == pytest.approx(1_010_000.0)  # planar, in the layer CRS
    table = pyogrio.read_dataframe(gpkg, layer=ANSWERS_TABLE)
    row = table.iloc[0]
    assert row["question"] == "How much water?" and row["answer"] == RESULT["answer"]
    assert row["reasoning"] == RESULT["reasoning"] and row["choice"] == "B"
    assert "the roads" in row["steps_json"]
    meta = pyogrio.read_info(gpkg, layer="step1_the_water_regions")["layer_metadata"]
    assert meta["terrascope_question"] == "How much water?"
    assert [Path(p).name for p in out["geotiffs"]] == ["answer-step1.tif", "answer-step2.tif"]
    with rasterio.open(out["geotiffs"][0]) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.transform == G.transform
        assert np.array_equal(ds.read(1).astype(bool), water)
        assert ds.tags()["label"] == "the water regions"
    assert not list(tmp_path.glob(".*partial*"))


def test_empty_mask_and_no_crs_steps(tmp_path):
    empty = np.zeros((20, 20), bool)
    px = np.zeros((20, 20), bool)
    px[2:5, 2:6] = True
    out = write_results(tmp_path, "q", {"answer": "none"},
                        [(empty, G, "nothing", 0.1, 0, None), (px, Georef(Affine.identity(), None), "x", 0.2, 1, None)])
    gpkg = out["gpkg"]
    assert len(pyogrio.read_dataframe(gpkg, layer=out["layers"][0])) == 0
    df = pyogrio.read_dataframe(gpkg, layer=out["layers"][1])
    assert len(df) == 1 and df["area_ha"].isna().all() and df["area_px"].iloc[0] == 12
    assert df["image"].iloc[0] == 1


def test_existing_user_files_are_never_overwritten(tmp_path):
    water, _ = _masks()
    (tmp_path / "answer.gpkg").write_bytes(b"the user's own file")
    (tmp_path / "answer-2-step1.tif").write_bytes(b"another user file")
    out = write_results(tmp_path, "q", RESULT, [(water, G, "water", 0.9, 0, None)])
    assert (tmp_path / "answer.gpkg").read_bytes() == b"the user's own file"
    assert (tmp_path / "answer-2-step1.tif").read_bytes() == b"another user file"
    assert Path(out["gpkg"]).name == "answer-2.gpkg"
    assert Path(out["geotiffs"][0]).name == "answer-2-step1-2.tif"
    again = write_results(tmp_path, "q", RESULT, [(water, G, "water", 0.9, 0, None)])
    assert Path(again["gpkg"]).name == "answer-3.gpkg"
    assert pyogrio.read_dataframe(out["gpkg"], layer=out["layers"][0]).shape[0] == 2


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from affine import Affine
    from pyproj import CRS
    from worker.measure import Georef
    from worker.output import write_results
    g = Georef(Affine(1.0, 0, 500000, 0, -1.0, 5000000), CRS.from_epsg(32633).to_wkt())
    mask = np.zeros((1200, 1200), bool)
    mask[::4, ::4] = True  # 90,000 separate objects: a slow GeoPackage write
    print("ready", flush=True)
    write_results(sys.argv[1], "slow question", {"answer": "slow"}, [(mask, g, "dots", 0.5, 0, None)])
    print("finished", flush=True)
    """
)


def test_sigkill_mid_write_leaves_the_previous_result_readable(tmp_path):
    water, _ = _masks()
    first = write_results(tmp_path, "first question", RESULT, [(water, G, "water", 0.9, 0, None)])
    before = Path(first["gpkg"]).read_bytes()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(tmp_path.glob(".answer-2.gpkg.*.partial.gpkg")):
            assert proc.poll() is None, "writer finished before it could be killed"
            time.sleep(0.005)
        assert list(tmp_path.glob(".answer-2.gpkg.*.partial.gpkg")), "writer never started the GeoPackage"
        time.sleep(0.05)  # well inside writing 90,000 features
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert b"finished" not in proc.stdout.read()
    # the previous result is untouched and opens; no half-written file took a real name
    assert Path(first["gpkg"]).read_bytes() == before
    df = pyogrio.read_dataframe(first["gpkg"], layer=first["layers"][0])
    assert len(df) == 2
    assert pyogrio.read_dataframe(first["gpkg"], layer=ANSWERS_TABLE)["question"].iloc[0] == "first question"
    assert not (tmp_path / "answer-2.gpkg").exists()
    assert list(tmp_path.glob(".*.partial*"))  # the dead writer's partial file is still there...
    nxt = write_results(tmp_path, "next", RESULT, [(water, G, "water", 0.9, 0, None)])
    assert not list(tmp_path.glob(".*.partial*"))  # ...until the next write cleans it up
    assert Path(nxt["gpkg"]).name == "answer-2.gpkg"
    assert len(pyogrio.read_dataframe(nxt["gpkg"], layer=nxt["layers"][0])) == 2
