"""Masks to polygons with true areas, and the atomic, never-overwriting GeoPackage of a question."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgislib import REPO, quadrangle_area_m2

from qgis_plugin.geometry import mask_polygons, measure, transform_for_shape
from qgis_plugin.gpkg import ANSWER_TABLE, mask_table, step_table, unique_path, write_results
from qgis_plugin.layers import add_results
from qgis_plugin.record import AskRecord, StepRecord, to_markdown

CTX = QgsCoordinateTransformContext()
WGS84_WKT = QgsCoordinateReferenceSystem("EPSG:4326").toWkt(QgsCoordinateReferenceSystem.WKT2_2019)
UTM_WKT = QgsCoordinateReferenceSystem("EPSG:32633").toWkt(QgsCoordinateReferenceSystem.WKT2_2019)


def test_area_in_epsg4326_matches_the_exact_ellipsoidal_quadrangle():
    # 0.001 deg pixels at 60 N: a 20 x 30 pixel block with a 4 x 5 hole.
    gt = (10.0, 0.001, 0.0, 60.05, 0.0, -0.001)
    mask = np.zeros((50, 50), bool)
    mask[10:30, 5:35] = True
    mask[15:19, 10:15] = False
    polys = measure(mask_polygons(mask, gt, WGS84_WKT), QgsCoordinateReferenceSystem("EPSG:4326"), CTX, "EPSG:7030")
    assert len(polys) == 1
    top, bottom = 60.05 - 10 * 0.001, 60.05 - 30 * 0.001
    outer = quadrangle_area_m2(bottom, top, 30 * 0.001)
    hole = quadrangle_area_m2(60.05 - 19 * 0.001, 60.05 - 15 * 0.001, 5 * 0.001)
    assert polys[0].area_ha * 1e4 == pytest.approx(outer - hole, rel=1e-4)
    assert polys[0].perimeter_m > 0


def test_project_without_ellipsoid_still_gives_true_areas_not_square_degrees():
    gt = (10.0, 0.001, 0.0, 60.05, 0.0, -0.001)
    mask = np.ones((4, 4), bool)
    (poly,) = measure(mask_polygons(mask, gt, WGS84_WKT), QgsCoordinateReferenceSystem("EPSG:4326"), CTX, "NONE")
    assert poly.area_ha * 1e4 == pytest.approx(quadrangle_area_m2(60.046, 60.05, 0.004), rel=1e-4)


def test_no_crs_gives_no_area_and_separate_objects_stay_separate():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[6:9, 6:9] = True
    polys = measure(mask_polygons(mask, (0, 1, 0, 0, 0, -1), ""), QgsCoordinateReferenceSystem(), CTX, "EPSG:7030")
    assert len(polys) == 2 and all(p.area_ha is None for p in polys)
    assert sorted(p.geometry.area() for p in polys) == [4.0, 9.0]


def test_transform_for_a_mask_on_another_grid():
    assert transform_for_shape((100, 10, 0, 500, 0, -10), (20, 30), (10, 15)) == (100, 20, 0, 500, 0, -20)


def _record(mask: np.ndarray, question="How much water is there?") -> AskRecord:
    r = AskRecord(question=question, answer="About a third of the area is water.", reasoning="The water [SEG] …",
                  layer_names=["scene"], model="tiny", device="cpu")
    r.steps.append(StepRecord(step=0, label="the water", score=0.8, mask=mask, crs_wkt=UTM_WKT,
                              transform=(500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0), worker_area_ha=0.36))
    return r


def test_geopackage_has_steps_masks_answer_and_metadata(tmp_path, qgis_new_project):
    mask = np.zeros((20, 30), bool)
    mask[2:8, 3:9] = True
    record = _record(mask)
    path = write_results(record, tmp_path, CTX, "EPSG:7030")
    assert path.parent == tmp_path and path.suffix == ".gpkg" and path.name.startswith("terrascope_")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .part left behind
    layer = QgsVectorLayer(f"{path}|layername={step_table(0)}", "s", "ogr")
    assert layer.isValid() and layer.crs().authid() == "EPSG:32633"
    (f,) = list(layer.getFeatures())
    assert f["label"] == "the water" and f["step"] == 1 and f["score"] == pytest.approx(0.8)
    assert f["area_ha"] == pytest.approx(0.36, rel=2e-3)  # 36 pixels of 100 m2, UTM scale near 1
    assert f["perimeter_m"] == pytest.approx(240, rel=2e-3)
    assert "About a third" in layer.metadata().abstract()
    assert layer.renderer().symbol().color().alpha() < 255  # the saved style is semi-transparent
    raster = gdal.Open(f"GPKG:{path}:{mask_table(0)}")
    np.testing.assert_array_equal(raster.ReadAsArray().astype(bool), mask)
    assert raster.GetGeoTransform() == pytest.approx(record.steps[0].transform)
    answers = QgsVectorLayer(f"{path}|layername={ANSWER_TABLE}", "a", "ogr")
    (row,) = list(answers.getFeatures())
    assert row["question"] == record.question and row["answer"] == record.answer
    group = add_results(record, path)
    assert group.name() == record.question and len(group.findLayers()) == 2
    assert isinstance(QgsProject.instance().mapLayer(record.layer_ids[1]), QgsRasterLayer)


def test_never_overwrites_and_names_stay_unique(tmp_path):
    record = _record(np.ones((5, 5), bool))
    first = write_results(record, tmp_path, CTX, "EPSG:7030")
    before = first.read_bytes()
    second = write_results(record, tmp_path, CTX, "EPSG:7030")
    assert second != first and second.name.endswith("_2.gpkg") and first.read_bytes() == before
    assert unique_path(tmp_path, first.stem) == tmp_path / f"{first.stem}_3.gpkg"
    (tmp_path / "locked").mkdir()
    os.chmod(tmp_path / "locked", 0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(OSError):
                write_results(record, tmp_path / "locked", CTX, "EPSG:7030")
    finally:
        os.chmod(tmp_path / "locked", 0o700)


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from qgis.core import QgsApplication, QgsCoordinateTransformContext
    sys.path.insert(0, sys.argv[2])
    app = QgsApplication([], False)
    app.initQgis()
    from qgis_plugin.gpkg import write_results
    from qgis_plugin.record import AskRecord, StepRecord
    rng = np.random.default_rng(0)
    r = AskRecord(question="How much water is there?", answer="x")
    for i in range(3):
        r.steps.append(StepRecord(step=i, label="noise", score=0.5, mask=rng.random((500, 500)) > 0.5,
                                  crs_wkt=sys.argv[3], transform=(500000.0, 1.0, 0.0, 4649000.0, 0.0, -1.0)))
    print("writing", flush=True)
    write_results(r, sys.argv[1], QgsCoordinateTransformContext(), "EPSG:7030")
    print("finished", flush=True)
""")


