"""The dock against a real worker process: GeoPackage layers in the input's CRS with true areas.

The worker runs the official tiny fixture checkpoint (random weights, so the text is gibberish); sampling
with a searched seed makes it emit [SEG] steps, which then go through the real SAM-2 path, the real
measurement, the wire and the plugin's own QgsDistanceArea measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import use_settings
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsDistanceArea,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgislib import (
    ATLANTA_UTM,
    SAMPLE_4326,
    UiProbe,
    find_seg_seed,
    process_events_until,
    scene,
    write_geotiff,
)

from qgis_plugin.geometry import DEFAULT_ELLIPSOID
from qgis_plugin.gpkg import step_table
from qgis_plugin.rasters import read_window
from qgis_plugin.request import series_roles

QUESTION = "Which parts of this image are water?"
MAX_SIDE = 192


def _windows(layers: list[QgsRasterLayer], roles: list[str]):
    return [read_window(lay.dataProvider(), None, MAX_SIDE, role=r, name=lay.name()) for lay, r in zip(layers, roles)]


def _ask_in_dock(plugin, worker, results_dir, layers, roles, question=QUESTION, timeout_s=120):
    seed = find_seg_seed(worker.endpoint, question, _windows(layers, roles))
    settings = use_settings(endpoint=worker.endpoint, auto_start=False, max_side=MAX_SIDE, max_new_tokens=400,
                            max_seg=1, temperature=5.0, seed=seed, output_dir=str(results_dir))
    plugin.manager.apply_settings(settings)
    dock = plugin.show_dock()
    if roles[0] == "t0":
        dock.set_series(layers)
    else:
        dock.set_layer(layers[0])
    dock.question_edit.setPlainText(question)
    finished = []
    dock.askFinished.connect(finished.append)
    with UiProbe() as probe:
        task = dock.ask()
        assert task is not None, dock.banner_label.text()
        assert process_events_until(lambda: bool(finished), timeout_s), "no answer in time"
    return dock, finished[0], probe


def _check_results(record, input_layer: QgsRasterLayer, results_dir: Path) -> None:
    assert record.error == "", record.error
    assert record.steps, "the searched seed should give at least one [SEG] step"
    gpkg = Path(record.gpkg_path)
    assert gpkg.parent == results_dir and gpkg.suffix == ".gpkg" and gpkg.exists()
    assert not list(results_dir.glob(".*part*"))
    da = QgsDistanceArea()
    for step in record.steps:
        layer = QgsVectorLayer(f"{gpkg}|layername={step_table(step.step)}", "check", "ogr")
        assert layer.isValid()
        assert layer.crs() == input_layer.crs(), (layer.crs().authid(), input_layer.crs().authid())
        da.setSourceCrs(layer.crs(), QgsProject.instance().transformContext())
        da.setEllipsoid(DEFAULT_ELLIPSOID)
        total = 0.0
        for f in layer.getFeatures():
            expected = da.convertAreaMeasurement(da.measureArea(f.geometry()), 0) / 1e4  # 0 = square metres
            assert f["area_ha"] == pytest.approx(expected, rel=1e-3, abs=1e-9)
            assert f["step"] == step.step + 1 and f["label"] == step.label
            total += f["area_ha"]
        if step.worker_area_ha:
            assert total == pytest.approx(step.worker_area_ha, rel=1e-3), "plugin and worker disagree on ha"
        else:
            assert total == pytest.approx(0.0, abs=1e-9)
        md = layer.metadata()
        assert record.question in md.abstract() and record.answer[:40] in md.abstract()


def _group_of(record):
    root = QgsProject.instance().layerTreeRoot()
    return root.findGroup(record.group_name)


def test_dock_end_to_end_utm_real_raster(plugin, worker, results_dir):
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    dock, record, probe = _ask_in_dock(plugin, worker, results_dir, [layer], ["optical"])
    _check_results(record, layer, results_dir)
    group = _group_of(record)
    assert group is not None and group.name().startswith("Which parts")
    kinds = sorted(type(n.layer()).__name__ for n in group.findLayers())
    assert kinds.count("QgsVectorLayer") == len(record.steps) and kinds.count("QgsRasterLayer") == len(record.steps)
    assert dock.output.answer_frame.isVisibleTo(dock)
    assert "ha" in dock.output.browser.toPlainText() or "m²" in dock.output.browser.toPlainText()
    assert probe.ticks > 50
    assert probe.max_gap_ms < 100, f"UI thread blocked for {probe.max_gap_ms:.0f} ms"


def test_dock_end_to_end_epsg4326_bundled_sample(plugin, worker, results_dir):
    layer = QgsRasterLayer(str(SAMPLE_4326), "spain_s2")
    assert layer.crs().authid() == "EPSG:4326"
    QgsProject.instance().addMapLayer(layer)
    _dock, record, _ = _ask_in_dock(plugin, worker, results_dir, [layer], ["optical"])
    _check_results(record, layer, results_dir)


def test_dock_end_to_end_time_series_pair(plugin, worker, results_dir, tmp_path):
    before = scene(96, 128, seed=1)
    after = before.copy()
    after[:, 50:90, 10:70] = 30  # a flooded field: dark after
    gt = (699960.0, 10.0, 0.0, 4100040.0, 0.0, -10.0)
    paths = [write_geotiff(tmp_path / f"{n}.tif", a, gt, 32630, band_names=["red", "green", "blue"])
             for n, a in (("before", before), ("after", after))]
    layers = [QgsRasterLayer(str(p), p.stem) for p in paths]
    QgsProject.instance().addMapLayers(layers)
    _dock, record, _ = _ask_in_dock(plugin, worker, results_dir, layers, series_roles(2),
                                    question="What changed between the two dates?")
    _check_results(record, layers[0], results_dir)
    assert record.layer_names == ["before", "after"]


def test_history_markdown_and_reopen(plugin, worker, results_dir, tmp_path):
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    dock, record, _ = _ask_in_dock(plugin, worker, results_dir, [layer], ["optical"])
    assert dock.history_list.count() == 1
    md = dock.copy_markdown()
    assert md.startswith(f"# {QUESTION}") and "## Answer" in md and "| step |" in md
    out = dock.export_markdown(str(tmp_path / "answer.md"))
    assert out.read_text(encoding="utf-8") == md
    # Remove the group, then click the history: the layers come back from the GeoPackage.
    QgsProject.instance().removeMapLayers(record.layer_ids)
    QgsProject.instance().layerTreeRoot().removeChildNode(_group_of(record))
    dock._history_clicked(dock.history_list.item(0))
    assert process_events_until(lambda: _group_of(record) is not None, 10)
    group = _group_of(record)
    assert group is not None and len(group.findLayers()) == 2 * len(record.steps)
    assert np.all([QgsProject.instance().mapLayer(i) is not None for i in record.layer_ids])


def test_layers_survive_saving_and_reopening_the_project(plugin, worker, results_dir, tmp_path):
    layer = QgsRasterLayer(str(ATLANTA_UTM), "atlanta")
    QgsProject.instance().addMapLayer(layer)
    _dock, record, _ = _ask_in_dock(plugin, worker, results_dir, [layer], ["optical"])
    project_file = tmp_path / "project.qgz"
    assert QgsProject.instance().write(str(project_file))
    QgsProject.instance().clear()
    assert QgsProject.instance().read(str(project_file))
    reopened = [QgsProject.instance().mapLayer(i) for i in record.layer_ids]
    assert all(lay is not None and lay.isValid() for lay in reopened)
    vector = next(lay for lay in reopened if isinstance(lay, QgsVectorLayer))
    assert vector.crs() == QgsCoordinateReferenceSystem("EPSG:32616")
    assert vector.featureCount() == len(record.steps[0].polygons)


def test_nodata_pixels_never_become_mask_area(plugin, worker, results_dir, tmp_path):
    rng = np.random.default_rng(5)
    data = rng.integers(200, 4000, size=(3, 96, 96)).astype(np.uint16)
    data[:, :, :40] = 0  # a scene edge: no data on the west
    gt = (300000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0)
    path = write_geotiff(tmp_path / "edge.tif", data, gt, 32632, nodata=0)
    layer = QgsRasterLayer(str(path), "edge")
    QgsProject.instance().addMapLayer(layer)
    _dock, record, _ = _ask_in_dock(plugin, worker, results_dir, [layer], ["optical"])
    _check_results(record, layer, results_dir)
    for step in record.steps:
        assert not step.mask[:, :40].any(), "mask pixels over nodata"
        assert step.measurements["area_px"] == int(step.mask.sum())
