"""Token selection: the official rules (bit-exact with the fixture) and the paper's rules (>50%, λ grid)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import unpack_mask

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
