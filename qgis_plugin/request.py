"""Building the wire request from raster windows, and folding the streamed events into an AskRecord.

One place for both directions so the dock, the Processing algorithms and the tests speak the protocol
identically (field names come from protocol.py / docs/PROTOCOL.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import protocol as P
from .geometry import transform_for_shape
from .rasters import RasterWindow
from .record import AskRecord, StepRecord

# Worker "role" per picker: optical + optional SAR, or an ordered series t0, t1, ...
OPTICAL, SAR = "optical", "sar"


def _unused_value(data: np.ndarray, inside: np.ndarray) -> float | None:
    """A value that no inside pixel has in every band (so 'all bands == v' marks only outside pixels)."""
    info = np.iinfo(data.dtype)
    candidates = [info.max, info.min, 0, *range(1, 256)]
    equal_all = None
    for v in candidates:
        equal_all = np.logical_and.reduce([band[inside] == v for band in data])
        if not equal_all.any():
            return float(v)
    return None


def apply_region_mask(window: RasterWindow) -> RasterWindow:
    """Mark pixels outside a polygon region as nodata so the worker measures only inside it.

    Floats get NaN; integers get the layer's nodata or a value no inside pixel has; as a last resort the
    window is sent as float32 with NaN.
    """
    mask = window.region_mask
    if mask is None or bool(mask.all()):
        return window
    data = window.data.copy()
    outside = ~mask
    if np.issubdtype(data.dtype, np.inexact):
        data[:, outside] = np.nan
        nodata = [float("nan")] * data.shape[0]
    else:
        value = next((v for v in window.nodata if v is not None), None)
        if value is None:
            value = _unused_value(data, mask)
        if value is None:
            data = data.astype(np.float32)
            data[:, outside] = np.nan
            nodata = [float("nan")] * data.shape[0]
        else:
            data[:, outside] = value
            nodata = [value] * data.shape[0]
    return RasterWindow(data=data, transform=window.transform, crs_wkt=window.crs_wkt, nodata=nodata,
                        band_names=window.band_names, role=window.role, name=window.name,
                        decimation=window.decimation, source_size=window.source_size, region_mask=mask,
                        extra=window.extra)


def payload(window: RasterWindow) -> P.RasterPayload:
    """The wire form of a window (the protocol has one nodata per raster: the first band's)."""
    nodata = next((v for v in window.nodata if v is not None), None)
    return P.RasterPayload(data=window.data, geotransform=list(window.transform),
                           crs_wkt=window.crs_wkt or None, nodata=nodata, band_names=window.band_names,
                           role=window.role)


def build_request(question: str, windows: list[RasterWindow], options: list[str] | None = None,
                  settings: dict | None = None, measure_grounding: bool = False
                  ) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and arrays of an ``ask`` (raises ValueError with a one-line reason for bad input)."""
    if not question.strip():
        raise ValueError("Type a question first.")
    if not windows:
        raise ValueError("Pick a raster layer first.")
    opts = [o.strip() for o in (options or []) if o.strip()]
    if len(opts) == 1:
        raise ValueError("Give at least two options, or none.")
    return P.build_ask(question.strip(), [payload(apply_region_mask(w)) for w in windows], options=opts or None,
                       settings=settings or None, measure_grounding=measure_grounding)


def series_roles(count: int) -> list[str]:
    return [f"t{i}" for i in range(count)]


class EventFolder:
    """Applies worker events to an AskRecord; `on_event` is safe to call from the ask thread."""

    def __init__(self, record: AskRecord, windows: list[RasterWindow]):
        self.record = record
        self.windows = windows

    def on_event(self, ev: dict[str, Any], arrays: dict[str, np.ndarray]) -> StepRecord | str | None:
        """Returns the new StepRecord for a mask, the text delta for a token, else None."""
        name = ev.get("event")
        if name == "token":
            text = str(ev.get("text", ""))
            self.record.reasoning += text
            self.record.stream += text
            return text
        if name == "mask":
            step = self._step(ev, arrays)
            self.record.steps.append(step)
            return step
        if name == "done":
            self._done(ev)
        return None

    def _step(self, ev: dict[str, Any], arrays: dict[str, np.ndarray]) -> StepRecord:
        index = int(ev.get("image", 0) or 0)
        window = self.windows[index] if 0 <= index < len(self.windows) else self.windows[0]
        mask = np.asarray(arrays.get("mask"))
        if mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim != 2:
            raise ValueError(f"the worker sent a mask of shape {list(mask.shape)} for step {ev.get('step')}")
        mask = mask.astype(bool)
        grid = ev.get("grid") or {}
        gt = grid.get("geotransform")
        if gt is not None and len(gt) == 6 and tuple(grid.get("shape", mask.shape)) == mask.shape:
            transform = tuple(float(v) for v in gt)
        else:
            transform = transform_for_shape(window.transform, window.shape, mask.shape)
        if window.region_mask is not None and window.region_mask.shape == mask.shape:
            mask = mask & window.region_mask
        meas = dict(ev.get("measurements") or {})
        measured_px = meas.get("area_px")
        if isinstance(measured_px, int) and int(mask.sum()) != measured_px and window.shape == mask.shape:
            # The worker measured the mask on valid pixels only but sent it whole: drop the pixels it could not
            # have counted (nodata, NaN, transparent), so polygons and figures describe the same pixels.
            mask = mask & valid_pixels(window)
        area = meas.get("area_ha")
        return StepRecord(step=int(ev.get("step", len(self.record.steps))), label=str(ev.get("label", "")),
                          score=float(ev.get("score") or 0.0), mask=mask, transform=transform,  # type: ignore[arg-type]
                          crs_wkt=str(grid.get("crs_wkt") or window.crs_wkt or ""), image_index=index,
                          region_rule=str(ev["region_rule"]) if ev.get("region_rule") else None,
                          worker_area_ha=float(area) if isinstance(area, (int, float)) else None,
                          measurements=meas)

    def _done(self, ev: dict[str, Any]) -> None:
        r = self.record
        r.answer = str(ev.get("answer") or "")
        r.choice = ev.get("choice") or None
        if ev.get("reasoning"):
            r.reasoning = str(ev["reasoning"])
        r.text = str(ev.get("text") or "")
        r.stopped = str(ev.get("stopped") or "")
        r.timings_ms = dict(ev.get("timings_ms") or {})
        r.checks = [str(c.get("message")) for c in ev.get("checks") or [] if isinstance(c, dict) and c.get("message")]
        measured = ev.get("measured_choice")
        if isinstance(measured, dict) and measured.get("choice"):  # the option the masks support (worker/resolve.py)
            r.measured_choice = str(measured["choice"])
            r.measured = str(measured.get("message") or "")
        model = ev.get("model") or {}
        r.model = str(model.get("name") or model.get("preset") or r.model)
        r.device = str(model.get("device") or r.device)


def valid_pixels(window: RasterWindow) -> np.ndarray:
    """Pixels with data, by the worker's rules: finite, not nodata in every band, alpha (band 4 of an
    8-bit 4-band raster, or a band named alpha) not 0."""
    data = window.data
    valid = np.ones(window.shape, bool)
    if np.issubdtype(data.dtype, np.inexact):
        valid &= np.isfinite(data).all(axis=0)
    nodata = next((v for v in window.nodata if v is not None and not np.isnan(v)), None)
    if nodata is not None:
        valid &= ~np.logical_and.reduce([band == nodata for band in data])
    names = [n.lower() for n in window.band_names]
    alpha = next((i for i, n in enumerate(names) if "alpha" in n), None)
    if alpha is None and data.shape[0] == 4 and data.dtype == np.uint8:
        alpha = 3
    if alpha is not None:
        valid &= data[alpha] != 0
    return valid
