"""Sliding-window mode: a very large request grid is answered window by window, masks stitched, measured once.

Why: the model sees a resampled view no larger than ``max_side``; on a 20,000 px scene a ship or a house is
then less than a pixel. In windowed mode every overlapping window of the request grid gets its own question
(its own model view, decimated per window as usual), and the k-th ``[SEG]`` mask of every window is stitched
onto the request grid (``raster.stitch_masks``) before anything is measured, so hectares, coverage and object
counts are computed once over the whole area: an object cut by a window seam is one object, and overlaps are
not counted twice.

The step rule: stitched step j groups, per image, the k-th ``[SEG]`` of every window that produced at least
k+1 masks (k = ``window_step``); windows without a k-th mask do not take part in step j (their area stays
empty unless a neighbour that has the step covers it). Labels may differ between windows; the most common one
is the step's ``label`` and all of them are in ``labels``. With one image (or windows that agree on the image)
j == k.

No single model answer covers the raster, so ``done.answer`` says that it is a windowed run and gives the
measured figures; each window's own answer, choice and reasoning are in ``done.windows``; ``choice`` is null.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.types import AnswerResult, ImageInput, MaskStep
from qgis_plugin import protocol as P
from worker.measure import Georef, RasterError, count_objects, grounding_text, measure_mask, sieve
from worker.raster import (
    PreparedRaster,
    TileWindow,
    mask_to_request_grid,
    prepare_array,
    sliding_windows,
    stitch_masks,
    window_georef,
)
from worker.resolve import MeasuredImage, MeasuredStep

WINDOW_MODES = ("auto", "on", "off")
MIN_TILE = 16  # smaller windows hold no scene; also keeps a request from asking for millions of windows
MAX_TILE = 65_536


@dataclass(frozen=True)
class WindowSettings:
    """What a request asked for (``settings.windows``); ``None`` fields take the worker's defaults."""

    mode: str = "auto"
    tile: int | None = None
    overlap: int | None = None


@dataclass(frozen=True)
class WindowDefaults:
    """The worker's side: when ``auto`` turns windows on, and the tiles a request gets if it names none."""

    threshold: int = 4096  # auto: windows when the request grid's longer side exceeds this
    tile: int = 2048
    overlap: int = 256
    max_windows: int = 100  # bounds the work of one request (each window is one full answer)

    def to_dict(self) -> dict[str, int]:
        return {"window_threshold": self.threshold, "window_tile": self.tile, "window_overlap": self.overlap,
                "max_windows": self.max_windows}


# ------------------------------------------------------------------------------------------ sources
@dataclass
class GridImage:
    """One request image as a source of windows on its full (request) grid."""

    role: str
    shape: tuple[int, int]
    georef: Georef
    nodata: float | None
    band_names: list[str] | None
    sensor: str | None
    data: np.ndarray | None = None
    path: Path | None = None

    def read(self, win: TileWindow, max_side: int) -> tuple[np.ndarray, Georef]:
        """The window's bands and the georef of the returned grid (a file is read decimated to ``max_side``)."""
        if self.data is not None:
            rows, cols = win.slices
            return self.data[..., rows, cols], window_georef(self.georef, win)
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        from worker.raster import _view_shape

        oh, ow = _view_shape(win.height, win.width, max_side)
        assert self.path is not None
        with rasterio.Env(GDAL_CACHEMAX=64 * 1024 * 1024), rasterio.open(self.path) as ds:
            data = ds.read(window=Window(win.col_off, win.row_off, win.width, win.height),
                           out_shape=(ds.count, oh, ow), resampling=Resampling.nearest)
        return data, window_georef(self.georef, win).scaled(win.width / ow, win.height / oh)


