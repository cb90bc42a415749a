"""Image preprocessing in numpy/PIL only (no torchvision), bit-exact with the official pipeline.

* InternVL dynamic tiling: pick (cols, rows) by aspect ratio (official tie rule), PIL BICUBIC resize to
  448*cols x 448*rows, row-major 448 crops, plus a 448 thumbnail only when there is more than one tile.
* One 448 tile per image for series / pairs (PIL BICUBIC, aspect ignored), as the official multi path.
* ToTensor (/255 in float32) then ImageNet mean/std in float32.
* SAM-2: PIL BICUBIC to 1024x1024 (aspect ignored), /255, then mean/std that the official code builds in
  bfloat16, i.e. the constants below (bf16-rounded ImageNet values).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: ImageNet constants rounded to bfloat16, as ``preprocess_image(dtype=torch.bfloat16)`` uses them.
SAM2_MEAN = np.array([0.484375, 0.455078125, 0.40625], dtype=np.float32)
SAM2_STD = np.array([0.228515625, 0.2236328125, 0.224609375], dtype=np.float32)
SAM2_SIZE = 1024


@dataclass(frozen=True)
class TileLayout:
    """How one image was tiled: ``cols`` x ``rows`` tiles (+ thumbnail) of ``tile`` pixels."""

    cols: int
    rows: int
    tile: int
    thumbnail: bool
    orig_hw: tuple[int, int]

    @property
    def n_grid_tiles(self) -> int:
        return self.cols * self.rows

    @property
    def n_tiles(self) -> int:
        return self.n_grid_tiles + (1 if self.thumbnail else 0)


def check_image(pixels: np.ndarray, what: str = "image") -> np.ndarray:
    """Validate an HxWx3 uint8 array (the worker's contract) and return it C-contiguous."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, got {type(pixels).__name__}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"{what}: expected an HxWx3 array, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8 (stretched raster), got {pixels.dtype}")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"{what}: empty image {pixels.shape}")
    return np.ascontiguousarray(pixels)


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_aspect_ratio(width: int, height: int, min_num: int = 1, max_num: int = 12,
                         tile: int = 448) -> tuple[int, int]:
    """(cols, rows) with the closest aspect ratio; on ties the later candidate wins if the image is big enough.

    Candidates come in the official order (a set sorted by area; ties keep the set's iteration order, which
    is deterministic for small int tuples), so the tie rule picks the same grid as the release.
    """
    aspect = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios(min_num, max_num):
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


def dynamic_tiles(pixels: np.ndarray, min_num: int = 1, max_num: int = 12, tile: int = 448,
                  use_thumbnail: bool = True) -> tuple[np.ndarray, TileLayout]:
    """InternVL dynamic tiling -> (uint8 tiles [N, tile, tile, 3], layout)."""
    pixels = check_image(pixels)
    h, w = pixels.shape[:2]
    cols, rows = closest_aspect_ratio(w, h, min_num, max_num, tile)
    img = Image.fromarray(pixels, mode="RGB")
    resized = img.resize((tile * cols, tile * rows), Image.BICUBIC)
    tiles = []
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        tiles.append(np.asarray(resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))))
    thumb = use_thumbnail and len(tiles) != 1
    if thumb:
        tiles.append(np.asarray(img.resize((tile, tile), Image.BICUBIC)))
    return np.stack(tiles), TileLayout(cols, rows, tile, thumb, (h, w))


def single_tile(pixels: np.ndarray, tile: int = 448) -> tuple[np.ndarray, TileLayout]:
    """One tile per image (series / pairs): stretch to tile x tile."""
    pixels = check_image(pixels)
    h, w = pixels.shape[:2]
    img = Image.fromarray(pixels, mode="RGB")
    out = np.asarray(img.resize((tile, tile), Image.BICUBIC))[None]
    return out, TileLayout(1, 1, tile, False, (h, w))


def tile_images(cfg, pixels: list[np.ndarray], kind: str) -> tuple[list[np.ndarray], list[TileLayout]]:
    """The ViT tiles of each image, as the model sees them: a single image (and an optical+SAR pair in native
    mode) is dynamically tiled; series, and pairs of the official checkpoint, get one tile per image.
    ``cfg`` is a TerraScopeConfig; inference and training both call this so they cannot drift apart."""
    tiles, layouts = [], []
    for p in pixels:
        if kind == "single" or (kind == "pair" and cfg.compat == "native"):
            t, lay = dynamic_tiles(p, cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.vision.image_size,
                                   cfg.use_thumbnail)
        else:
            t, lay = single_tile(p, cfg.vision.image_size)
        tiles.append(t)
        layouts.append(lay)
    return tiles, layouts


def normalize_tiles(tiles: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float32 [N,3,H,W] with ImageNet normalisation (ToTensor + Normalize)."""
    x = tiles.astype(np.float32) / np.float32(255)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def sam2_resize(pixels: np.ndarray, size: int = SAM2_SIZE) -> np.ndarray:
    pixels = check_image(pixels)
    return np.asarray(Image.fromarray(pixels, mode="RGB").resize((size, size), Image.BICUBIC))


def sam2_pixels(pixels: np.ndarray, size: int = SAM2_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> float32 [3, size, size] SAM-2 input."""
    x = sam2_resize(pixels, size).astype(np.float32) / np.float32(255)
    x = (x - SAM2_MEAN) / SAM2_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_to(pixels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Stretch an image to (H, W) with PIL BICUBIC (used to align a SAR image on its optical pair)."""
    pixels = check_image(pixels)
    if pixels.shape[:2] == tuple(hw):
        return pixels
    return np.asarray(Image.fromarray(pixels, mode="RGB").resize((hw[1], hw[0]), Image.BICUBIC))
