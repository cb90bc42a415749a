"""Honest augmentation: every derived scene keeps a georeferencing that is true for its pixels.

* flips / rot90: the affine is composed with the pixel permutation (a mirrored or rotated grid over the
  same ground), so areas and distances are unchanged and footprints stay inside the parent's;
* crops: a shifted affine; 2x downsampling: a scaled affine (coarser pixels, same ground);
* radiometric jitter: gain, gamma, haze and noise on optical pixels, a dB offset on SAR; labels untouched;
* object removal: labelled objects are erased from a real tile and the hole is filled from the
  surrounding ground (diffusion fill + texture copied from a building-free donor patch) to make
  before/after pairs and series whose changes are known exactly.
"""

from __future__ import annotations

import affine
import numpy as np
from scipy import ndimage

from model.data.scene import Frame, Scene
from worker.measure import CONNECTIVITY4, Georef


def _derive(scene: Scene, suffix: str, frames: list[Frame], valid: np.ndarray, georef: Georef,
            origin: str = "augmented", kind: str | None = None) -> Scene:
    return Scene(
        id=f"{scene.id}~{suffix}", source=scene.source, block=scene.block, georef=georef, frames=frames,
        valid=valid, vocabulary=scene.vocabulary, countable=scene.countable, kind=kind or scene.kind,
        origin=origin, label_status=scene.label_status, sensor=scene.sensor, gsd_m=scene.gsd_m,
        parent=scene.parent or scene.id, split=scene.split, notes=list(scene.notes),
    )


def _map_frame(f: Frame, fn) -> Frame:
    raw = None if f.raw is None else np.stack([fn(b) for b in f.raw])
    return Frame(np.ascontiguousarray(fn(f.pixels)), f.role, {k: np.ascontiguousarray(fn(v)) for k, v in
                                                              f.labels.items()}, raw, f.band_names, f.date)


def flip(scene: Scene, axis: str) -> Scene:
    """Mirror left-right (``axis="h"``) or top-bottom (``"v"``); the affine mirrors with the pixels."""
    h, w = scene.shape
    if axis == "h":
        fn, a = (lambda x: x[:, ::-1]), affine.Affine(-1, 0, w, 0, 1, 0)
    elif axis == "v":
        fn, a = (lambda x: x[::-1]), affine.Affine(1, 0, 0, 0, -1, h)
    else:
        raise ValueError(f"flip axis must be 'h' or 'v', got {axis!r}")
    g = Georef(scene.georef.transform @ a, scene.georef.crs_wkt)
    return _derive(scene, f"flip{axis}", [_map_frame(f, fn) for f in scene.frames],
                   np.ascontiguousarray(fn(scene.valid)), g)


def rot90(scene: Scene, k: int = 1) -> Scene:
    """Rotate by ``k`` quarter turns counter-clockwise (numpy ``rot90``), composing the affine to match."""
    k %= 4
    if k == 0:
        return scene
    out = scene
    for _ in range(k):
        w = out.shape[1]
        # new pixel (x', y') comes from old pixel (x = w - y', y = x')
        a = affine.Affine(0, -1, w, 1, 0, 0)
        g = Georef(out.georef.transform @ a, out.georef.crs_wkt)
        out = _derive(out, "r", [_map_frame(f, np.rot90) for f in out.frames],
                      np.ascontiguousarray(np.rot90(out.valid)), g)
    out.id = f"{scene.id}~rot{90 * k}"
    out.parent = scene.parent or scene.id
    return out


def crop(scene: Scene, r0: int, c0: int, h: int, w: int) -> Scene:
    H, W = scene.shape
    if r0 < 0 or c0 < 0 or r0 + h > H or c0 + w > W or h < 8 or w < 8:
        raise ValueError(f"crop {r0},{c0},{h}x{w} outside the {H}x{W} scene")
    fn = (lambda x: x[r0:r0 + h, c0:c0 + w].copy())
    return _derive(scene, f"crop{r0}_{c0}_{h}x{w}", [_map_frame(f, fn) for f in scene.frames],
                   scene.valid[r0:r0 + h, c0:c0 + w].copy(), scene.georef.shifted(c0, r0))


