"""Small RGB previews of a window and mask thumbnails for the dock (computed in the ask thread).

QImage (unlike QPixmap) may be built outside the GUI thread, so the UI only has to show them.
"""

from __future__ import annotations

import numpy as np
from qgis.PyQt.QtGui import QColor, QImage

from .rasters import RasterWindow


def _stretch(band: np.ndarray) -> np.ndarray:
    values = band[np.isfinite(band)]
    if values.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(values, (2, 98))
    if hi <= lo:
        hi = lo + 1
    out = np.clip((np.nan_to_num(band, nan=lo) - lo) / (hi - lo) * 255, 0, 255)
    return out.astype(np.uint8)


def _rgb_bands(count: int, names: list[str]) -> list[int]:
    lowered = [n.lower() for n in names]
    for trio in (("red", "green", "blue"), ("b4", "b3", "b2"), ("b04", "b03", "b02")):
        if all(any(t in n for n in lowered) for t in trio):
            return [next(i for i, n in enumerate(lowered) if t in n) for t in trio]
    if count >= 13:
        return [3, 2, 1]  # Sentinel-2 B1..B12 order
    return [0, 1, 2] if count >= 3 else [0, 0, 0]


def rgb_preview(window: RasterWindow, max_side: int = 192) -> np.ndarray:
    """A display-stretched (rows, cols, 3) uint8 preview at most `max_side` on its longest side."""
    rows, cols = window.shape
    step = max(1, int(np.ceil(max(rows, cols) / max_side)))
    data = window.data[:, ::step, ::step]
    if np.iscomplexobj(data):
        data = 10 * np.log10(np.abs(data) ** 2 + 1e-10)
    data = data.astype(np.float32)
    for i, v in enumerate(window.nodata):
        if v is not None and not np.isnan(v):
            data[i][data[i] == v] = np.nan
    idx = _rgb_bands(data.shape[0], window.band_names)
    if window.role == "sar" or data.shape[0] == 2:
        idx = [0, min(1, data.shape[0] - 1), 0]
    return np.ascontiguousarray(np.stack([_stretch(data[i]) for i in idx], axis=-1))


def to_qimage(rgb: np.ndarray) -> QImage:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    return QImage(rgb.data, w, h, 3 * w, QImage.Format_RGB888).copy()  # copy: own the buffer


def mask_thumbnail(preview: np.ndarray, mask: np.ndarray, color: QColor, alpha: float = 0.55) -> QImage:
    """The preview with the mask blended in `color` and outlined, on the preview's grid."""
    ph, pw = preview.shape[:2]
    rows = np.minimum((np.arange(ph) * mask.shape[0]) // ph, mask.shape[0] - 1)
    cols = np.minimum((np.arange(pw) * mask.shape[1]) // pw, mask.shape[1] - 1)
    m = mask[np.ix_(rows, cols)]
    out = preview.astype(np.float32)
    rgb = np.array([color.red(), color.green(), color.blue()], np.float32)
    out[m] = out[m] * (1 - alpha) + rgb * alpha
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = rgb
    return to_qimage(out.astype(np.uint8))
