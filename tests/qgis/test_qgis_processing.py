"""The Processing algorithms run headless through processing.run against a real worker."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import use_settings
from qgis.core import (
    QgsDistanceArea,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgislib import ATLANTA_UTM, SAMPLE_4326, find_seg_seed, scene, write_geotiff

from qgis_plugin.alg_batch import read_questions_csv
from qgis_plugin.geometry import DEFAULT_ELLIPSOID
from qgis_plugin.rasters import read_window


@pytest.fixture
def rasters(tmp_path):
    """Three rasters in three CRSs: a generated UTM scene, the bundled EPSG:4326 sample, a real UTM chip."""
    generated = write_geotiff(tmp_path / "scene.tif", scene(40, 56), (699960.0, 10, 0, 4100040.0, 0, -10), 32630,
                              band_names=["red", "green", "blue"])
    return [str(generated), str(SAMPLE_4326), str(ATLANTA_UTM)]


def _run(alg: str, params: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run(alg, params, feedback=feedback or QgsProcessingFeedback())


def test_batch_on_three_rasters(plugin, qgis_processing, worker, rasters, tmp_path):
    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=96, max_new_tokens=6)
    out = tmp_path / "answers.gpkg"
    result = _run("terrascope:ask_batch", {"INPUTS": rasters, "QUESTION": "Is there water?",
                                           "OUTPUT": str(out), "MASKS": "TEMPORARY_OUTPUT"})
    layer = QgsVectorLayer(result["OUTPUT"], "answers", "ogr")
    assert layer.isValid() and layer.featureCount() == 3
    assert layer.crs().authid() == "EPSG:32630"  # the first raster's CRS
    rows = list(layer.getFeatures())
    assert [r["raster"] for r in rows] == rasters
    for row in rows:
        assert row["question"] == "Is there water?"
        assert row["answer"] and not row["error"]
        assert row["measured_choice"] == ""  # no options: no option to support
        assert json.loads(row["area_ha_steps"]) == [] or row["steps"] >= 1
        assert row.geometry().area() > 0
    # The EPSG:4326 sample's extent, reprojected into UTM 30N, lands on its real place (Murcia, Spain).
    centroid = rows[1].geometry().centroid().asPoint()
    assert 600_000 < centroid.x() < 700_000 and 4_200_000 < centroid.y() < 4_230_000
    assert "MASKS" in result


def test_batch_questions_csv_folder_and_cancel(plugin, qgis_processing, worker, rasters, tmp_path):
    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=96, max_new_tokens=4)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        write_geotiff(folder / f"r{i}.tif", scene(32, 32, seed=i), (500000, 10, 0, 4100000, 0, -10), 32631)
    (folder / "notes.txt").write_text("not a raster")
    csv_path = tmp_path / "questions.csv"
    csv_path.write_text("question,options\nIs there water?,\nWhich is larger?,A. water|B. land\n", encoding="utf-8")
    assert read_questions_csv(str(csv_path)) == [("Is there water?", []), ("Which is larger?", ["A. water", "B. land"])]
    result = _run("terrascope:ask_batch", {"FOLDER": str(folder), "QUESTIONS_CSV": str(csv_path),
                                           "OUTPUT": "TEMPORARY_OUTPUT"})
    layer = result["OUTPUT"]
    assert layer.featureCount() == 4  # 2 rasters x 2 questions
    assert {f["question"] for f in layer.getFeatures()} == {"Is there water?", "Which is larger?"}

    class CancelAfterFirst(QgsProcessingFeedback):
        def pushInfo(self, info):
            super().pushInfo(info)
            if info.strip().startswith("→"):
                self.cancel()

    result = _run("terrascope:ask_batch", {"FOLDER": str(folder), "QUESTIONS_CSV": str(csv_path),
                                           "OUTPUT": "TEMPORARY_OUTPUT"}, CancelAfterFirst())
    assert result["OUTPUT"].featureCount() == 1, "cancel stops the batch after the running question"


def test_batch_refuses_bad_parameters_in_one_line(plugin, qgis_processing, rasters, tmp_path):
    for params, words in (({"INPUTS": rasters, "OUTPUT": "TEMPORARY_OUTPUT"}, "question"),
                          ({"QUESTION": "x", "OUTPUT": "TEMPORARY_OUTPUT"}, "raster"),
                          ({"INPUTS": rasters, "QUESTION": "x", "SAR_LAYERS": rasters[:1],
                            "OUTPUT": "TEMPORARY_OUTPUT"}, "SAR")):
        with pytest.raises(QgsProcessingException) as err:
            _run("terrascope:ask_batch", params)
        assert words.lower() in str(err.value).lower() and "\n" not in str(err.value)


def test_region_masks_layer_with_true_areas(plugin, qgis_processing, worker):
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    question = "Where are the buildings?"
    window = read_window(layer.dataProvider(), None, 160, name=layer.name())
    seed = find_seg_seed(worker.endpoint, question, [window])
    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=160, max_new_tokens=400, max_seg=1,
                 temperature=5.0, seed=seed)
    result = _run("terrascope:ask_region", {"INPUT": layer, "QUESTION": question, "OUTPUT": "TEMPORARY_OUTPUT"})
    masks = result["OUTPUT"]
    assert masks.crs() == layer.crs() and masks.featureCount() >= 1
    da = QgsDistanceArea()
    da.setSourceCrs(masks.crs(), QgsProject.instance().transformContext())
    da.setEllipsoid(DEFAULT_ELLIPSOID)
    total = 0.0
    for f in masks.getFeatures():
        assert f["area_ha"] == pytest.approx(da.measureArea(f.geometry()) / 1e4, rel=1e-3)
        total += f["area_ha"]
    assert result["AREA_HA"] == pytest.approx(total, rel=1e-9)
    assert isinstance(result["ANSWER"], str) and isinstance(result["REASONING"], str)


def test_region_reports_the_option_its_masks_support(plugin, qgis_processing, worker):
    """A yes/no question: the worker measures the drawn mask and says which option it supports."""
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    question, options = "Are there any buildings?", ["A. Yes", "B. No"]
    window = read_window(layer.dataProvider(), None, 160, name=layer.name())
    seed = find_seg_seed(worker.endpoint, question, [window], options=options)
    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=160, max_new_tokens=400, max_seg=1,
                 temperature=5.0, seed=seed)
    result = _run("terrascope:ask_region", {"INPUT": layer, "QUESTION": question, "OPTIONS": "|".join(options),
                                            "OUTPUT": "TEMPORARY_OUTPUT"})
    assert result["OUTPUT"].featureCount() >= 1  # the seed makes the first mask non-empty
    assert result["MEASURED_CHOICE"] == "A"  # a non-empty mask: there are some
    if result["CHOICE"] != "A":  # the model's own letter (none: generation stopped at the mask) is flagged
        assert "A" in result["CHECKS"]


def test_no_worker_is_a_clear_processing_error(plugin, qgis_processing, rasters):
    use_settings(endpoint="tcp://127.0.0.1:9", auto_start=False, request_timeout_s=1.0)
    with pytest.raises(QgsProcessingException) as err:
        _run("terrascope:ask_region", {"INPUT": rasters[0], "QUESTION": "x", "OUTPUT": "TEMPORARY_OUTPUT"})
    assert "No TerraScope worker reachable" in str(err.value) and "\n" not in str(err.value)


def test_batch_with_pairs_and_sar_layers(plugin, qgis_processing, worker, tmp_path):
    use_settings(endpoint=worker.endpoint, auto_start=False, max_side=64, max_new_tokens=4)
    gt = (500000, 10, 0, 4100000, 0, -10)
    before = [str(write_geotiff(tmp_path / f"b{i}.tif", scene(32, 32, seed=i), gt, 32631)) for i in range(2)]
    after = [str(write_geotiff(tmp_path / f"a{i}.tif", scene(32, 32, seed=10 + i), gt, 32631)) for i in range(2)]
    sar = [str(write_geotiff(tmp_path / f"s{i}.tif", np.full((2, 32, 32), -12.5 - i, np.float32), gt, 32631))
           for i in range(2)]
    for extra in ({"PAIR_LAYERS": after}, {"SAR_LAYERS": sar}):
        result = _run("terrascope:ask_batch", {"INPUTS": before, "QUESTION": "What changed?",
                                               "OUTPUT": "TEMPORARY_OUTPUT", **extra})
        rows = list(result["OUTPUT"].getFeatures())
        assert len(rows) == 2 and all(r["answer"] and not r["error"] for r in rows), [r["error"] for r in rows]
