"""Token selection: the official rules (bit-exact with the fixture) and the paper's rules (>50%, λ grid); the
vectorised helpers pick exactly what the original Python loops pick (property tests)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from conftest import unpack_mask
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from model import selection as S
from model.preprocess import TileLayout

LAYOUTS = {"A": TileLayout(3, 2, 448, True, (400, 600)), "B": TileLayout(1, 1, 448, False, (448, 448))}


def test_official_rules_match_every_fixture_case(refs, meta):
    cases = meta["fn_region_tokens"]
    assert len(cases) == 36
    for key, want in cases.items():
        kind = "multi_simple" if key.startswith("multi_simple") else "accurate"
        img, name, cap = key[len(kind) + 1:].split("_")
        lay = LAYOUTS[img]
        mask = unpack_mask(refs[f"fn.mask_{img}_{name}_packed"], lay.orig_hw)
        cap = int(cap[3:])
        got = S.official_tiled(mask, lay, 16, cap) if kind == "accurate" else S.official_single_tile(mask, 448, 16, cap)
        assert got == want, key


def test_more_than_half_coverage_on_partial_cells():
    # 64x64 image on a 4x4 grid: cells are 16x16 = 256 px
    mask = np.zeros((64, 64), bool)
    mask[0:16, 0:9] = True  # cell (0,0): 144/256 = 56% -> selected
    mask[0:16, 16:24] = True  # cell (0,1): exactly 50% -> not selected
    mask[16:32, 32:40] = True
    mask[16:17, 40:48] = True  # cell (1,2): (128+8)/256 = 53% -> selected
    mask[48:64, 48:55] = True  # cell (3,3): 112/256 = 44% -> not selected
    cov = S.cell_coverage(mask, 4, 4)
    assert cov[0, 0] == pytest.approx(144 / 256) and cov[0, 1] == pytest.approx(0.5)
    lay = TileLayout(1, 1, 64, False, (64, 64))
    assert S.native_tiled(mask, lay, side=4, lam=100) == [0, 6]


def test_coverage_uses_exact_area_for_non_integer_cells():
    # 10 px onto 4 cells: each cell is 2.5 px wide; pixels 0..2 fill cell 0 and half of cell 1
    mask = np.zeros((1, 10), bool)
    mask[0, :3] = True
    cov = S.cell_coverage(mask, 1, 4)[0]
    np.testing.assert_allclose(cov, [1.0, 0.2, 0.0, 0.0])


def test_native_selection_indexes_tiles_in_prompt_order():
    # 2x1 tiles of side 4: right half of the image covers tile 1 only
    mask = np.zeros((20, 40), bool)
    mask[:, 20:] = True
    lay = TileLayout(2, 1, 56, True, (20, 40))
    assert S.native_tiled(mask, lay, side=4, lam=100) == list(range(16, 32))
    assert S.native_tiled(np.zeros((20, 40), bool), lay, side=4, lam=8) == []


@pytest.mark.parametrize("lam", [8, 16, 30, 128])
def test_lambda_sampling_spreads_one_pick_per_cell(lam):
    side, cols = 16, 3
    lay = TileLayout(cols, 2, 448, True, (400, 600))
    yy, xx = np.mgrid[:400, :600]
    mask = (yy - 200) ** 2 / 150**2 + (xx - 300) ** 2 / 260**2 < 1  # a big ellipse over all tiles
    selected = S._tile_order(S.cell_coverage(mask, 32, 48) > 0.5, side, cols, 2)
    assert len(selected) > lam
    picks = S.native_tiled(mask, lay, side, lam)
    assert 0 < len(picks) <= lam
    assert set(picks) <= set(selected) and picks == sorted(picks)
    pos = np.array([S.index_to_grid(i, side, cols) for i in selected])
    r0, c0 = pos.min(axis=0)
    r1, c1 = pos.max(axis=0) + 1
    g = math.ceil(math.sqrt(lam))
    cells = [(int((r + 0.5 - r0) / ((r1 - r0) / g)), int((c + 0.5 - c0) / ((c1 - c0) / g)))
             for r, c in (S.index_to_grid(i, side, cols) for i in picks)]
    assert len(cells) == len(set(cells)), "two picks in one grid cell"
    # spread: the picks reach every quarter of the selection's bounding box
    rows = np.array([S.index_to_grid(i, side, cols)[0] for i in picks])
    colz = np.array([S.index_to_grid(i, side, cols)[1] for i in picks])
    mid_r, mid_c = (r0 + r1) / 2, (c0 + c1) / 2
    for top in (True, False):
        for left in (True, False):
            assert np.any(((rows < mid_r) == top) & ((colz < mid_c) == left))


def test_lambda_pick_is_nearest_to_cell_centre():
    # 4x4 block of tokens, λ=1: one cell = the whole box, centre (2, 2) in grid units -> token (1,1) or
    # (1,2)/(2,1)/(2,2) all at the same distance; the lowest index wins
    indices = [r * 16 + c for r in range(4) for c in range(4)]
    assert S.uniform_sample(indices, 16, 1, 1) == [17]


def test_box_tokens_fill_the_bounding_box():
    assert S.box_tokens([0, 5], side=4, cols=1, rows=1) == [0, 1, 4, 5]
    assert S.box_tokens([], side=4, cols=1, rows=1) == []


# ---- vectorised helpers == the original Python loops (property tests) -------------------------------------------
PROPS = settings(deadline=None, database=None, max_examples=400, suppress_health_check=list(HealthCheck))


@st.composite
def token_grids(draw, max_side: int = 6, max_tiles: int = 3):
    """(grid, side, cols, rows): a boolean token grid of cols x rows tiles of side x side tokens."""
    side = draw(st.integers(1, max_side))
    cols, rows = draw(st.integers(1, max_tiles)), draw(st.integers(1, max_tiles))
    fill = draw(st.sampled_from(["random", "empty", "full", "one", "row", "col", "block"]))
    h, w = rows * side, cols * side
    grid = np.zeros((h, w), bool)
    if fill == "random":
        grid = draw(hnp.arrays(np.bool_, (h, w)))
    elif fill == "full":
        grid[:] = True
    elif fill == "one":
        grid[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = True
    elif fill == "row":  # a bounding box of one row
        r, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        grid[r, c0:draw(st.integers(c0 + 1, w))] = True
    elif fill == "col":
        c, r0 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
        grid[r0:draw(st.integers(r0 + 1, h)), c] = True
    elif fill == "block":
        r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
        grid[r0:draw(st.integers(r0 + 1, h)), c0:draw(st.integers(c0 + 1, w))] = True
    return grid, side, cols, rows


@st.composite
def index_lists(draw, side: int, cols: int, rows: int, grid: np.ndarray):
    """The grid's own selection (what the model passes), or any indices: unordered, repeated, off the grid."""
    if draw(st.booleans()):
        return S.tile_order_reference(grid, side, cols, rows)
    n = side * side * cols * rows
    return draw(st.lists(st.integers(0, n - 1), max_size=3 * n))