def downsample2(scene: Scene) -> Scene:
    """Half resolution (2x2 mean for pixels, majority for labels): the same ground at coarser pixels."""
    H, W = scene.shape
    h, w = H // 2, W // 2

    def pool(x: np.ndarray) -> np.ndarray:
        x = x[: 2 * h, : 2 * w]
        if x.dtype == bool:  # majority; 2-of-4 ties alternate (checkerboard) so areas stay unbiased
            s = x[0::2, 0::2].astype(np.uint8) + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
            checker = (np.arange(h)[:, None] + np.arange(w)[None]) % 2 == 0
            return (s >= 3) | ((s == 2) & checker)
        f = x.astype(np.float32)
        m = (f[0::2, 0::2] + f[1::2, 0::2] + f[0::2, 1::2] + f[1::2, 1::2]) / 4.0
        return (m + 0.5).astype(np.uint8) if x.dtype == np.uint8 else m.astype(x.dtype)

    valid = scene.valid[: 2 * h, : 2 * w]
    valid = valid[0::2, 0::2] & valid[1::2, 0::2] & valid[0::2, 1::2] & valid[1::2, 1::2]
    out = _derive(scene, "half", [_map_frame(f, pool) for f in scene.frames], valid, scene.georef.scaled(2, 2))
    out.gsd_m = scene.gsd_m * 2
    return out