def grid_image(im: Any) -> GridImage:
    """A validated ``RasterRequest`` as a GridImage; a file is opened for its size and georef only."""
    if im.path is None:
        h, w = im.data.shape[-2:]
        return GridImage(im.role, (int(h), int(w)), im.georef, im.nodata, im.band_names, im.sensor, data=im.data)
    import rasterio
    from rasterio.errors import RasterioIOError

    from worker.raster import _band_names

    try:
        with rasterio.open(im.path) as ds:
            if ds.count == 0 or ds.width == 0 or ds.height == 0:
                raise RasterError("empty_raster", f"{im.path} has no pixels")
            georef, shape, names, nodata = Georef.from_dataset(ds), (ds.height, ds.width), _band_names(ds), ds.nodata
    except RasterioIOError as exc:
        raise RasterError("bad_raster", f"cannot open raster {im.path}: {exc}") from None
    return GridImage(im.role, shape, georef, im.nodata if im.nodata is not None else nodata,
                     im.band_names or names, im.sensor, path=im.path)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class WindowPlan:
    mode: str
    shape: tuple[int, int]
    tile: int
    overlap: int
    windows: list[TileWindow]
    images: list[GridImage]


def plan_windows(req: Any, defaults: WindowDefaults) -> WindowPlan | None:
    """The windows to answer, or None when the request is answered in one view.

    ``auto``: windows when the request grid's longer side exceeds ``defaults.threshold``. A grid that fits
    in one tile is always answered in one view (that view is the whole raster). Raises ProtocolError
    (``bad_field``) for ``on`` with images on different grids, or more windows than the worker allows.
    """
    ws: WindowSettings = getattr(req, "windows", None) or WindowSettings()
    if ws.mode == "off":
        return None
    images = [grid_image(im) for im in req.images]
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        if ws.mode == "on":
            raise P.ProtocolError(P.BAD_FIELD, "sliding windows need all images on one grid (same height and "
                                  f"width); got {', '.join(f'{h}x{w}' for h, w in shapes)}", req.id)
        return None  # auto: answered in one view, as before windowed mode existed
    shape = shapes[0]
    if ws.mode == "auto" and max(shape) <= defaults.threshold:
        return None
    tile = ws.tile or defaults.tile
    overlap = ws.overlap if ws.overlap is not None else (defaults.overlap if ws.tile is None else tile // 8)
    overlap = min(overlap, tile - 1) if ws.overlap is None else overlap
    if overlap >= tile:
        raise P.ProtocolError(P.BAD_FIELD, f"'settings.windows.overlap' = {overlap} must be smaller than the tile "
                              f"({tile} px)", req.id)
    if shape[0] <= tile and shape[1] <= tile:
        return None
    windows = sliding_windows(shape, tile, overlap)
    if len(windows) > defaults.max_windows:
        raise P.ProtocolError(
            P.BAD_FIELD, f"a {shape[0]}x{shape[1]} grid needs {len(windows)} windows of {tile} px ({overlap} px "
            f"overlap); this worker answers at most {defaults.max_windows} per request: use a larger "
            "'settings.windows.tile', a smaller region, or windows 'off'", req.id)
    return WindowPlan(ws.mode, shape, tile, overlap, windows, images)


# ----------------------------------------------------------------------------------------------- run
def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest resampling of a bool mask to ``shape`` (same rule as ``raster.mask_to_request_grid``)."""
    m = np.asarray(mask, dtype=bool)
    h, w = shape
    if m.shape == (h, w):
        return m
    rows = np.minimum((np.arange(h) * m.shape[0]) // h, m.shape[0] - 1)
    cols = np.minimum((np.arange(w) * m.shape[1]) // w, m.shape[1] - 1)
    return m[np.ix_(rows, cols)]


@dataclass
class WindowStep:
    """One ``[SEG]`` of one window: its mask on the window's part of the request grid (bit-packed)."""

    window: int
    step: int
    image: int
    label: str
    score: float
    packed: np.ndarray
    shape: tuple[int, int]
    area_px: int
    count: int

    @property
    def mask(self) -> np.ndarray:
        h, w = self.shape
        return np.unpackbits(self.packed, count=h * w).reshape(h, w).astype(bool)


@dataclass
class StitchedStep:
    step: int
    window_step: int
    image: int
    parts: list[WindowStep] = field(default_factory=list)

    @property
    def label(self) -> str:
        counts = collections.Counter(p.label for p in self.parts)
        best = max(counts.values())
        return next(p.label for p in self.parts if counts[p.label] == best)  # ties: the first window's

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(p.label for p in self.parts))

    @property
    def score(self) -> float:
        return float(np.mean([p.score for p in self.parts]))