def test_a_writer_killed_mid_write_leaves_earlier_results_readable(tmp_path):
    earlier = write_results(_record(np.ones((5, 5), bool)), tmp_path, CTX, "EPSG:7030")
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(REPO), UTM_WKT], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".*.part.gpkg")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the writer finished before it could be killed; make its masks bigger"
    time.sleep(0.2)
    assert proc.poll() is None, "the writer finished before it could be killed; make its masks bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    finals = [p for p in tmp_path.glob("*.gpkg") if not p.name.startswith(".")]
    assert finals == [earlier], "a killed writer must not publish a partial GeoPackage"
    layer = QgsVectorLayer(f"{earlier}|layername={step_table(0)}", "s", "ogr")
    assert layer.isValid() and layer.featureCount() == 1


def test_markdown_export_reads_well(tmp_path):
    record = _record(np.ones((5, 5), bool))
    record.options = ["A. less than half", "B. more than half"]
    record.choice = "A"
    write_results(record, tmp_path, CTX, "EPSG:7030")
    md = to_markdown(record)
    assert md.splitlines()[0] == "# How much water is there?"
    for part in ("## Answer", "About a third", "**Choice:** A", "- A. less than half", "## Reasoning",
                 "| 1 | the water | 0.25 ha |", "Results: `"):
        assert part in md, part


def test_twenty_steps_load_without_blocking_the_ui(tmp_path, qgis_new_project):
    from qgis.core import QgsApplication
    from qgislib import UiProbe, process_events_until

    from qgis_plugin.layers import LoadResultsTask

    rng = np.random.default_rng(0)
    record = _record(np.ones((5, 5), bool))
    record.steps = []
    for i in range(20):
        mask = np.zeros((256, 256), bool)
        mask[rng.integers(0, 200):, rng.integers(0, 200):] = True
        record.steps.append(StepRecord(step=i, label=f"object {i}", score=0.5, mask=mask, crs_wkt=UTM_WKT,
                                       transform=(500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0)))
    path = write_results(record, tmp_path, CTX, "EPSG:7030")
    groups = []
    with UiProbe() as probe:
        task = LoadResultsTask(record, path)
        task.loaded.connect(lambda built: groups.append(add_results(record, path, built=built)))
        QgsApplication.taskManager().addTask(task)
        assert process_events_until(lambda: bool(groups), 60)
    assert len(groups[0].findLayers()) == 40 and len(record.layer_ids) == 40
    assert all(QgsProject.instance().mapLayer(i).thread() == QgsApplication.instance().thread()
               for i in record.layer_ids)
    assert probe.max_gap_ms < 100, f"UI blocked {probe.max_gap_ms:.0f} ms"


def test_an_answer_without_steps_still_gets_its_geopackage(tmp_path):
    record = AskRecord(question="Is it sunny?", answer="Yes.")
    path = write_results(record, tmp_path, CTX, "EPSG:7030")
    answers = QgsVectorLayer(f"{path}|layername={ANSWER_TABLE}", "a", "ogr")
    assert answers.isValid() and next(answers.getFeatures())["answer"] == "Yes."
