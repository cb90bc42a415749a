"""The background task of one question: read rasters, talk to the worker, measure, write the GeoPackage.

Everything slow (provider reads, ZeroMQ, polygonizing, writing) happens in `run()`, on a QgsTask thread.
Progress reaches the UI as queued signals carrying plain Python objects and QImages; the task touches
no map layer, only provider clones made on the UI thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from osgeo import gdal, ogr, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsGeometry,
    QgsRasterDataProvider,
    QgsRectangle,
    QgsTask,
)
from qgis.PyQt.QtCore import pyqtSignal

from .client import INFO_TTL_S, WorkerClient, WorkerError, WorkerUnavailable
from .errors import describe
from .geometry import mask_polygons, measure
from .gpkg import write_results
from .layers import StepLayers, build_layers
from .preview import mask_thumbnail, rgb_preview, to_qimage
from .rasters import RasterReadError, RasterWindow, read_window
from .record import AskRecord, StepRecord
from .request import EventFolder, build_request
from .styles import step_color


@dataclass
class SourceSpec:
    """One raster to send, prepared on the UI thread."""

    name: str
    role: str
    provider: QgsRasterDataProvider | None = None  # a clone, owned by the task
    region: QgsRectangle | None = None  # in the provider's CRS; None = whole layer
    region_geometry: QgsGeometry | None = None  # polygon region, in the provider's CRS
    window: RasterWindow | None = None  # already read (a rendered web layer)


@dataclass
class AskSpec:
    question: str
    sources: list[SourceSpec]
    options: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # generation settings sent to the worker
    max_side: int = 1024
    results_dir: Path | None = None  # None: keep results in the record only (tests of streaming)
    context: QgsCoordinateTransformContext = field(default_factory=QgsCoordinateTransformContext)
    ellipsoid: str = "EPSG:7030"
    wait_ready_s: float = 0.0  # > 0 while a local worker is still loading its model
    measure_grounding: bool = False


def rasterize_geometry(geometry: QgsGeometry, window: RasterWindow) -> np.ndarray:
    """Pixels of `window` whose centre lies inside `geometry` (GDAL's default rasterize rule)."""
    rows, cols = window.shape
    ds = gdal.GetDriverByName("MEM").Create("", cols, rows, 1, gdal.GDT_Byte)
    ds.SetGeoTransform(list(window.transform))
    srs = None
    if window.crs_wkt:
        srs = osr.SpatialReference()
        srs.ImportFromWkt(window.crs_wkt)
        ds.SetProjection(srs.ExportToWkt())
    mem = ogr.GetDriverByName("Memory").CreateDataSource("")
    layer = mem.CreateLayer("region", srs, ogr.wkbUnknown)
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(ogr.CreateGeometryFromWkb(bytes(geometry.asWkb())))
    layer.CreateFeature(feature)
    gdal.RasterizeLayer(ds, [1], layer, burn_values=[1])
    return ds.GetRasterBand(1).ReadAsArray().astype(bool)


class AskTask(QgsTask):
    """Runs one ask; connect to the signals, then hand it to QgsApplication.taskManager()."""

    textDelta = pyqtSignal(str)
    stepReady = pyqtSignal(object, object)
    stageChanged = pyqtSignal(str)
    answered = pyqtSignal(object)

    def __init__(self, spec: AskSpec, client_factory, record: AskRecord | None = None):
        super().__init__(f"TerraScope: {spec.question[:60]}", QgsTask.CanCancel)
        self.spec = spec
        self.client_factory = client_factory  # () -> WorkerClient, called in the task thread
        self.record = record or AskRecord(question=spec.question, options=list(spec.options),
                                          layer_names=[s.name for s in spec.sources])
        self.windows: list[RasterWindow] = []
        self.previews: list[np.ndarray] = []
        self.error = ""
        self.exception: BaseException | None = None
        self.gpkg_path: Path | None = None
        self.built: list[StepLayers] | None = None
        self._tokens = 0

    # --- task thread ----------------------------------------------------------------------
    def run(self) -> bool:
        client: WorkerClient | None = None
        try:
            client = self.client_factory()
            max_side = self._wait_ready(client)
            self.stageChanged.emit("Reading rasters…")
            self.windows = [self._read(s, max_side) for s in self.spec.sources]
            self.previews = [rgb_preview(w) for w in self.windows]
            self.setProgress(8)
            header, arrays = build_request(self.spec.question, self.windows, self.spec.options, self.spec.settings,
                                           self.spec.measure_grounding)
            folder = EventFolder(self.record, self.windows)
            self.stageChanged.emit("Thinking…")
            client.ask(header, arrays, on_event=lambda ev, arr: self._on_event(folder, ev, arr),
                       should_cancel=self.isCanceled)
            self.answered.emit(self.record)
            if self.spec.results_dir is not None:
                self.stageChanged.emit("Writing results…")
                self.setProgress(95)
                self.gpkg_path = write_results(self.record, self.spec.results_dir, self.spec.context,
                                               self.spec.ellipsoid)
                self.record.gpkg_path = str(self.gpkg_path)
                self.built = build_layers(self.record, self.gpkg_path)  # ~20 ms a step: not on the UI thread
            self.setProgress(100)
            return True
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line for the user
            self.exception = exc
            cancelled = self.isCanceled() or (isinstance(exc, WorkerError) and exc.code == "cancelled")
            self.error = "Cancelled." if cancelled else describe(exc)
            if not self.record.error:  # the dock may already have said why (the worker process died)
                self.record.error = self.error
            return False
        finally:
            if client is not None:
                client.close()
            for s in self.spec.sources:
                s.provider = None  # release provider clones in this thread

    def _wait_ready(self, client: WorkerClient) -> int:
        """Max image side to send; waits for a loading local worker up to `wait_ready_s`."""
        deadline = time.monotonic() + self.spec.wait_ready_s
        while True:
            if self.isCanceled():
                raise WorkerError("cancelled", "cancelled")
            try:
                info = client.info(INFO_TTL_S)  # a pool deals every message a turn: ask once a minute
            except WorkerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                self.stageChanged.emit("Starting the worker…")
                time.sleep(0.5)
                continue
            state = info.get("state")
            if state == "failed":
                raise WorkerError("model_unavailable", str(info.get("error") or "the model failed to load"))
            if state == "ready" or time.monotonic() >= deadline:
                side = (info.get("limits") or {}).get("max_side")
                model = info.get("model") or {}
                self.record.model = str(model.get("name") or model.get("preset") or "")
                self.record.device = str(info.get("device") or "")
                return min(self.spec.max_side, side) if isinstance(side, int) and side > 0 else self.spec.max_side
            self.stageChanged.emit("Loading the model…")
            time.sleep(0.5)

    def _read(self, source: SourceSpec, max_side: int) -> RasterWindow:
        if source.window is not None:
            window = source.window
        else:
            try:
                window = read_window(source.provider, source.region, max_side, role=source.role, name=source.name)
            except RasterReadError as exc:
                raise RasterReadError(f"Layer '{source.name}': {exc}") from None
        window.role = source.role
        if source.region_geometry is not None:
            inside = rasterize_geometry(source.region_geometry, window)
            if not inside.any():
                raise RasterReadError(f"Layer '{source.name}': the selected polygon covers no pixel centre")
            window.region_mask = inside if window.region_mask is None else (window.region_mask & inside)
        return window

    def _on_event(self, folder: EventFolder, ev: dict, arrays: dict) -> None:
        out = folder.on_event(ev, arrays)
        if isinstance(out, str):
            self._tokens += 1
            self.textDelta.emit(out)
            budget = max(1, int(self.spec.settings.get("max_new_tokens", 512)))
            self.setProgress(8 + 84 * min(1.0, self._tokens / budget))
        elif isinstance(out, StepRecord):
            crs = QgsCoordinateReferenceSystem.fromWkt(out.crs_wkt) if out.crs_wkt else QgsCoordinateReferenceSystem()
            out.polygons = measure(mask_polygons(out.mask, out.transform, out.crs_wkt), crs, self.spec.context,
                                   self.spec.ellipsoid)
            index = out.image_index if 0 <= out.image_index < len(self.previews) else 0
            thumb = mask_thumbnail(self.previews[index], out.mask, step_color(out.step)) if self.previews else None
            self.stepReady.emit(out, thumb)

    def preview_image(self, index: int = 0):
        return to_qimage(self.previews[index]) if index < len(self.previews) else None
