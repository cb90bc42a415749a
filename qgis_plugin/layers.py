"""Showing a question's GeoPackage in the project: one layer group, a polygon and a mask layer per step."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsLayerTreeGroup, QgsProject, QgsRasterLayer, QgsVectorLayer

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


def add_results(record: AskRecord, gpkg_path: Path | str, project: QgsProject | None = None) -> QgsLayerTreeGroup:
    """Load the record's layers from its GeoPackage into a new group at the top of the layer tree."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    group = root.insertGroup(0, group_name(record.question))
    group.setCustomProperty(GROUP_PROPERTY, record.question)
    record.layer_ids = []
    for step in record.steps:
        title = _step_title(step.step, step.label)
        vector = QgsVectorLayer(f"{gpkg_path}|layername={step_table(step.step)}", title, "ogr")
        if not vector.isValid():
            raise OSError(f"cannot open layer {step_table(step.step)} of {gpkg_path}")
        style_step_layer(vector, step.step)
        vector.setMetadata(layer_metadata(record, step))
        mask = QgsRasterLayer(f"GPKG:{gpkg_path}:{mask_table(step.step)}", f"{title} (mask)", "gdal")
        layers = [vector]
        if mask.isValid():
            style_mask_layer(mask, step.step)
            mask.setMetadata(layer_metadata(record, step))
            layers.append(mask)
        for layer in layers:
            project.addMapLayer(layer, False)
            node = group.addLayer(layer)
            if layer is mask:
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