def jitter_pixels(pixels: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Radiometric jitter of an 8-bit RGB view: per-channel gain, gamma, haze and sensor noise."""
    x = pixels.astype(np.float32) / 255.0
    gain = 1.0 + strength * rng.uniform(-0.12, 0.12, size=3)
    gamma = float(np.exp(strength * rng.uniform(-0.25, 0.25)))
    haze = strength * rng.uniform(0.0, 0.08)
    x = np.clip(x * gain, 0, 1) ** gamma
    x = x * (1 - haze) + haze * 0.85
    x = x + strength * rng.normal(0.0, 0.012, size=x.shape)
    return (np.clip(x, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def jitter(scene: Scene, rng: np.random.Generator, strength: float = 1.0) -> Scene:
    frames = []
    for f in scene.frames:
        g = f.copy()
        if f.raw is not None:
            g.raw = (f.raw + np.float32(strength * rng.uniform(-1.5, 1.5))).astype(np.float32)
            from worker.raster import prepare_array

            g.pixels = prepare_array(g.raw, scene.georef, band_names=g.band_names, role="sar",
                                     max_side=1 << 16).pixels
        else:
            g.pixels = jitter_pixels(f.pixels, rng, strength)
        frames.append(g)
    return _derive(scene, "jit", frames, scene.valid.copy(), scene.georef)


# ------------------------------------------------------------------------------------- inpainting
def inpaint(pixels: np.ndarray, hole: np.ndarray, avoid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fill ``hole`` from the surrounding ground: nearest-ground fill, diffusion, then ground texture.

    Only ground pixels (not ``avoid``, the other objects) feed the fill, so roofs are never smeared into
    it. The texture is the high-frequency residual of a donor patch (the hole shifted by a random offset
    onto ground), or, when the tile has no free patch that large, noise with the ground's own spread.
    """
    if not hole.any():
        return pixels.copy()
    img = pixels.astype(np.float32)
    ground = ~(hole | ndimage.binary_dilation(avoid, iterations=1))
    if not ground.any():
        ground = ~hole
    idx = ndimage.distance_transform_edt(~ground, return_distances=False, return_indices=True)
    filled = img.copy()
    filled[hole] = img[idx[0], idx[1]][hole]
    for sigma in (8.0, 4.0, 2.0, 1.0):
        for _ in range(3):
            blurred = ndimage.gaussian_filter(filled, sigma=(sigma, sigma, 0))
            filled[hole] = blurred[hole]
    residual = img - ndimage.gaussian_filter(img, sigma=(2.0, 2.0, 0))
    h, w = hole.shape
    rows, cols = np.nonzero(hole)
    bad = ~ground
    for _ in range(80):
        dy, dx = int(rng.integers(-h // 2, h // 2 + 1)), int(rng.integers(-w // 2, w // 2 + 1))
        r, c = rows + dy, cols + dx
        if r.min() < 0 or c.min() < 0 or r.max() >= h or c.max() >= w or bad[r, c].any():
            continue
        filled[rows, cols] += residual[r, c]
        break
    else:
        spread = float(residual[ground].std()) if ground.sum() > 16 else 6.0
        noise = ndimage.gaussian_filter(rng.normal(size=(h, w)).astype(np.float32), sigma=0.8)
        noise *= 0.6 * spread / (noise.std() + 1e-6)  # luminance grain, as on bare ground
        filled[hole] += noise[hole][:, None]
    return (np.clip(filled, 0, 255) + 0.5).astype(np.uint8)


def objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected objects: what an edit removes and what "the largest object" means (counts are 8-connected)."""
    lab, n = ndimage.label(mask, structure=CONNECTIVITY4)
    return lab, int(n)


def remove_objects(frame: Frame, cls: str, ids: list[int], lab: np.ndarray, rng: np.random.Generator) -> Frame:
    """A copy of ``frame`` with objects ``ids`` (labels in ``lab``) erased from pixels and label."""
    gone = np.isin(lab, ids)
    keep = frame.labels[cls] & ~gone
    hole = ndimage.binary_dilation(gone, iterations=2) & ~keep
    out = frame.copy()
    out.pixels = inpaint(frame.pixels, hole, keep, rng)
    out.labels[cls] = keep
    return out


def change_pair(scene: Scene, cls: str, rng: np.random.Generator, destroyed: bool = True,
                fraction: tuple[float, float] = (0.2, 0.6)) -> Scene | None:
    """Before/after pair from one real tile: ``destroyed`` erases objects in t1, else they appear in t1."""
    base = scene.frames[0]
    lab, n = objects(base.labels[cls])
    if n < 3:
        return None
    k = max(1, round(n * rng.uniform(*fraction)))
    ids = [int(i) for i in rng.choice(np.arange(1, n + 1), size=k, replace=False)]
    edited = remove_objects(base, cls, ids, lab, rng)
    other = base.copy()
    other.pixels = jitter_pixels(base.pixels, rng, 0.5)  # a second date never looks identical
    t0, t1 = (other, edited) if destroyed else (edited, other)
    t0.role, t1.role = "t0", "t1"
    out = _derive(scene, f"{'destroy' if destroyed else 'build'}{k}", [t0, t1], scene.valid.copy(), scene.georef,
                  origin="edited", kind="change")
    out.notes.append(f"{k} of {n} {cls} objects {'removed in t1' if destroyed else 'absent in t0'} (inpainted)")
    return out


def series(scene: Scene, cls: str, rng: np.random.Generator, n_frames: int = 3) -> Scene | None:
    """Construction series t0..t{n-1}: objects appear in stages (each stage erased from earlier dates)."""
    base = scene.frames[0]
    lab, n = objects(base.labels[cls])
    if n < n_frames:
        return None
    ids = rng.permutation(np.arange(1, n + 1))
    cuts = np.sort(rng.choice(np.arange(1, n), size=n_frames - 1, replace=False))
    stages = np.split(ids, cuts)  # stage s appears at time s (stage 0 already there at t0)
    frames: list[Frame] = []
    for t in range(n_frames):
        missing = [int(i) for st in stages[t + 1:] for i in st]
        f = remove_objects(base, cls, missing, lab, rng) if missing else base.copy()
        if t < n_frames - 1:
            f.pixels = jitter_pixels(f.pixels, rng, 0.4)
        f.role = f"t{t}"
        frames.append(f)
    out = _derive(scene, f"series{n_frames}", frames, scene.valid.copy(), scene.georef, origin="edited",
                  kind="series")
    out.notes.append(f"{cls} objects appear in {n_frames} stages (inpainted before they appear)")
    return out
