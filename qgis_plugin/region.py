"""The region to ask about, expressed in each layer's own CRS (computed on the UI thread: cheap)."""

from __future__ import annotations

from dataclasses import dataclass

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsGeometry,
    QgsMapLayer,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
    QgsWkbTypes,
)

WHOLE, CANVAS, RECTANGLE, POLYGON = "whole", "canvas", "rectangle", "polygon"
REGION_LABELS = {WHOLE: "Whole layer", CANVAS: "Current map extent", RECTANGLE: "Rectangle drawn on the map",
                 POLYGON: "Selected polygon(s)"}


class RegionError(ValueError):
    """The region cannot be used; the message says what to do."""


@dataclass
class Region:
    """A region in some CRS: a rectangle, optionally a polygon inside it."""

    kind: str = WHOLE
    rect: QgsRectangle | None = None
    crs: QgsCoordinateReferenceSystem | None = None
    geometry: QgsGeometry | None = None

    def for_layer(self, layer: QgsMapLayer, project: QgsProject | None = None
                  ) -> tuple[QgsRectangle | None, QgsGeometry | None]:
        """(rectangle, polygon or None) in the layer's CRS; (None, None) means the whole layer."""
        if self.kind == WHOLE:
            return None, None
        project = project or QgsProject.instance()
        if self.rect is None or self.rect.isEmpty():
            raise RegionError("Draw a rectangle on the map first." if self.kind == RECTANGLE
                              else "The region is empty.")
        try:
            rect, geom = _transform(self.rect, self.geometry, self.crs or layer.crs(), layer.crs(), project)
        except QgsCsException as exc:
            raise RegionError(f"The region cannot be projected to the CRS of '{layer.name()}': {exc}") from None
        if not rect.intersects(layer.extent()):
            raise RegionError(f"The region does not overlap layer '{layer.name()}'.")
        return rect, geom

    def in_crs(self, crs: QgsCoordinateReferenceSystem, project: QgsProject | None = None
               ) -> tuple[QgsRectangle, QgsGeometry | None]:
        """(rectangle, polygon or None) in `crs` (where a web layer is rendered)."""
        if self.rect is None or self.rect.isEmpty():
            raise RegionError("The region is empty.")
        try:
            return _transform(self.rect, self.geometry, self.crs or crs, crs, project or QgsProject.instance())
        except QgsCsException as exc:
            raise RegionError(f"The region cannot be projected to the map's CRS: {exc}") from None


def _transform(rect: QgsRectangle, geom: QgsGeometry | None, src: QgsCoordinateReferenceSystem,
               dst: QgsCoordinateReferenceSystem, project: QgsProject) -> tuple[QgsRectangle, QgsGeometry | None]:
    if not src.isValid() or not dst.isValid() or src == dst:
        return QgsRectangle(rect), (QgsGeometry(geom) if geom is not None else None)
    xform = QgsCoordinateTransform(src, dst, project)
    out_rect = xform.transformBoundingBox(rect)
    out_geom = None
    if geom is not None:
        out_geom = QgsGeometry(geom)
        out_geom.transform(xform)
        out_rect = out_geom.boundingBox()
    return out_rect, out_geom


def selected_polygon_region(layer: QgsVectorLayer | None) -> Region:
    """The union of the selected polygons of `layer` (in that layer's CRS)."""
    if layer is None or not isinstance(layer, QgsVectorLayer):
        raise RegionError("Pick a polygon layer for the region.")
    if QgsWkbTypes.geometryType(layer.wkbType()) != QgsWkbTypes.PolygonGeometry:
        raise RegionError(f"Layer '{layer.name()}' has no polygons.")
    geoms = [f.geometry() for f in layer.getSelectedFeatures() if f.hasGeometry()]
    if not geoms:
        raise RegionError(f"Select one or more polygons in '{layer.name()}' first.")
    union = QgsGeometry.unaryUnion(geoms)
    if union.isEmpty():
        raise RegionError("The selected polygons are empty.")
    return Region(POLYGON, union.boundingBox(), layer.crs(), union)
