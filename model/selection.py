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

Every helper here is vectorised numpy: at batch 32 the release's per-cell Python loops cost hundreds of ms
per [SEG] event. The pure-Python originals stay at the end of this module (``*_reference``) as the
specification that the property tests (tests/model/test_selection.py) and ``bench/selection.py`` compare
against: same picks, same order, same tie rules, same fallbacks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .preprocess import TileLayout

#: Relative slack for "this distance may tie the cell's minimum". The references square with ``x ** 2``
#: (libm ``pow``, not always correctly rounded) where numpy squares with ``x * x``; the two differ by at most
#: a few ulps, far inside this slack. Candidates inside it are re-scored with the reference's own scalar
#: expression, so near-ties resolve exactly as the reference resolves them.
_TIE_SLACK = 1e-9


# ---- helpers -----------------------------------------------------------------------------------------------
def _nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL's NEAREST resize of a mask (what the release does), as a gather through ``_nearest_index``."""
    if mask.dtype == np.bool_ and mask.shape == (height, width):
        return mask.copy()  # PIL's resize to the same size is a copy
    h, w = mask.shape
    return np.asarray(mask, dtype=bool)[np.ix_(_nearest_index(h, height), _nearest_index(w, width))]


@functools.lru_cache(maxsize=256)
def _nearest_index(n_src: int, n_dst: int) -> np.ndarray:
    """Source index of each of ``n_dst`` outputs in PIL's NEAREST resize of an axis of ``n_src`` pixels.

    Why: converting a 896 x 896 mask to a PIL image and resizing it took ~0.4 ms a [SEG], 26 ms of idle GPU
    for a batch of 32. PIL computes NEAREST source coordinates per axis (an affine map without shear), so
    the map is read off PIL itself, resizing an image of pixel indices, and reused as a gather.
    """
    src = Image.fromarray(np.arange(n_src, dtype=np.int32)[None, :], mode="I")
    return np.asarray(src.resize((n_dst, 1), Image.NEAREST), dtype=np.int64)[0]


