"""Which visual tokens a mask selects, λ sampling, and optical/SAR modality choice.

Token indices follow the prompt's visual-token order: ``tile * 256 + row * 16 + col`` with grid tiles in
row-major order (the thumbnail's tokens are never selected), plus ``image_offset`` for the image's block.

Two rule sets:
* ``official_*``: bit-exact with the released inference code (mask -> PIL NEAREST to the tiling size ->
  PIL NEAREST to the token grid; more than λ -> ``_spatial_uniform_sample`` on a 3x3 grid for λ=8, first
  wins ties; nothing -> [0]).
* ``native_*``: the paper's rule (a token is selected when the mask covers more than 50% of its cell, by
  exact area; more than λ -> one token per cell of a ⌈√λ⌉ x ⌈√λ⌉ grid over the selection's bounding box,
  the one nearest the cell centre).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .preprocess import TileLayout


# ---- helpers -----------------------------------------------------------------------------------------------
def _nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray((mask.astype(np.uint8) * 255), mode="L")
    return np.asarray(img.resize((width, height), Image.NEAREST)) > 127


def _grid_to_index(row: int, col: int, side: int, cols: int) -> int:
    tile = (row // side) * cols + (col // side)
    return tile * side * side + (row % side) * side + (col % side)


def index_to_grid(index: int, side: int, cols: int) -> tuple[int, int]:
    tile, local = divmod(index, side * side)
    return (tile // cols) * side + local // side, (tile % cols) * side + local % side


def _tile_order(grid: np.ndarray, side: int, cols: int, rows: int) -> list[int]:
    """Selected cells of a token grid as indices, tiles in order then row-major inside each tile."""
    out = []
    for tile in range(cols * rows):
        tr, tc = divmod(tile, cols)
        block = grid[tr * side:(tr + 1) * side, tc * side:(tc + 1) * side]
        for r, c in zip(*np.nonzero(block)):
            out.append(tile * side * side + int(r) * side + int(c))
    return out


# ---- official (compatibility) -----------------------------------------------------------------------------
def official_spatial_uniform_sample(indices: list[int], grid: np.ndarray, side: int, cols: int,
                                    target: int) -> list[int]:
    """The release's ``_spatial_uniform_sample``: grid over the mask bbox, nearest to centre, first wins."""
    positions = [(*index_to_grid(i, side, cols), i) for i in indices]
    rows_, cols_ = np.where(grid)
    if len(rows_) == 0:
        return indices[:target]
    r0, r1, c0, c1 = rows_.min(), rows_.max(), cols_.min(), cols_.max()
    g = int(np.ceil(np.sqrt(target)))
    row_step = max(1, (r1 - r0 + 1) / g)
    col_step = max(1, (c1 - c0 + 1) / g)
    picked: list[int] = []
    for i in range(g):
        for j in range(g):
            rmin, rmax = r0 + i * row_step, r0 + (i + 1) * row_step
            cmin, cmax = c0 + j * col_step, c0 + (j + 1) * col_step
            cell = [p for p in positions if rmin <= p[0] < rmax and cmin <= p[1] < cmax]
            if cell:
                cr, cc = (rmin + rmax) / 2, (cmin + cmax) / 2
                picked.append(min(cell, key=lambda p: (p[0] - cr) ** 2 + (p[1] - cc) ** 2)[2])
            if len(picked) >= target:
                break
        if len(picked) >= target:
            break
    return picked[:target]


def official_tiled(mask: np.ndarray, layout: TileLayout, side: int = 16, max_tokens: int = 8) -> list[int]:
    """``_get_visual_tokens_from_mask_accurate`` for a dynamically tiled single image."""
    cols, rows = layout.cols, layout.rows
    resized = _nearest(mask, layout.tile * cols, layout.tile * rows)
    grid = _nearest(resized, side * cols, side * rows)
    selected = _tile_order(grid, side, cols, rows)
    if len(selected) > max_tokens:
        selected = official_spatial_uniform_sample(selected, grid, side, cols, max_tokens)
    return selected or [0]


