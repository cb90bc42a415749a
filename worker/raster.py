"""Raster preparation: any raster (band count, dtype, nodata, SAR) -> the 8-bit RGB view the model sees.

The model sees a resampled view no larger than ``max_side``; masks come back on the request's own grid
(``mask_to_request_grid``), so measurements always use the true pixel size. Every choice that is not
certain (band order, dB vs linear SAR) is written to ``PreparedRaster.notes``: never a silent guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.measure import Georef, RasterError

__all__ = [
    "PreparedRaster",
    "RasterError",
    "choose_bands",
    "mask_to_request_grid",
    "prepare_array",
    "read_raster",
    "sliding_windows",
    "stitch_masks",
    "window_georef",
]

MIN_SIDE = 4  # a 1xN or 2x2 raster carries no scene the model could reason about
_STRETCH = (2.0, 98.0)
_MAX_STRETCH_SAMPLES = 1_000_000
_SAR_NAMES = ("VV", "VH", "HH", "HV")


@dataclass
class PreparedRaster:
    """The model's view of one raster plus what is needed to bring masks back to the request grid."""

    pixels: np.ndarray  # HxWx3 uint8 on the (maybe decimated) model view grid
    valid: np.ndarray  # bool, model view grid
    georef: Georef  # the request's own grid
    shape: tuple[int, int]  # the request's own grid (H, W)
    view_georef: Georef
    band_names: list[str]
    role: str
    notes: list[str] = field(default_factory=list)
    bands_used: list[int] = field(default_factory=list)  # 0-based indexes into the input bands
    sensor: str = "unknown"
    valid_fraction: float = 1.0

    @property
    def view_shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