def _nearest_pil(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """``_nearest`` through a PIL image, as the release does it (the specification the tests compare with)."""
    img = Image.fromarray((mask.astype(np.uint8) * 255), mode="L")
    return np.asarray(img.resize((width, height), Image.NEAREST)) > 127


def _grid_to_index(row, col, side: int, cols: int):
    """Grid (row, col) -> token index; scalars or integer arrays (floor division, like Python's)."""
    tile = (row // side) * cols + (col // side)
    return tile * side * side + (row % side) * side + (col % side)


def index_to_grid(index: int, side: int, cols: int) -> tuple[int, int]:
    tile, local = divmod(index, side * side)
    return (tile // cols) * side + local // side, (tile % cols) * side + local % side


def indices_to_grid(indices: Sequence[int] | np.ndarray, side: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """``index_to_grid`` of many indices at once: (rows, cols) int64 arrays."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    tile, local = np.divmod(idx, side * side)
    return (tile // cols) * side + local // side, (tile % cols) * side + local % side


def _tile_order(grid: np.ndarray, side: int, cols: int, rows: int) -> list[int]:
    """Selected cells of a token grid as indices, tiles in order then row-major inside each tile.

    That order is ascending token index, so it is one ``nonzero`` and one sort (cells outside the
    ``rows`` x ``cols`` tiles are ignored, as the per-tile slicing of the reference ignores them).
    """
    r, c = np.nonzero(np.asarray(grid)[: rows * side, : cols * side])
    return np.sort(_grid_to_index(r, c, side, cols)).tolist()


def _near_minimum(cell: np.ndarray, d: np.ndarray, n_cells: int) -> list[tuple[int, np.ndarray]]:
    """Per occupied cell (ascending cell id): the positions whose distance may tie the cell's minimum.

    Positions stay in their original order inside a cell, so "first wins" rules still see them in order.
    """
    dmin = np.full(n_cells, np.inf)
    np.minimum.at(dmin, cell, d)
    cand = np.nonzero(d <= dmin[cell] * (1.0 + _TIE_SLACK))[0]
    cand_cell = cell[cand]
    order = cand[np.argsort(cand_cell, kind="stable")]
    counts = np.bincount(cand_cell, minlength=n_cells)
    occupied = np.nonzero(counts)[0]
    ends = np.cumsum(counts)[occupied]
    return [(int(k), order[e - counts[k]:e]) for k, e in zip(occupied, ends)]


# ---- official (compatibility) -----------------------------------------------------------------------------
def spatial_uniform_sample(indices: Sequence[int], grid: np.ndarray, side: int, cols: int,
                           target: int) -> list[int]:
    """The release's ``_spatial_uniform_sample``, vectorised: same picks in the same order.

    A ⌈√target⌉² grid over the bounding box of ``grid`` (steps of at least one cell, float edges
    ``r0 + i * step`` as the release computes them); in raster order, each occupied cell gives the position
    nearest its centre (the first in ``indices`` order on ties) until ``target`` picks. An empty ``grid``
    gives ``indices[:target]``. Equality with ``official_spatial_uniform_sample`` (the release's loop, kept
    below as the reference) is a property test.
    """
    rows_, cols_ = np.where(grid)
    if len(rows_) == 0:
        return indices[:target]
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    r0, r1, c0, c1 = rows_.min(), rows_.max(), cols_.min(), cols_.max()
    g = int(np.ceil(np.sqrt(target)))
    if g == 0 or len(indices) == 0:
        return []
    row_step = max(1, (r1 - r0 + 1) / g)
    col_step = max(1, (c1 - c0 + 1) / g)
    edges_r = r0 + np.arange(g + 1) * row_step  # == the reference's rmin/rmax, value for value
    edges_c = c0 + np.arange(g + 1) * col_step
    pr, pc = indices_to_grid(indices, side, cols)
    ci = np.searchsorted(edges_r, pr, side="right") - 1  # rmin <= r < rmax
    cj = np.searchsorted(edges_c, pc, side="right") - 1
    inside = np.nonzero((ci >= 0) & (ci < g) & (cj >= 0) & (cj < g))[0]
    if len(inside) == 0:
        return []
    ci, cj, pr, pc = ci[inside], cj[inside], pr[inside], pc[inside]
    cr = (edges_r[:-1] + edges_r[1:]) / 2
    cc = (edges_c[:-1] + edges_c[1:]) / 2
    dr, dc = pr - cr[ci], pc - cc[cj]
    d = dr * dr + dc * dc
    cell = ci * g + cj
    picked: list[int] = []
    for k, members in _near_minimum(cell, d, g * g)[:target]:  # occupied cells in raster order
        best = int(members[0])
        if len(members) > 1:  # possible tie: score as the reference does, first minimum wins
            i, j = divmod(k, g)
            rc, ccen = (edges_r[i] + edges_r[i + 1]) / 2, (edges_c[j] + edges_c[j + 1]) / 2
            best = min((int(m) for m in members),
                       key=lambda m: (int(pr[m]) - rc) ** 2 + (int(pc[m]) - ccen) ** 2)
        picked.append(indices[int(inside[best])])
    return picked


def official_tiled(mask: np.ndarray, layout: TileLayout, side: int = 16, max_tokens: int = 8) -> list[int]:
    """``_get_visual_tokens_from_mask_accurate`` for a dynamically tiled single image."""
    cols, rows = layout.cols, layout.rows
    resized = _nearest(mask, layout.tile * cols, layout.tile * rows)
    grid = _nearest(resized, side * cols, side * rows)
    selected = _tile_order(grid, side, cols, rows)
    if len(selected) > max_tokens:
        selected = spatial_uniform_sample(selected, grid, side, cols, max_tokens)
    return selected or [0]


def official_single_tile(mask: np.ndarray, tile: int = 448, side: int = 16, max_tokens: int = 8) -> list[int]:
    """``_get_visual_tokens_from_mask_multi_simple``: one 448 tile per image (series / pairs)."""
    resized = _nearest(mask, tile, tile)
    grid = _nearest(resized, side, side)
    r, c = np.nonzero(grid)
    selected = (r * side + c).tolist()
    if len(selected) > max_tokens:
        selected = spatial_uniform_sample(selected, grid, side, 1, max_tokens)
    return selected or [0]


# ---- native (paper) ------------------------------------------------------------------------------------------
def _overlap_matrix(n_cells: int, n_pixels: int) -> np.ndarray:
    """[n_cells, n_pixels] overlap length of each pixel with each cell (cells tile [0, n_pixels))."""
    edges = np.linspace(0.0, n_pixels, n_cells + 1)
    lo = np.maximum(edges[:-1, None], np.arange(n_pixels)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(n_pixels)[None, :] + 1)
    return np.clip(hi - lo, 0.0, None)


def cell_coverage(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Exact fraction of each token cell covered by the mask (the image is stretched onto the grid).

    For a boolean mask whose size the grid divides evenly, the overlap weights are exactly 0 or 1, so block
    counts give the matrix products' values bit for bit, several times faster.
    """
    h, w = mask.shape
    if mask.dtype == np.bool_ and grid_h > 0 and grid_w > 0 and h % grid_h == 0 and w % grid_w == 0:
        sy, sx = h // grid_h, w // grid_w
        acc = np.uint16 if sy < 2**16 else np.int64  # column counts inside a cell first: contiguous, narrow
        counts = mask.view(np.uint8).reshape(grid_h, sy, grid_w, sx).sum(axis=1, dtype=acc).sum(axis=2, dtype=np.int64)
        return counts / float(sy * sx)
    return cell_coverage_reference(mask, grid_h, grid_w)


def cell_coverage_reference(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """``cell_coverage`` as matrix products of per-axis pixel/cell overlaps (any sizes)."""
    h, w = mask.shape
    wy = _overlap_matrix(grid_h, h)
    wx = _overlap_matrix(grid_w, w)
    covered = wy @ mask.astype(np.float64) @ wx.T
    area = wy.sum(axis=1)[:, None] * wx.sum(axis=1)[None, :]
    return covered / area


def uniform_sample(indices: Sequence[int], side: int, cols: int, lam: int) -> list[int]:
    """At most λ tokens, one per cell of a ⌈√λ⌉ x ⌈√λ⌉ grid over the selection's bounding box.

    In each cell the token whose centre is nearest the cell centre wins (lowest index on ties). When more
    cells are occupied than λ, occupied cells are thinned evenly in raster order. Returns indices sorted.
    Vectorised; equality with ``uniform_sample_reference`` is a property test.
    """
    if len(indices) <= lam:
        return sorted(indices)
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if lam == 0:
        return []
    pr, pc = indices_to_grid(indices, side, cols)
    pos = np.stack([pr, pc], axis=1).astype(np.float64)
    centres = pos + 0.5
    r0, c0 = pos.min(axis=0)
    r1, c1 = pos.max(axis=0) + 1
    g = math.ceil(math.sqrt(lam))
    ch, cw = (r1 - r0) / g, (c1 - c0) / g
    cell_r = np.minimum(((centres[:, 0] - r0) / ch).astype(int), g - 1)
    cell_c = np.minimum(((centres[:, 1] - c0) / cw).astype(int), g - 1)
    cr = r0 + (cell_r + 0.5) * ch
    cc = c0 + (cell_c + 0.5) * cw
    dr, dc = centres[:, 0] - cr, centres[:, 1] - cc
    d = dr * dr + dc * dc
    cell = cell_r * g + cell_c  # ascending == the reference's sorted (row, col) cell tuples
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    picks = []
    for k, members in _near_minimum(cell, d, g * g):
        if len(members) == 1:
            picks.append(indices[int(members[0])])
            continue
        i, j = divmod(k, g)
        rc, ccen = r0 + (i + 0.5) * ch, c0 + (j + 0.5) * cw  # the reference's scalar expressions
        best = min((((centres[m, 0] - rc) ** 2 + (centres[m, 1] - ccen) ** 2, int(idx[m])), int(m))
                   for m in members)
        picks.append(indices[best[1]])
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


def box_tokens(indices: Sequence[int], side: int, cols: int, rows: int) -> list[int]:
    """All tokens of the grid tiles inside the bounding box of ``indices`` (injection mode "box")."""
    if len(indices) == 0:
        return []
    pr, pc = indices_to_grid(indices, side, cols)
    rr, cc = np.meshgrid(np.arange(pr.min(), pr.max() + 1), np.arange(pc.min(), pc.max() + 1), indexing="ij")
    keep = (rr < side * rows) & (cc < side * cols)
    return np.sort(_grid_to_index(rr[keep], cc[keep], side, cols)).tolist()


# ---- references: the original pure-Python loops (tests and bench/selection.py only) ---------------------------
def official_spatial_uniform_sample(indices: list[int], grid: np.ndarray, side: int, cols: int,
                                    target: int) -> list[int]:
    """The release's ``_spatial_uniform_sample``: grid over the mask bbox, nearest to centre, first wins.

    Reference only (O(cells x tokens) Python); the model calls ``spatial_uniform_sample``.
    """
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


def tile_order_reference(grid: np.ndarray, side: int, cols: int, rows: int) -> list[int]:
    """The original per-tile loop of ``_tile_order``."""
    out = []
    for tile in range(cols * rows):
        tr, tc = divmod(tile, cols)
        block = grid[tr * side:(tr + 1) * side, tc * side:(tc + 1) * side]
        for r, c in zip(*np.nonzero(block)):
            out.append(tile * side * side + int(r) * side + int(c))
    return out


def uniform_sample_reference(indices: list[int], side: int, cols: int, lam: int) -> list[int]:
    """The original dict loop of ``uniform_sample``."""
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


def box_tokens_reference(indices: list[int], side: int, cols: int, rows: int) -> list[int]:
    """The original comprehension of ``box_tokens``."""
    if not indices:
        return []
    pos = np.array([index_to_grid(i, side, cols) for i in indices])
    (r0, c0), (r1, c1) = pos.min(axis=0), pos.max(axis=0)
    return sorted(_grid_to_index(r, c, side, cols) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)
                  if r < side * rows and c < side * cols)