def official_single_tile(mask: np.ndarray, tile: int = 448, side: int = 16, max_tokens: int = 8) -> list[int]:
    """``_get_visual_tokens_from_mask_multi_simple``: one 448 tile per image (series / pairs)."""
    resized = _nearest(mask, tile, tile)
    grid = _nearest(resized, side, side)
    selected = [int(r) * side + int(c) for r, c in zip(*np.nonzero(grid))]
    if len(selected) > max_tokens:
        selected = official_spatial_uniform_sample(selected, grid, side, 1, max_tokens)
    return selected or [0]


# ---- native (paper) ------------------------------------------------------------------------------------------
def _overlap_matrix(n_cells: int, n_pixels: int) -> np.ndarray:
    """[n_cells, n_pixels] overlap length of each pixel with each cell (cells tile [0, n_pixels))."""
    edges = np.linspace(0.0, n_pixels, n_cells + 1)
    lo = np.maximum(edges[:-1, None], np.arange(n_pixels)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(n_pixels)[None, :] + 1)
    return np.clip(hi - lo, 0.0, None)


def cell_coverage(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Exact fraction of each token cell covered by the mask (the image is stretched onto the grid)."""
    h, w = mask.shape
    wy = _overlap_matrix(grid_h, h)
    wx = _overlap_matrix(grid_w, w)
    covered = wy @ mask.astype(np.float64) @ wx.T
    area = wy.sum(axis=1)[:, None] * wx.sum(axis=1)[None, :]
    return covered / area


def uniform_sample(indices: list[int], side: int, cols: int, lam: int) -> list[int]:
    """At most λ tokens, one per cell of a ⌈√λ⌉ x ⌈√λ⌉ grid over the selection's bounding box.

    In each cell the token whose centre is nearest the cell centre wins (lowest index on ties). When more
    cells are occupied than λ, occupied cells are thinned evenly in raster order. Returns indices sorted.
    """
    if len(indices) <= lam:
        return sorted(indices)
    pos = np.array([index_to_grid(i, side, cols) for i in indices], dtype=np.float64)
    centres = pos + 0.5
    r0, c0 = pos.min(axis=0)
    r1, c1 = pos.max(axis=0) + 1
    g = math.ceil(math.sqrt(lam))
    ch, cw = (r1 - r0) / g, (c1 - c0) / g
    cell_r = np.minimum(((centres[:, 0] - r0) / ch).astype(int), g - 1)
    cell_c = np.minimum(((centres[:, 1] - c0) / cw).astype(int), g - 1)
    best: dict[tuple[int, int], tuple[float, int]] = {}
    for k, idx in enumerate(indices):
        cell = (int(cell_r[k]), int(cell_c[k]))
        cr, cc = r0 + (cell[0] + 0.5) * ch, c0 + (cell[1] + 0.5) * cw
        d = (centres[k, 0] - cr) ** 2 + (centres[k, 1] - cc) ** 2
        if cell not in best or (d, idx) < best[cell]:
            best[cell] = (d, idx)
    picks = [best[c][1] for c in sorted(best)]
    if len(picks) > lam:
        keep = np.unique(np.linspace(0, len(picks) - 1, lam).round().astype(int))
        picks = [picks[k] for k in keep]
    return sorted(picks)


def native_tiled(mask: np.ndarray, layout: TileLayout, side: int = 16, lam: int = 128) -> list[int]:
    """Tokens whose cell the mask covers by more than 50%, then λ sampling (empty mask -> [])."""
    cov = cell_coverage(mask, side * layout.rows, side * layout.cols)
    selected = _tile_order(cov > 0.5, side, layout.cols, layout.rows)
    return uniform_sample(selected, side, layout.cols, lam)


# ---- modality choice (optical + SAR) ---------------------------------------------------------------------------
def choose_modality(beta_optical: np.ndarray, beta_sar: np.ndarray, indices: list[int]) -> list[str]:
    """Paper Eq. 5: per selected position, optical if its relevance is strictly higher, else SAR."""
    return ["optical" if beta_optical[i] > beta_sar[i] else "sar" for i in indices]


def box_tokens(indices: list[int], side: int, cols: int, rows: int) -> list[int]:
    """All tokens of the grid tiles inside the bounding box of ``indices`` (injection mode "box")."""
    if not indices:
        return []
    pos = np.array([index_to_grid(i, side, cols) for i in indices])
    (r0, c0), (r1, c1) = pos.min(axis=0), pos.max(axis=0)
    return sorted(_grid_to_index(r, c, side, cols) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)
                  if r < side * rows and c < side * cols)
