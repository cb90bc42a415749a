"""Mask -> polygons -> true areas (ha) and perimeters (m) with QgsDistanceArea.

Why QgsDistanceArea on an ellipsoid: that is what QGIS's own measure tool and field calculator ($area)
report, so a user who checks our polygons in QGIS gets the same hectares, in any CRS, including
geographic ones where planar areas would be square degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsDistanceArea,
    QgsGeometry,
    QgsUnitTypes,
)

DEFAULT_ELLIPSOID = "EPSG:7030"  # WGS84, used when the project has none ("NONE")

Transform = tuple[float, float, float, float, float, float]


@dataclass
class Polygon:
    """One connected region of a mask, measured."""

    geometry: QgsGeometry
    area_ha: float | None  # None when the layer has no CRS (pixel units: no true area)
    perimeter_m: float | None


def effective_ellipsoid(project_ellipsoid: str) -> str:
    """The project's ellipsoid, or WGS84 when the project measures planimetrically."""
    return project_ellipsoid if project_ellipsoid and project_ellipsoid.upper() != "NONE" else DEFAULT_ELLIPSOID


def mask_polygons(mask: np.ndarray, transform: Transform, crs_wkt: str) -> list[QgsGeometry]:
    """Polygonize a boolean mask on its grid (pixel edges, 4-connected, holes kept)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rows, cols = mask.shape
    if rows == 0 or cols == 0 or not mask.any():
        return []
    ds = gdal.GetDriverByName("MEM").Create("", cols, rows, 1, gdal.GDT_Byte)
    ds.SetGeoTransform(list(transform))
    band = ds.GetRasterBand(1)
    band.WriteArray(mask.astype(np.uint8))
    srs = None
    if crs_wkt:
        srs = osr.SpatialReference()
        srs.ImportFromWkt(crs_wkt)
    mem = ogr.GetDriverByName("Memory").CreateDataSource("")
    layer = mem.CreateLayer("mask", srs, ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("v", ogr.OFTInteger))
    if gdal.Polygonize(band, band, layer, 0, [], callback=None) != 0:
        raise RuntimeError("GDAL could not polygonize the mask")
    geoms = []
    for feature in layer:
        geom = QgsGeometry()
        geom.fromWkb(bytes(feature.GetGeometryRef().ExportToWkb()))
        geoms.append(geom)
    return geoms


def make_distance_area(crs: QgsCoordinateReferenceSystem, context: QgsCoordinateTransformContext,
                       ellipsoid: str) -> QgsDistanceArea:
    da = QgsDistanceArea()
    da.setSourceCrs(crs, context)
    da.setEllipsoid(effective_ellipsoid(ellipsoid))
    return da


def measure(geoms: list[QgsGeometry], crs: QgsCoordinateReferenceSystem,
            context: QgsCoordinateTransformContext, ellipsoid: str) -> list[Polygon]:
    """Area (ha) and perimeter (m) of each polygon on the ellipsoid; None for a layer without CRS."""
    if not crs.isValid():
        return [Polygon(g, None, None) for g in geoms]
    da = make_distance_area(crs, context, ellipsoid)
    to_m2 = QgsUnitTypes.fromUnitToUnitFactor(da.areaUnits(), QgsUnitTypes.AreaSquareMeters)
    to_m = QgsUnitTypes.fromUnitToUnitFactor(da.lengthUnits(), QgsUnitTypes.DistanceMeters)
    return [Polygon(g, da.measureArea(g) * to_m2 / 1e4, da.measurePerimeter(g) * to_m) for g in geoms]


def total_area_ha(polygons: list[Polygon]) -> float | None:
    values = [p.area_ha for p in polygons]
    return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


def transform_for_shape(image_transform: Transform, image_shape: tuple[int, int],
                        mask_shape: tuple[int, int]) -> Transform:
    """The geotransform of a mask covering the same extent as its image on a different pixel grid."""
    x0, px, rx, y0, ry, py = image_transform
    sy = image_shape[0] / mask_shape[0]
    sx = image_shape[1] / mask_shape[1]
    return (x0, px * sx, rx * sy, y0, ry * sx, py * sy)