# ------------------------------------------------------------------------------------- band choice
_COLOUR_WORDS = {"red": "red", "green": "green", "blue": "blue", "alpha": "alpha"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _colour_of(name: str) -> str | None:
    """'B04_red' -> 'red', 'Red' -> 'red', 'alpha' -> 'alpha'; band numbers alone say nothing here."""
    for token in re.split(r"[^a-z]+", name.lower()):
        if token in _COLOUR_WORDS:
            return _COLOUR_WORDS[token]
    return None


def _s2_number(name: str) -> str | None:
    m = re.fullmatch(r"b0?(\d{1,2}a?)", _norm(name))
    return m.group(1) if m else None


def choose_bands(
    count: int,
    band_names: list[str] | None,
    dtype: np.dtype,
    role: str = "optical",
    sensor: str | None = None,
) -> tuple[list[int], int | None, str, list[str]]:
    """(RGB or SAR band indexes, alpha index or None, sensor label, notes) for a raster's bands.

    Order of evidence: an explicit ``sensor``; colour words in band names/colour interpretation
    ("B04_red", "red"); Sentinel-2 band numbers (B4/B3/B2); SAR polarisations; then the band count.
    """
    names = [str(n) if n else "" for n in (band_names or [])] + [""] * max(0, count - len(band_names or []))
    notes: list[str] = []
    s = (sensor or "").lower().replace("-", "").replace("_", "")
    colours = {_colour_of(n): i for i, n in reversed(list(enumerate(names))) if _colour_of(n)}
    alpha = colours.get("alpha")

    if role == "sar" or s == "sar" or np.issubdtype(dtype, np.complexfloating):
        return _choose_sar(count, names, notes)
    presets = {
        "sentinel2": [3, 2, 1], "sentinel2l1c": [3, 2, 1], "sentinel2l2a": [3, 2, 1],
        "landsat": [2, 1, 0], "landsat7": [2, 1, 0], "landsat5": [2, 1, 0], "landsattm": [2, 1, 0],
        "landsat8": [3, 2, 1], "landsat9": [3, 2, 1], "bgrn": [2, 1, 0], "cloudchip": [2, 1, 0],
        "rgb": [0, 1, 2], "rgba": [0, 1, 2], "rgbn": [0, 1, 2], "naip": [0, 1, 2],
    }
    if s:
        if s not in presets:
            raise RasterError("bad_sensor", f"unknown sensor '{sensor}'; known: {', '.join(sorted(presets))}")
        idx = presets[s]
        if max(idx) >= count:
            raise RasterError("bad_band_count", f"sensor '{sensor}' needs {max(idx) + 1} bands, raster has {count}")
        if s == "rgba" and count >= 4:
            alpha = 3
        return idx, alpha, s, [f"bands {_label(idx, names)} as R,G,B ({sensor} default)"]
    if all(c in colours for c in ("red", "green", "blue")):
        idx = [colours["red"], colours["green"], colours["blue"]]
        return idx, alpha, "rgb-named", [f"bands {_label(idx, names)} as R,G,B (from band names)"]
    numbers = {_s2_number(n): i for i, n in enumerate(names) if _s2_number(n)}
    if all(k in numbers for k in ("4", "3", "2")):
        idx = [numbers["4"], numbers["3"], numbers["2"]]
        label = "sentinel2" if ("8a" in numbers or "11" in numbers or count in (4, 12, 13)) else "b4b3b2"
        return idx, alpha, label, [f"bands {_label(idx, names)} as R,G,B (B4/B3/B2 from band names)"]
    pols = {_norm(n).upper(): i for i, n in enumerate(names) if _norm(n).upper() in _SAR_NAMES}
    if len(pols) >= 1 and len(pols) == count:
        return _choose_sar(count, names, ["SAR polarisations found in band names: treated as SAR"])
    # No usable names: the band count decides, and the note says it was assumed.
    if count == 1:
        return [0, 0, 0], None, "gray", ["single band shown as grey"]
    if count == 3:
        return [0, 1, 2], alpha, "rgb", ["3 bands assumed R,G,B"]
    if count == 4 and dtype == np.uint8:
        return [0, 1, 2], 3 if alpha is None else alpha, "rgba", ["4 bands of 8-bit assumed R,G,B,alpha"]
    if count == 4:
        return [2, 1, 0], alpha, "bgrn", [("4 bands assumed B,G,R,NIR (e.g. Sentinel-2 B02,B03,B04,B08); "
                                          "pass sensor='rgbn' if the order is R,G,B,NIR")]
    if count == 6:
        return [2, 1, 0], alpha, "landsat", ["6 bands assumed Landsat TM/ETM+ B1,B2,B3,B4,B5,B7: R,G,B = 3,2,1"]
    if count in (12, 13):
        return [3, 2, 1], alpha, "sentinel2", [f"{count} bands assumed Sentinel-2 (B1..B12): R,G,B = B4,B3,B2"]
    if count == 2:
        raise RasterError("bad_band_count", "2-band raster is neither RGB nor named VV/VH SAR: "
                                            "send it with role 'sar' or choose three bands")
    if count == 0:
        raise RasterError("bad_band_count", "raster has no bands")
    return [0, 1, 2], alpha, "unknown", [(f"band order of this {count}-band raster is unknown: bands 1,2,3 "
                                         "shown as R,G,B (choose bands or a sensor to change it)")]


def _label(idx: list[int], names: list[str]) -> str:
    return ",".join(names[i] if i < len(names) and names[i] else str(i + 1) for i in idx)


def _choose_sar(count: int, names: list[str], notes: list[str]) -> tuple[list[int], None, str, list[str]]:
    pols = {_norm(n).upper(): i for i, n in enumerate(names) if _norm(n).upper() in _SAR_NAMES}
    if "VV" in pols and "VH" in pols:
        return [pols["VV"], pols["VH"]], None, "sar", notes + ["SAR channels VV, VH, mean(VV, VH)"]
    if "HH" in pols and "HV" in pols:
        return [pols["HH"], pols["HV"]], None, "sar", notes + [
            "SAR has HH/HV, not VV/VH: HH used as co-pol and HV as cross-pol (model was trained on VV/VH)"]
    if count == 1:
        return [0, 0], None, "sar", notes + ["single-polarisation SAR: one band used for all three channels"]
    if count == 0:
        raise RasterError("bad_band_count", "raster has no bands")
    return [0, 1], None, "sar", notes + [
        f"SAR band names unknown: bands 1,2 of {count} assumed co-pol (VV) and cross-pol (VH)"]


# ------------------------------------------------------------------------------------- preparation
def _decimate_index(n: int, m: int) -> np.ndarray:
    """Index of the source pixel whose centre is nearest the centre of each of ``m`` view pixels."""
    return np.minimum(((np.arange(m) + 0.5) * (n / m)).astype(np.int64), n - 1)


def _view_shape(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max(h, w) <= max_side:
        return h, w
    f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def _sample(values: np.ndarray) -> np.ndarray:
    if values.size > _MAX_STRETCH_SAMPLES:
        values = values[:: values.size // _MAX_STRETCH_SAMPLES + 1]
    return values


def _stretch(chans: list[np.ndarray], valid: np.ndarray, joint: bool) -> tuple[np.ndarray, list[str]]:
    """2-98 % stretch over valid pixels to uint8; joint keeps colour balance for optical bands."""
    out = np.zeros(valid.shape + (3,), np.uint8)
    notes: list[str] = []
    bounds: list[tuple[float, float]] = []
    if joint:
        pool = np.concatenate([_sample(c[valid]) for c in chans])
        lo, hi = (float(v) for v in np.percentile(pool, _STRETCH))
        bounds = [(lo, hi)] * len(chans)
    else:
        for c in chans:
            lo, hi = (float(v) for v in np.percentile(_sample(c[valid]), _STRETCH))
            bounds.append((lo, hi))
    for k, (c, (lo, hi)) in enumerate(zip(chans, bounds)):
        if hi <= lo:
            notes.append(f"channel {k + 1} is constant over valid pixels")
            out[..., k] = np.where(valid, 128, 0).astype(np.uint8)
            continue
        scaled = (c.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
        np.clip(scaled, 0, 255, out=scaled)
        out[..., k] = np.where(valid, scaled + 0.5, 0).astype(np.uint8)
    notes.append("stretch 2-98 % " + ("joint" if joint else "per channel") + ": " +
                 ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in bounds[:3]))
    return out, notes


def _looks_like_db(arr: np.ndarray, band_names: list[str] | None) -> bool:
    if not np.issubdtype(arr.dtype, np.floating):
        return False
    if any(_colour_of(str(n or "")) or _s2_number(str(n or "")) for n in (band_names or [])):
        return False
    sample = _sample(arr[0].ravel())
    sample = sample[np.isfinite(sample)]
    return sample.size > 0 and float(np.median(sample)) < 0.0


def _full_range(chans: list[np.ndarray], valid: np.ndarray) -> bool:
    """8-bit imagery that already uses most of 0-255 (aerial RGB) is shown untouched; dim DN data is not."""
    pool = np.concatenate([_sample(c[valid]) for c in chans])
    lo, hi = np.percentile(pool, _STRETCH)
    return float(hi - lo) >= 128.0


def _sar_db(chans: list[np.ndarray], valid: np.ndarray, dtype: np.dtype) -> tuple[list[np.ndarray], str]:
    """SAR bands to dB: complex -> 20·log10|z|; negative values -> already dB; else linear power."""
    if np.issubdtype(dtype, np.complexfloating):
        return [20.0 * np.log10(np.maximum(np.abs(c), 1e-10)).astype(np.float32) for c in chans], \
            "complex SAR: magnitude to dB (20·log10|z|)"
    has_negative = any(bool((c[valid] < 0).any()) for c in chans)
    if has_negative:
        return [c.astype(np.float32) for c in chans], "SAR values contain negatives: taken as dB"
    if np.issubdtype(dtype, np.integer):
        return [20.0 * np.log10(np.maximum(c.astype(np.float32), 1e-6)) for c in chans], \
            "integer SAR taken as amplitude DN: 20·log10(DN) dB"
    return [10.0 * np.log10(np.maximum(c.astype(np.float32), 1e-10)) for c in chans], \
        "non-negative SAR taken as linear power: 10·log10 to dB"


def prepare_array(
    data: np.ndarray,
    georef: Georef,
    nodata: float | None = None,
    band_names: list[str] | None = None,
    role: str = "optical",
    sensor: str | None = None,
    max_side: int = 2048,
    bands: list[int] | None = None,
) -> PreparedRaster:
    """Bands (B, H, W) of any dtype -> PreparedRaster (HxWx3 uint8 model view + validity + georefs).

    ``bands`` (0-based: three for optical, two for SAR) overrides the sensor defaults.
    """
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise RasterError("bad_shape", f"raster must be (bands, H, W), got shape {arr.shape}")
    count, h, w = arr.shape
    if h == 0 or w == 0 or count == 0:
        raise RasterError("empty_raster", f"raster is empty: {count} bands of {h}x{w} pixels")
    if min(h, w) < MIN_SIDE:
        raise RasterError("raster_too_small", f"raster is {h}x{w} pixels; at least {MIN_SIDE}x{MIN_SIDE} needed")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise RasterError("bad_dtype", f"raster dtype {arr.dtype} is not numeric")
    if max_side < MIN_SIDE:
        raise RasterError("bad_argument", f"max_side must be >= {MIN_SIDE}")
    names = [str(n) if n else f"band{i + 1}" for i, n in
             enumerate(list(band_names or []) + [None] * (count - len(band_names or [])))][:count]
    notes: list[str] = []
    is_complex = np.issubdtype(arr.dtype, np.complexfloating)
    if is_complex and role == "optical":
        role = "sar"
        notes.append("complex data treated as SAR")
    is_sar = role == "sar" or (sensor or "").lower() == "sar"
    if not is_sar and role == "optical" and sensor is None and _looks_like_db(arr, band_names):
        is_sar, role = True, "sar"
        notes.append("unnamed float bands that are mostly negative look like SAR backscatter in dB: treated as "
                     "SAR (give a sensor such as 'rgb' to force optical)")
    idx, alpha, label, why = choose_bands(count, band_names, arr.dtype, "sar" if is_sar else role, sensor)
    if label == "sar":
        is_sar = True
        if role == "optical":
            role = "sar"
    if bands is not None:
        need = 2 if is_sar else 3
        if len(bands) != need or any(not (0 <= b < count) for b in bands):
            raise RasterError("bad_bands", f"bands must be {need} indexes in 0..{count - 1}, got {list(bands)}")
        idx, why = list(bands), [f"bands {_label(list(bands), names)} chosen by the caller"]
    notes.extend(why)

    vh, vw = _view_shape(h, w, max_side)
    rows, cols = _decimate_index(h, vh), _decimate_index(w, vw)
    decimated = (vh, vw) != (h, w)

    def view(i: int) -> np.ndarray:
        b = arr[i]
        return b[np.ix_(rows, cols)] if decimated else b

    chans = [view(i) for i in idx]
    valid = np.ones((vh, vw), bool)
    for c in chans:
        if np.issubdtype(c.dtype, np.inexact):
            valid &= np.isfinite(c)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        valid &= ~np.logical_and.reduce([c == nodata for c in chans])
    if alpha is not None and alpha not in idx:
        valid &= view(alpha) != 0
        notes.append(f"band {alpha + 1} used as alpha (0 = invalid)")
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise RasterError("all_nodata", "raster has no valid pixels (all nodata, NaN or transparent)")
    if decimated:
        notes.append(f"model view {vh}x{vw} resampled (nearest) from {h}x{w}; masks return on {h}x{w}")

    if is_sar:
        db, how = _sar_db(chans, valid, arr.dtype)
        notes.append(how)
        db = [np.where(valid, c, 0.0).astype(np.float32) for c in db]
        db.append(((db[0] + db[1]) / 2.0).astype(np.float32))
        pixels, snotes = _stretch(db, valid, joint=False)
        notes.extend(snotes)
        label = "sar"
    elif arr.dtype == np.uint8 and _full_range(chans, valid):
        pixels = np.stack([np.where(valid, c, 0) for c in chans], axis=-1).astype(np.uint8)
        notes.append("8-bit bands used as they are (they already span the 8-bit range)")
    else:
        pixels, snotes = _stretch([c.astype(np.float32) for c in chans], valid, joint=True)
        notes.extend(snotes)
    if n_valid < valid.size:
        notes.append(f"{100.0 * n_valid / valid.size:.1f}% of pixels valid; percentages use valid pixels only")
    view_georef = georef.scaled(w / vw, h / vh) if decimated else georef
    return PreparedRaster(
        pixels=np.ascontiguousarray(pixels), valid=valid, georef=georef, shape=(h, w),
        view_georef=view_georef, band_names=names, role=role, notes=notes, bands_used=list(idx),
        sensor=label, valid_fraction=n_valid / valid.size,
    )


def mask_to_request_grid(mask_view: np.ndarray, prepared: PreparedRaster) -> np.ndarray:
    """Nearest upsampling of a model-view mask to the request's own grid (bool H x W)."""
    m = np.asarray(mask_view)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != prepared.view_shape:
        raise RasterError("shape_mismatch", f"mask {m.shape} is not on the model view grid {prepared.view_shape}")
    m = m.astype(bool) if m.dtype != bool else m
    h, w = prepared.shape
    if (h, w) == m.shape:
        return m.copy()
    rows = np.minimum((np.arange(h) * m.shape[0]) // h, m.shape[0] - 1)
    cols = np.minimum((np.arange(w) * m.shape[1]) // w, m.shape[1] - 1)
    return m[np.ix_(rows, cols)]


# --------------------------------------------------------------------------------------- reading
def _band_names(ds: Any) -> list[str]:
    out = []
    for i, (desc, ci) in enumerate(zip(ds.descriptions, ds.colorinterp)):
        if desc:
            out.append(desc)
        elif ci.name in ("red", "green", "blue", "alpha"):
            out.append(ci.name)
        else:
            out.append(f"band{i + 1}")
    return out


def _window_for_bounds(ds: Any, bounds: tuple[float, float, float, float]) -> Any:
    """Pixel window covering CRS ``bounds`` (left, bottom, right, top); works for rotated grids too."""
    from rasterio.windows import Window

    left, bottom, right, top = bounds
    if not (right > left and top > bottom):
        raise RasterError("bad_window", f"window bounds must have right > left and top > bottom: {bounds}")
    inv = ~ds.transform
    pts = [inv @ (x, y) for x in (left, right) for y in (bottom, top)]
    c0 = max(0, math.floor(min(p[0] for p in pts) + 1e-9))
    r0 = max(0, math.floor(min(p[1] for p in pts) + 1e-9))
    c1 = min(ds.width, math.ceil(max(p[0] for p in pts) - 1e-9))
    r1 = min(ds.height, math.ceil(max(p[1] for p in pts) - 1e-9))
    if c1 <= c0 or r1 <= r0:
        raise RasterError("empty_window", f"window {bounds} does not overlap the raster")
    return Window(c0, r0, c1 - c0, r1 - r0)


def read_raster(
    path: str,
    window_bounds: tuple[float, float, float, float] | None = None,
    max_side: int = 2048,
    bands: list[int] | None = None,
) -> tuple[np.ndarray, Georef, float | None, list[str]]:
    """Read (bands, H, W), Georef, nodata, band names; decimated by GDAL so big files stay cheap.

    The returned grid is the decimated one (its Georef says so), which becomes the request grid.
    ``bands`` are 0-based. GDAL's block cache is capped so a 10,000² file costs little memory.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    with rasterio.Env(GDAL_CACHEMAX=64 * 1024 * 1024, GDAL_NUM_THREADS="ALL_CPUS"):
        try:
            ds = rasterio.open(path)
        except RasterioIOError as exc:
            raise RasterError("bad_raster", f"cannot open raster {path}: {exc}") from None
        with ds:
            return _read_open(ds, path, window_bounds, max_side, bands)


def _read_open(ds: Any, path: str, window_bounds: tuple[float, float, float, float] | None, max_side: int,
               bands: list[int] | None) -> tuple[np.ndarray, Georef, float | None, list[str]]:
    from rasterio.enums import Resampling
    from rasterio.errors import RasterioIOError
    from rasterio.windows import Window

    if ds.count == 0 or ds.width == 0 or ds.height == 0:
        raise RasterError("empty_raster", f"{path} has no pixels")
    win = _window_for_bounds(ds, window_bounds) if window_bounds else Window(0, 0, ds.width, ds.height)
    idx = list(range(ds.count)) if bands is None else list(bands)
    if any(not (0 <= b < ds.count) for b in idx) or not idx:
        raise RasterError("bad_bands", f"bands must be 0-based indexes in 0..{ds.count - 1}, got {bands}")
    wh, ww = int(win.height), int(win.width)
    oh, ow = _view_shape(wh, ww, max_side)
    try:
        data = ds.read([b + 1 for b in idx], window=win, out_shape=(len(idx), oh, ow),
                       resampling=Resampling.nearest)
    except RasterioIOError as exc:
        raise RasterError("bad_raster", f"cannot read {path}: {exc}") from None
    georef = Georef.from_dataset(ds).shifted(win.col_off, win.row_off).scaled(ww / ow, wh / oh)
    names = _band_names(ds)
    return data, georef, ds.nodata, [names[b] for b in idx]


# ---------------------------------------------------------------------------------- sliding windows
@dataclass(frozen=True)
class TileWindow:
    """A tile of the request grid: rows [row_off, row_off+height), cols [col_off, col_off+width)."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.row_off, self.row_off + self.height), slice(self.col_off, self.col_off + self.width)


def _starts(n: int, tile: int, step: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, step))
    starts.append(n - tile)  # last tile flush with the edge, never past it
    return starts


def sliding_windows(shape: tuple[int, int], tile: int, overlap: int) -> list[TileWindow]:
    """Overlapping tiles covering ``shape`` (H, W); edge tiles are shifted inward, never padded."""
    h, w = shape
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise RasterError("bad_argument", f"need tile > overlap >= 0, got tile={tile}, overlap={overlap}")
    if h <= 0 or w <= 0:
        raise RasterError("empty_raster", f"cannot tile an empty grid {shape}")
    step = tile - overlap
    return [TileWindow(r, c, min(tile, h), min(tile, w))
            for r in _starts(h, tile, step) for c in _starts(w, tile, step)]


def window_georef(georef: Georef, window: TileWindow) -> Georef:
    return georef.shifted(window.col_off, window.row_off)


def stitch_masks(shape: tuple[int, int], windows: list[TileWindow], masks: list[np.ndarray],
                 threshold: float = 0.5) -> np.ndarray:
    """Blend per-tile masks (bool or probabilities) into one bool mask of ``shape``.

    Weights fall off towards each tile's edge, where a model sees the least context, so in an overlap
    the tile that has the pixel nearer its centre wins.
    """
    if len(windows) != len(masks):
        raise RasterError("bad_argument", f"{len(windows)} windows but {len(masks)} masks")
    acc = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for win, m in zip(windows, masks):
        m = np.asarray(m, dtype=np.float32)
        if m.shape != (win.height, win.width):
            raise RasterError("shape_mismatch", f"tile mask {m.shape} does not match window {win}")
        ry = np.minimum(np.arange(win.height) + 1, win.height - np.arange(win.height)).astype(np.float32)
        rx = np.minimum(np.arange(win.width) + 1, win.width - np.arange(win.width)).astype(np.float32)
        weight = np.minimum.outer(ry, rx)
        sl = win.slices
        acc[sl] += weight * m
        wsum[sl] += weight
    covered = wsum > 0
    out = np.zeros(shape, bool)
    out[covered] = acc[covered] / wsum[covered] >= threshold
    return out