def group_steps(parts: Sequence[WindowStep]) -> list[StitchedStep]:
    """The step rule: per (window step k, image), in order of k then image; renumbered 0..n-1."""
    groups: dict[tuple[int, int], StitchedStep] = {}
    for p in sorted(parts, key=lambda p: (p.step, p.image, p.window)):
        groups.setdefault((p.step, p.image), StitchedStep(0, p.step, p.image)).parts.append(p)
    out = list(groups.values())
    for j, g in enumerate(out):
        g.step = j
    return out


def stitch_step(shape: tuple[int, int], windows: Sequence[TileWindow], group: StitchedStep) -> np.ndarray:
    """``stitch_masks`` over the bounding box of the windows that have this step (same result, less memory)."""
    wins = [windows[p.window] for p in group.parts]
    r0, c0 = min(w.row_off for w in wins), min(w.col_off for w in wins)
    r1, c1 = max(w.row_off + w.height for w in wins), max(w.col_off + w.width for w in wins)
    local = [TileWindow(w.row_off - r0, w.col_off - c0, w.height, w.width) for w in wins]
    out = np.zeros(shape, bool)
    out[r0:r1, c0:c1] = stitch_masks((r1 - r0, c1 - c0), local, [p.mask for p in group.parts])
    return out


def _window_dict(win: TileWindow) -> dict[str, int]:
    return {"row_off": win.row_off, "col_off": win.col_off, "height": win.height, "width": win.width}


def _figures(m: dict) -> str:
    objects = "1 object" if m.get("count") == 1 else f"{m.get('count', 0)} objects"
    cov = f"{m.get('coverage_pct') or 0.0:.1f}% of valid area"
    if m.get("units") == "m" and m.get("area_ha") is not None:
        area = f"{m['area_ha']:.2f} ha" if m["area_ha"] >= 0.01 else f"{m.get('area_m2') or 0.0:.0f} m²"
    else:
        area = f"{m.get('area_px', 0)} px (no CRS, so no hectares)"
    return f"{area}, {cov}, {objects}"


def windowed_answer(plan: WindowPlan, measurements: list[dict], answered: int, skipped: int,
                    options: bool) -> str:
    """The honest whole-raster answer of a windowed run: what was done and the measured figures."""
    h, w = plan.shape
    text = (f"Windowed run: the {h}x{w} px raster was answered in {answered} overlapping windows of up to "
            f"{plan.tile} px ({plan.overlap} px overlap); the model never saw the whole raster at once, so no "
            "single model answer covers it (each window's own answer is listed per window).")
    if skipped:
        text += f" {skipped} window(s) had no valid pixels and were skipped."
    if measurements:
        parts = [f"mask {m['step'] + 1} \u201c{m.get('label') or '?'}\u201d ({len(m['windows'])} window(s)): "
                 f"{_figures(m)}" for m in measurements]
        text += " Measured once on the stitched masks over the whole raster: " + "; ".join(parts) + "."
    else:
        text += " No window produced a [SEG] mask, so nothing was measured over the whole raster."
    if options:
        text += (" No option is chosen: an option is a claim about the whole raster, which no window saw; "
                 "the windows' own choices are listed per window.")
    return text


_STOP_ORDER = ("cancelled", "max_new_tokens", "max_seg", "answer", "eos")


