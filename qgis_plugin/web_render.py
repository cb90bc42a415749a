"""Web map layers (XYZ, WMS, WMTS) have no pixel grid of their own: render them at the canvas resolution.

QgsMapRendererParallelJob renders in QGIS's own worker threads and reports back with a signal, so the
UI thread only starts the job and converts the finished image (a few milliseconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRasterDataProvider,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QObject, QSize, pyqtSignal
from qgis.PyQt.QtGui import QColor, QImage

from .rasters import RasterReadError, RasterWindow, image_to_window


def is_web_layer(layer: QgsRasterLayer) -> bool:
    """True for layers without a native pixel grid (rendered tiles or map images)."""
    return not layer.dataProvider().capabilities() & QgsRasterDataProvider.Size


@dataclass
class RenderRequest:
    index: int  # position among the ask's sources
    layer: QgsRasterLayer
    extent: QgsRectangle  # in `crs`
    crs: QgsCoordinateReferenceSystem
    units_per_pixel: float  # the canvas resolution
    max_side: int
    role: str


def output_size(extent: QgsRectangle, units_per_pixel: float, max_side: int) -> QSize:
    """Pixels at the canvas resolution, shrunk to `max_side` on the longest side."""
    w = max(1, math.ceil(extent.width() / units_per_pixel))
    h = max(1, math.ceil(extent.height() / units_per_pixel))
    scale = min(1.0, max_side / max(w, h))
    return QSize(max(1, round(w * scale)), max(1, round(h * scale)))


def image_to_rgba(image: QImage) -> np.ndarray:
    """(rows, cols, 4) uint8 RGBA copy of a QImage."""
    img = image.convertToFormat(QImage.Format_RGBA8888)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes())
    arr = np.frombuffer(ptr, np.uint8).reshape(img.height(), img.bytesPerLine())
    return arr[:, : 4 * img.width()].reshape(img.height(), img.width(), 4).copy()


class WebRenderer(QObject):
    """Renders each request; emits `finished({index: RasterWindow})` or `failed(message)`."""

    finished = pyqtSignal(object)
    failed = pyqtSignal(str)

    def __init__(self, requests: list[RenderRequest], parent: QObject | None = None):
        super().__init__(parent)
        self.requests = requests
        self.windows: dict[int, RasterWindow] = {}
        self.jobs: list[QgsMapRendererParallelJob] = []
        self._cancelled = False

    def start(self) -> None:
        for req in self.requests:
            settings = QgsMapSettings()
            settings.setLayers([req.layer])
            settings.setDestinationCrs(req.crs)
            settings.setOutputSize(output_size(req.extent, req.units_per_pixel, req.max_side))
            settings.setExtent(req.extent)
            settings.setBackgroundColor(QColor(0, 0, 0, 0))
            settings.setOutputImageFormat(QImage.Format_ARGB32)
            job = QgsMapRendererParallelJob(settings)
            job.finished.connect(lambda j=job, r=req: self._done(j, r))
            self.jobs.append(job)
            job.start()

    def cancel(self) -> None:
        self._cancelled = True
        for job in self.jobs:
            job.cancelWithoutBlocking()

    def _done(self, job: QgsMapRendererParallelJob, req: RenderRequest) -> None:
        if self._cancelled:
            return
        image = job.renderedImage()
        if image.isNull() or job.errors():
            errors = "; ".join(e.message for e in job.errors()) or "empty image"
            self._cancelled = True
            self.failed.emit(f"Layer '{req.layer.name()}' could not be rendered: {errors}")
            return
        try:
            window = image_to_window(image_to_rgba(image), job.mapSettings().visibleExtent(), req.crs,
                                     req.layer.name(), req.role)
        except RasterReadError as exc:
            self._cancelled = True
            self.failed.emit(str(exc))
            return
        if window.region_mask is not None and not window.region_mask.any():
            self._cancelled = True
            self.failed.emit(f"Layer '{req.layer.name()}' drew nothing in this region (no tiles here?).")
            return
        self.windows[req.index] = window
        if len(self.windows) == len(self.requests):
            self.finished.emit(self.windows)
