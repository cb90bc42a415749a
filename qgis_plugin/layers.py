"""Showing a question's GeoPackage in the project: one layer group, a polygon and a mask layer per step.

Opening and styling the layers costs ~20 ms a step, so they are built off the UI thread (`build_layers`
in a task, then moved to the main thread) and the UI thread only inserts them into the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    QgsApplication,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsTask,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import pyqtSignal

from .gpkg import layer_metadata, mask_table, step_table
from .record import AskRecord
from .styles import style_mask_layer, style_step_layer

GROUP_PROPERTY = "terrascope/question"


def group_name(question: str, max_len: int = 70) -> str:
    text = " ".join(question.split()) or "TerraScope question"
    return text if len(text) <= max_len else text[: max_len - 1].rstrip() + "…"


def _step_title(step: int, label: str) -> str:
    label = " ".join(label.split())[:60] or "mask"
    return f"Step {step + 1}: {label}"


@dataclass
class StepLayers:
    vector: QgsVectorLayer
    mask: QgsRasterLayer | None


def build_layers(record: AskRecord, gpkg_path: Path | str) -> list[StepLayers]:
    """Open and style every step's layers; safe in a task thread (layers end up owned by the main thread)."""
    main = QgsApplication.instance().thread()
    out = []
    for step in record.steps:
        title = _step_title(step.step, step.label)
        vector = QgsVectorLayer(f"{gpkg_path}|layername={step_table(step.step)}", title, "ogr")
        if not vector.isValid():
            raise OSError(f"cannot open layer {step_table(step.step)} of {gpkg_path}")
        style_step_layer(vector, step.step)
        vector.setMetadata(layer_metadata(record, step))
        mask: QgsRasterLayer | None = QgsRasterLayer(f"GPKG:{gpkg_path}:{mask_table(step.step)}",
                                                     f"{title} (mask)", "gdal")
        if mask.isValid():
            style_mask_layer(mask, step.step)
            mask.setMetadata(layer_metadata(record, step))
        else:
            mask = None
        for layer in (vector, mask):
            if layer is not None:
                layer.moveToThread(main)
        out.append(StepLayers(vector, mask))
    return out


def add_results(record: AskRecord, gpkg_path: Path | str, project: QgsProject | None = None,
                built: list[StepLayers] | None = None) -> QgsLayerTreeGroup:
    """Put the record's layers (built now if not given) into a new group at the top of the layer tree."""
    project = project or QgsProject.instance()
    built = built if built is not None else build_layers(record, gpkg_path)
    group = project.layerTreeRoot().insertGroup(0, group_name(record.question))
    group.setCustomProperty(GROUP_PROPERTY, record.question)
    record.layer_ids = []
    for pair in built:
        layers: list[QgsMapLayer] = [pair.vector] + ([pair.mask] if pair.mask is not None else [])
        for layer in layers:
            project.addMapLayer(layer, False)
            node = group.addLayer(layer)
            if layer is pair.mask:
                node.setItemVisibilityChecked(False)  # the polygons already show it; the raster is for analysis
            record.layer_ids.append(layer.id())
    record.group_name = group.name()
    return group


def find_group(record: AskRecord, project: QgsProject | None = None) -> QgsLayerTreeGroup | None:
    """The group that still holds the record's layers, if the user has not removed them."""
    project = project or QgsProject.instance()
    for layer_id in record.layer_ids:
        node = project.layerTreeRoot().findLayer(layer_id)
        if node is not None and isinstance(node.parent(), QgsLayerTreeGroup):
            return node.parent()
    return None


class LoadResultsTask(QgsTask):
    """Re-opens a past question's GeoPackage in the background (history click after its group was removed)."""

    loaded = pyqtSignal(object)  # list[StepLayers]

    def __init__(self, record: AskRecord, gpkg_path: Path | str):
        super().__init__(f"TerraScope: reopen {group_name(record.question, 40)}", QgsTask.CanCancel)
        self.record = record
        self.path = str(gpkg_path)
        self.built: list[StepLayers] = []
        self.error = ""

    def run(self) -> bool:
        try:
            self.built = build_layers(self.record, self.path)
            return True
        except OSError as exc:
            self.error = str(exc)
            return False

    def finished(self, ok: bool) -> None:
        if ok:
            self.loaded.emit(self.built)