class WindowedRun:
    """Runs one request's windows through the model, then stitches, measures and builds the ``done`` fields.

    ``emit(header, arrays)`` sends an event to the client; ``should_stop()`` is polled between windows and by
    the model at every decode step (cancel, shutdown, memory budget).
    """

    def __init__(self, model: Any, req: Any, plan: WindowPlan, max_side: int,
                 emit: Callable[[dict, dict | None], None], should_stop: Callable[[], bool]):
        self.model, self.req, self.plan, self.max_side = model, req, plan, max_side
        self.emit, self.should_stop = emit, should_stop
        self.parts: list[WindowStep] = []
        self.valid = [np.zeros(plan.shape, bool) for _ in plan.images]
        self.windows_out: list[dict] = []
        self.timings: dict[str, float] = collections.defaultdict(float)
        self.stitched: list[MeasuredStep] = []  # kept for the measured choice (multiple-choice requests only)

    def _progress(self, **fields: Any) -> None:
        self.emit(P.event("progress", self.req.id, count=len(self.plan.windows), **fields), None)

    def _prepare(self, win: TileWindow) -> list[PreparedRaster]:
        out = []
        for im in self.plan.images:
            data, georef = im.read(win, self.max_side)
            out.append(prepare_array(data, georef, nodata=im.nodata, band_names=im.band_names,
                                     role="sar" if im.role == "sar" else "optical", sensor=im.sensor,
                                     max_side=self.max_side))
        return out

    def run(self) -> dict[str, Any]:
        """The ``done`` fields; ``stopped == "cancelled"`` when a cancel arrived (between or inside windows)."""
        n = len(self.plan.windows)
        for i, win in enumerate(self.plan.windows):
            if self.should_stop():
                return {"stopped": "cancelled"}
            self._progress(stage="window", index=i, state="started", window=_window_dict(win))
            result = self._run_window(i, win)
            if result is None:
                continue
            if result.stopped == "cancelled" or self.should_stop():
                return {"stopped": "cancelled"}
            self._progress(stage="window", index=i, state="finished", window=_window_dict(win),
                           stopped=result.stopped, masks=len(result.steps))
        groups = group_steps(self.parts)
        self._progress(stage="stitch", steps=len(groups))
        measurements = []
        for g in groups:
            if self.should_stop():
                return {"stopped": "cancelled"}
            measurements.append(self._stitch_and_send(g))
        answered = [w for w in self.windows_out if w["state"] == "answered"]
        if not answered:
            raise RasterError("all_nodata", f"none of the {n} windows has valid pixels (all nodata, NaN or "
                                            "transparent)")
        stops = [w["stopped"] for w in answered]
        h, w = self.plan.shape
        header_of = {wd["index"]: f"[window {wd['index'] + 1}/{n}: rows {wd['window']['row_off']}-"
                     f"{wd['window']['row_off'] + wd['window']['height'] - 1}, cols {wd['window']['col_off']}-"
                     f"{wd['window']['col_off'] + wd['window']['width'] - 1}]" for wd in answered}
        return {
            "answer": windowed_answer(self.plan, measurements, len(answered), n - len(answered),
                                      bool(self.req.options)),
            "choice": None,
            "reasoning": "\n\n".join(f"{header_of[wd['index']]}\n{wd['reasoning']}" for wd in answered),
            "text": "\n\n".join(f"{header_of[wd['index']]}\n{wd['text']}" for wd in answered),
            "stopped": min(stops, key=lambda s: _STOP_ORDER.index(s) if s in _STOP_ORDER else len(_STOP_ORDER)),
            "measurements": measurements,
            "windows": self.windows_out,
            "windowed": {"mode": self.plan.mode, "tile": self.plan.tile, "overlap": self.plan.overlap,
                         "grid": [h, w], "count": n, "answered": len(answered), "skipped": n - len(answered),
                         "step_rule": "step j = the k-th [SEG] of every window (per image); masks stitched "
                                      "with overlap weighting, then measured once"},
            "timings_ms": dict(self.timings),
        }

    def _run_window(self, i: int, win: TileWindow) -> AnswerResult | None:
        req = self.req
        t0 = time.monotonic()
        try:
            prepared = self._prepare(win)
        except RasterError as exc:
            if exc.code != "all_nodata":
                raise
            self.windows_out.append({"index": i, "window": _window_dict(win), "state": "skipped",
                                     "reason": exc.message})
            self._progress(stage="window", index=i, state="skipped", window=_window_dict(win), reason=exc.message)
            return None
        self.timings["prepare"] += (time.monotonic() - t0) * 1000
        for k, p in enumerate(prepared):
            self.valid[k][win.slices] |= resize_nearest(mask_to_request_grid(p.valid, p), (win.height, win.width))
        images = [ImageInput(pixels=p.pixels, role=im.role) for p, im in zip(prepared, self.plan.images)]
        on_grid: dict[int, np.ndarray] = {}

        def window_mask(step: MaskStep) -> np.ndarray:
            if step.step not in on_grid:
                p = prepared[step.image_index]
                model_mask = sieve(step.mask) if req.sieve else step.mask  # specks go on the model grid
                on_grid[step.step] = resize_nearest(mask_to_request_grid(model_mask, p), (win.height, win.width))
            return on_grid[step.step]

        def on_token(text: str) -> None:
            self.emit(P.event("token", req.id, text=text, window=i), None)

        def grounding(step: MaskStep) -> str | None:
            """Measured on this window: it is what the window's reasoning is about."""
            p = prepared[step.image_index]
            valid = resize_nearest(mask_to_request_grid(p.valid, p), (win.height, win.width))
            georef = window_georef(self.plan.images[step.image_index].georef, win)
            try:
                return grounding_text(measure_mask(window_mask(step), georef, valid))
            except RasterError:
                return None

        extra = {"forced_prefix": req.forced_prefix} if req.forced_prefix else {}
        t1 = time.monotonic()
        # "the largest X" or "the eastern half" of one window is not that of the raster: no phrase rules here
        settings = replace(req.settings, region_rules=False)
        result = self.model.answer(images, req.question, req.options, settings=settings, on_token=on_token,
                                   grounding=grounding if req.measure_grounding else None,
                                   should_stop=self.should_stop, **extra)
        self.timings["model"] += (time.monotonic() - t1) * 1000
        for key, v in (result.timings_ms or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.timings[key] += float(v)
        steps = []
        for s in result.steps:
            m = window_mask(s)
            part = WindowStep(i, s.step, s.image_index, s.label, float(s.score), np.packbits(m), m.shape,
                              int(m.sum()), count_objects(m) if m.any() else 0)
            self.parts.append(part)
            steps.append({"step": s.step, "label": s.label, "image": s.image_index, "score": float(s.score),
                          "area_px": part.area_px, "count": part.count})
        self.windows_out.append({
            "index": i, "window": _window_dict(win), "state": "answered",
            "geotransform": list(window_georef(self.plan.images[0].georef, win).to_gdal()),
            "answer": result.answer, "choice": result.choice, "reasoning": result.reasoning, "text": result.text,
            "stopped": result.stopped, "steps": steps,
            "timings_ms": {k: round(float(v), 3) for k, v in (result.timings_ms or {}).items()
                           if isinstance(v, (int, float))} | {"total": round((time.monotonic() - t0) * 1000, 3)},
        })
        return result

    def resolve_input(self) -> tuple[list[MeasuredStep], list[MeasuredImage]]:
        """(stitched steps, images) for ``worker.resolve.measured_choice``, on the request grid."""
        images = [MeasuredImage(im.role, im.georef, self.valid[k]) for k, im in enumerate(self.plan.images)]
        return self.stitched, images

    def _stitch_and_send(self, g: StitchedStep) -> dict:
        t0 = time.monotonic()
        mask = stitch_step(self.plan.shape, self.plan.windows, g)
        self.timings["stitch"] += (time.monotonic() - t0) * 1000
        t1 = time.monotonic()
        georef = self.plan.images[g.image].georef
        try:
            m = measure_mask(mask, georef, self.valid[g.image])
            meas = m.to_dict() | {"grounding": grounding_text(m)}
        except RasterError as exc:
            meas = {"note": f"measurement unavailable: {exc.message}"}
        self.timings["measure"] += (time.monotonic() - t1) * 1000
        windows = [p.window for p in g.parts]
        ev = P.event("mask", self.req.id, step=g.step, window_step=g.window_step, label=g.label, labels=g.labels,
                     image=g.image, score=g.score, windows=windows, measurements=meas, grounding_text=None,
                     grid={"geotransform": list(georef.to_gdal()), "crs_wkt": georef.crs_wkt,
                           "shape": list(mask.shape)},
                     token_indices=[], modality=[])
        self.emit(ev, {"mask": mask.view(np.uint8)})
        if self.req.options:
            self.stitched.append(MeasuredStep(g.step, g.label, g.image, mask, meas))
        return {"step": g.step, "window_step": g.window_step, "label": g.label, "labels": g.labels,
                "image": g.image, "score": g.score, "windows": windows} | meas