def _quiet(fn, *args):
    """The references divide by zero for target 0 (numpy warns, then returns []); keep the output clean."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args)


@PROPS
@given(data=st.data(), case=token_grids(), target=st.integers(0, 30))
def test_spatial_sample_equals_the_release_loop(data, case, target):
    grid, side, cols, rows = case
    indices = data.draw(index_lists(side, cols, rows, grid))
    want = _quiet(S.official_spatial_uniform_sample, indices, grid, side, cols, target)
    assert S.spatial_uniform_sample(indices, grid, side, cols, target) == want


@PROPS
@given(data=st.data(), case=token_grids(max_side=16, max_tiles=2), target=st.sampled_from([4, 8, 9, 16]))
def test_spatial_sample_equals_the_release_loop_at_model_shapes(data, case, target):
    grid, side, cols, rows = case
    indices = S.tile_order_reference(grid, side, cols, rows)
    want = _quiet(S.official_spatial_uniform_sample, indices, grid, side, cols, target)
    assert S.spatial_uniform_sample(indices, grid, side, cols, target) == want


def _corners_and(points: list[tuple[int, int]], h: int, w: int) -> np.ndarray:
    grid = np.zeros((h, w), bool)
    for r, c in points:
        grid[r, c] = True
    return grid


@pytest.mark.parametrize(("grid", "target"), [
    (_corners_and([(3, 2)], 8, 8), 8),  # one cell
    (np.ones((8, 8), bool), 8),  # all cells: ties everywhere, first wins
    (np.ones((2, 3), bool), 40),  # target > cells
    (_corners_and([(5, c) for c in range(1, 8)], 8, 8), 8),  # bbox of one row
    (_corners_and([(r, 6) for r in range(8)], 8, 8), 8),  # bbox of one column
    (np.zeros((8, 8), bool), 3),  # nothing selected: the first `target` indices
    (np.ones((8, 8), bool), 0),
    (np.ones((8, 8), bool), 1),
])
def test_spatial_sample_edge_cases(grid, target):
    side, cols = 4, 2
    indices = S.tile_order_reference(grid, side, cols, 2)
    if not indices:
        indices = [5, 1, 9, 30]
    want = _quiet(S.official_spatial_uniform_sample, indices, grid, side, cols, target)
    assert S.spatial_uniform_sample(indices, grid, side, cols, target) == want
    assert S.spatial_uniform_sample([], grid, side, cols, target) == _quiet(
        S.official_spatial_uniform_sample, [], grid, side, cols, target)


@pytest.mark.parametrize(("top_left", "bottom_right", "a", "b"), [
    # centre cell of a 3x3 grid: x*x ties a and b at 57.25000000000006; the release's ``** 2`` (libm pow, not
    # always correctly rounded) puts b one ulp ahead
    ((5, 5), (24, 51), (14, 36), (16, 36)),
    # x*x puts a one ulp ahead (111.25000000000014 < ...17); pow ties them, so the first listed wins
    ((17, 17), (42, 87), (29, 42), (31, 42)),
])
def test_spatial_sample_breaks_near_ties_with_the_releases_rounding(top_left, bottom_right, a, b):
    side, cols = 16, 6
    points = [top_left, a, b, bottom_right]
    grid = _corners_and(points, 48, 96)
    for order in (points, points[::-1], [b, a, top_left, bottom_right]):
        indices = [S._grid_to_index(r, c, side, cols) for r, c in order]
        want = S.official_spatial_uniform_sample(indices, grid, side, cols, 5)
        assert S.spatial_uniform_sample(indices, grid, side, cols, 5) == want


def test_spatial_sample_rejects_a_negative_target():
    with pytest.raises(ValueError, match="target"):
        S.spatial_uniform_sample([0, 1], np.ones((2, 2), bool), 2, 1, -1)


@PROPS
@given(case=token_grids(), extra=st.integers(0, 5))
def test_tile_order_equals_the_per_tile_loop(case, extra):
    grid, side, cols, rows = case
    assert S._tile_order(grid, side, cols, rows) == S.tile_order_reference(grid, side, cols, rows)
    # a grid larger or smaller than the tiles: cells outside them are ignored by both
    big = np.pad(grid, ((0, extra), (0, extra)), constant_values=True)
    assert S._tile_order(big, side, cols, rows) == S.tile_order_reference(big, side, cols, rows)
    small = grid[: max(0, grid.shape[0] - extra), : max(0, grid.shape[1] - extra)]
    assert S._tile_order(small, side, cols, rows) == S.tile_order_reference(small, side, cols, rows)


@PROPS
@given(data=st.data(), case=token_grids(), lam=st.integers(0, 30))
def test_native_uniform_sample_equals_the_dict_loop(data, case, lam):
    grid, side, cols, rows = case
    indices = data.draw(index_lists(side, cols, rows, grid))
    want = _quiet(S.uniform_sample_reference, indices, side, cols, lam)
    assert S.uniform_sample(indices, side, cols, lam) == want


@PROPS
@given(case=token_grids(max_side=16, max_tiles=3), lam=st.sampled_from([1, 4, 8, 30, 128]))
def test_native_uniform_sample_equals_the_dict_loop_at_model_shapes(case, lam):
    grid, side, cols, rows = case
    indices = S.tile_order_reference(grid, side, cols, rows)
    assert S.uniform_sample(indices, side, cols, lam) == S.uniform_sample_reference(indices, side, cols, lam)


@PROPS
@given(data=st.data(), case=token_grids())
def test_box_tokens_equals_the_comprehension(data, case):
    grid, side, cols, rows = case
    indices = data.draw(index_lists(side, cols, rows, grid))
    assert S.box_tokens(indices, side, cols, rows) == S.box_tokens_reference(indices, side, cols, rows)


def _official_tiled_reference(mask, layout, side, max_tokens):
    resized = S._nearest(mask, layout.tile * layout.cols, layout.tile * layout.rows)
    grid = S._nearest(resized, side * layout.cols, side * layout.rows)
    selected = S.tile_order_reference(grid, side, layout.cols, layout.rows)
    if len(selected) > max_tokens:
        selected = S.official_spatial_uniform_sample(selected, grid, side, layout.cols, max_tokens)
    return selected or [0]


def _official_single_tile_reference(mask, tile, side, max_tokens):
    grid = S._nearest(S._nearest(mask, tile, tile), side, side)
    selected = [int(r) * side + int(c) for r, c in zip(*np.nonzero(grid))]
    if len(selected) > max_tokens:
        selected = S.official_spatial_uniform_sample(selected, grid, side, 1, max_tokens)
    return selected or [0]


@settings(PROPS, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), blobs=st.integers(0, 4), cap=st.sampled_from([1, 8, 16]),
       cols=st.integers(1, 3), rows=st.integers(1, 2))
@example(seed=0, blobs=4, cap=8, cols=2, rows=2)
def test_official_rules_equal_the_python_pipeline_on_random_masks(seed, blobs, cap, cols, rows):
    # 8B token grids (16x16 per tile) on a 112-px tile to keep the PIL resizes small
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 200)), int(rng.integers(20, 200))
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(blobs):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, h), rng.uniform(1, w)
        mask |= (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 < 1
    lay = TileLayout(cols, rows, 112, cols * rows > 1, (h, w))
    assert S.official_tiled(mask, lay, 16, cap) == _official_tiled_reference(mask, lay, 16, cap)
    assert S.official_single_tile(mask, 112, 16, cap) == _official_single_tile_reference(mask, 112, 16, cap)


@PROPS
@given(gh=st.integers(1, 12), gw=st.integers(1, 12), sy=st.integers(1, 9), sx=st.integers(1, 9),
       extra=st.sampled_from([(0, 0), (1, 0), (0, 3), (5, 7)]), seed=st.integers(0, 2**32 - 1),
       density=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_cell_coverage_block_counts_equal_the_matrix_products(gh, gw, sy, sx, extra, seed, density):
    # divisible sizes take the block-count path; the others (extra pixels) the matrix products themselves
    mask = np.random.default_rng(seed).random((gh * sy + extra[0], gw * sx + extra[1])) < density
    got = S.cell_coverage(mask, gh, gw)
    assert np.array_equal(got, S.cell_coverage_reference(mask, gh, gw))
    flipped = mask.T[::-1]  # a non-contiguous view
    assert np.array_equal(S.cell_coverage(flipped, gw, gh), S.cell_coverage_reference(flipped, gw, gh))


@settings(PROPS, max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), h=st.sampled_from([16, 64, 100, 112, 224]),
       w=st.sampled_from([16, 48, 112, 150]))
def test_nearest_same_size_shortcut_equals_pil(seed, h, w):
    mask = np.random.default_rng(seed).random((h, w)) < 0.5
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    for size in ((w, h), (w // 2 + 1, h), (8, 8)):
        want = np.asarray(img.resize(size, Image.NEAREST)) > 127
        got = S._nearest(mask, *size)
        assert np.array_equal(got, want) and got.dtype == want.dtype
    assert S._nearest(mask, w, h) is not mask


@settings(max_examples=200, deadline=None)
@given(src_h=st.integers(1, 1400), src_w=st.integers(1, 1400), dst_h=st.integers(1, 1800),
       dst_w=st.integers(1, 1800), seed=st.integers(0, 2**16))
@example(896, 896, 32, 32, 0).via("a 2x2-tile 896-px mask to its token grid")
@example(700, 1000, 448, 896, 1).via("a mask to its tiling size")
def test_nearest_gather_equals_pil_nearest_resize(src_h, src_w, dst_h, dst_w, seed):
    """The release resizes masks with PIL NEAREST; ``_nearest`` gathers through index maps read off PIL."""
    mask = np.random.default_rng(seed).random((src_h, src_w)) < 0.5
    np.testing.assert_array_equal(S._nearest(mask, dst_w, dst_h), S._nearest_pil(mask, dst_w, dst_h))
