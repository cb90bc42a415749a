"""Reading a raster window through the layer's QGIS data provider, off the UI thread.

Why through the provider and not a file path: it works for every source QGIS can open (GeoTIFF, VRT,
GeoPackage rasters, rotated grids that GDAL warps north-up), honours the layer's nodata, and never sends
a path to a worker that may run on another machine.

Decimation keeps the true grid: the window is snapped to source pixel edges and shrunk by an integer
factor, so every sent pixel is exactly k x k source pixels and masks come back georeferenced exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsRasterDataProvider,
    QgsRectangle,
)

_DTYPES = {
    Qgis.Byte: np.uint8,
    Qgis.UInt16: np.uint16,
    Qgis.Int16: np.int16,
    Qgis.UInt32: np.uint32,
    Qgis.Int32: np.int32,
    Qgis.Float32: np.float32,
    Qgis.Float64: np.float64,
    Qgis.CFloat32: np.complex64,
    Qgis.CFloat64: np.complex128,
}
_COMPLEX_INT = {Qgis.CInt16: np.int16, Qgis.CInt32: np.int32}


class RasterReadError(ValueError):
    """A raster cannot be read for the model; the message names the layer and the reason."""


@dataclass
class RasterWindow:
    """Pixels of one layer over the region, with the georeferencing of the grid actually sent."""

    data: np.ndarray  # (bands, rows, cols), the provider's own data type (CInt* become complex64)
    transform: tuple[float, float, float, float, float, float]  # GDAL geotransform of `data`'s grid
    crs_wkt: str  # "" when the layer has no CRS (pixel units)
    nodata: list[float | None]  # per band
    band_names: list[str]
    role: str = "optical"
    name: str = ""  # layer name, for messages and metadata
    decimation: int = 1  # source pixels per sent pixel along each axis
    source_size: tuple[int, int] = (0, 0)  # (cols, rows) of the window at full resolution
    region_mask: np.ndarray | None = None  # bool (rows, cols): True inside a polygon region
    extra: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    def extent(self) -> QgsRectangle:
        x0, px, _, y0, _, py = self.transform
        rows, cols = self.shape
        return QgsRectangle(x0, y0 + rows * py, x0 + cols * px, y0)


@dataclass(frozen=True)
class GridPlan:
    """Where to read: the snapped extent and the output size."""

    extent: QgsRectangle
    cols: int
    rows: int
    decimation: int
    source_cols: int
    source_rows: int


def plan_window(layer_extent: QgsRectangle, layer_cols: int, layer_rows: int, region: QgsRectangle | None,
                max_side: int) -> GridPlan:
    """Snap `region` (layer CRS) outward to source pixels, clip to the layer, and pick the decimation.

    Pure arithmetic so it is tested without any raster.
    """
    if layer_cols <= 0 or layer_rows <= 0:
        raise RasterReadError("the layer has no pixels (0 x 0)")
    px = layer_extent.width() / layer_cols
    py = layer_extent.height() / layer_rows
    if region is None:
        c0, r0, c1, r1 = 0, 0, layer_cols, layer_rows
    else:
        if region.isEmpty() or not region.intersects(layer_extent):
            raise RasterReadError("the region does not overlap the layer")
        eps = 1e-9
        c0 = max(0, math.floor((region.xMinimum() - layer_extent.xMinimum()) / px + eps))
        c1 = min(layer_cols, math.ceil((region.xMaximum() - layer_extent.xMinimum()) / px - eps))
        r0 = max(0, math.floor((layer_extent.yMaximum() - region.yMaximum()) / py + eps))
        r1 = min(layer_rows, math.ceil((layer_extent.yMaximum() - region.yMinimum()) / py - eps))
        if c1 <= c0 or r1 <= r0:
            raise RasterReadError("the region is smaller than one pixel of the layer")
    cols, rows = c1 - c0, r1 - r0
    k = max(1, math.ceil(max(cols, rows) / max_side))
    out_cols, out_rows = max(1, cols // k), max(1, rows // k)
    # Shrink to whole k x k blocks (drops < k source pixels at the right/bottom edge) unless a side is
    # shorter than k, where that side keeps its full span in one output pixel.
    used_cols = out_cols * k if cols >= k else cols
    used_rows = out_rows * k if rows >= k else rows
    x0 = layer_extent.xMinimum() + c0 * px
    y1 = layer_extent.yMaximum() - r0 * py
    extent = QgsRectangle(x0, y1 - used_rows * py, x0 + used_cols * px, y1)
    return GridPlan(extent, out_cols, out_rows, k, cols, rows)


def read_block(provider: QgsRasterDataProvider, band: int, extent: QgsRectangle, cols: int,
               rows: int) -> np.ndarray:
    """One band as a numpy array; raises RasterReadError instead of returning garbage."""
    dtype_code = provider.dataType(band)
    block = provider.block(band, extent, cols, rows)
    if block is None or not block.isValid() or block.width() != cols or block.height() != rows:
        raise RasterReadError(f"band {band} could not be read")
    raw = bytes(block.data())
    if dtype_code in _COMPLEX_INT:
        pairs = np.frombuffer(raw, dtype=_COMPLEX_INT[dtype_code]).reshape(rows, cols, 2).astype(np.float32)
        return (pairs[..., 0] + 1j * pairs[..., 1]).astype(np.complex64)
    dtype = _DTYPES.get(dtype_code)
    if dtype is None:
        raise RasterReadError(f"band {band} has data type {int(dtype_code)} that cannot be sent to the model")
    arr = np.frombuffer(raw, dtype=dtype)
    if arr.size != rows * cols:
        raise RasterReadError(f"band {band} returned {arr.size} values for {rows} x {cols} pixels")
    return arr.reshape(rows, cols).copy()


def crs_wkt(crs: QgsCoordinateReferenceSystem) -> str:
    """WKT2 of a valid CRS, '' for none (the worker then refuses areas with a clear message)."""
    return crs.toWkt(QgsCoordinateReferenceSystem.WKT2_2019) if crs.isValid() else ""


def read_window(provider: QgsRasterDataProvider, region: QgsRectangle | None, max_side: int,
                role: str = "optical", name: str = "", band_names: list[str] | None = None) -> RasterWindow:
    """Read all bands of `provider` over `region` (in the provider's CRS); call in a background thread
    with a provider clone, never with the layer's own provider."""
    # Not provider.isValid(): a fresh GDAL provider clone reports False until its dataset is first used.
    if provider is None:
        raise RasterReadError(f"layer '{name}' is not a readable raster")
    if not provider.capabilities() & QgsRasterDataProvider.Size:
        raise RasterReadError(f"layer '{name}' has no pixel grid (a web map layer is rendered instead)")
    plan = plan_window(provider.extent(), provider.xSize(), provider.ySize(), region, max_side)
    count = provider.bandCount()
    if count < 1:
        raise RasterReadError(f"layer '{name}' has no bands")
    bands = [read_block(provider, b, plan.extent, plan.cols, plan.rows) for b in range(1, count + 1)]
    dtypes = {b.dtype for b in bands}
    data = np.stack(bands) if len(dtypes) == 1 else np.stack([b.astype(np.float64) for b in bands])
    nodata: list[float | None] = []
    for b in range(1, count + 1):
        has = provider.sourceHasNoDataValue(b) and provider.useSourceNoDataValue(b)
        nodata.append(float(provider.sourceNoDataValue(b)) if has else None)
    names = band_names or [provider.generateBandName(b) for b in range(1, count + 1)]
    ext = plan.extent
    transform = (ext.xMinimum(), ext.width() / plan.cols, 0.0, ext.yMaximum(), 0.0, -ext.height() / plan.rows)
    return RasterWindow(data=data, transform=transform, crs_wkt=crs_wkt(provider.crs()), nodata=nodata,
                        band_names=names, role=role, name=name, decimation=plan.decimation,
                        source_size=(plan.source_cols, plan.source_rows))


def image_to_window(rgba: np.ndarray, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, name: str,
                    role: str = "optical") -> RasterWindow:
    """A rendered (web map) image as a window: RGB bands, transparent pixels as nodata 0 everywhere."""
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise RasterReadError(f"rendered image of '{name}' is not RGBA")
    rows, cols = rgba.shape[:2]
    rgb = np.ascontiguousarray(np.moveaxis(rgba[..., :3], 2, 0))
    transform = (extent.xMinimum(), extent.width() / cols, 0.0, extent.yMaximum(), 0.0, -extent.height() / rows)
    return RasterWindow(data=rgb, transform=transform, crs_wkt=crs_wkt(crs), nodata=[None, None, None],
                        band_names=["Red", "Green", "Blue"], role=role, name=name, decimation=1,
                        source_size=(cols, rows), region_mask=rgba[..., 3] > 0)
