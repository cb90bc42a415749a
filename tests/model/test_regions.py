"""Phrase rules on [SEG] masks (model/regions.py): each expected mask is drawn by hand, and in generation the
rules shape what is injected and returned while the model's own path stays unchanged without them."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rand_image, tiny_scope
from scipy import ndimage

from model import regions
from model.regions import Drawn, project
from model.types import GenerationSettings, ImageInput

FOUR = ndimage.generate_binary_structure(2, 1)


def canvas(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (10, 12)) -> np.ndarray:
    m = np.zeros(shape, bool)
    for r0, c0, r1, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def test_largest_keeps_the_biggest_four_connected_object():
    # a 3x3 square, a 2x5 bar, and two diagonal pixels that are one object only under 8-connectivity
    m = canvas((0, 0, 3, 3), (6, 2, 8, 7), (5, 10, 6, 11), (6, 11, 7, 12))
    out, rule = project("I segment the largest building", 0, m, [])
    assert rule == "largest object"
    assert np.array_equal(out, canvas((6, 2, 8, 7)))  # 10 px beats 9 px


def test_other_takes_the_rest_of_the_largest_mask_without_what_touches_it():
    first = canvas((0, 0, 3, 3), (6, 2, 8, 7))  # the decoder drew two buildings for "the largest"
    big, _ = project("I segment the largest building", 0, first, [])
    earlier = [Drawn("I segment the largest building", 0, first, big)]
    # "other" drew the largest building again, one touching it diagonally, and a far one
    other = canvas((6, 2, 8, 7), (8, 7, 9, 8), (0, 9, 2, 11))
    out, rule = project("and the other buildings", 0, other, earlier)
    assert rule == "objects other than the largest"
    assert np.array_equal(out, canvas((0, 0, 3, 3), (0, 9, 2, 11)))


def test_other_without_an_earlier_largest_of_the_same_thing_on_the_same_image_is_unchanged():
    m = canvas((0, 0, 3, 3))
    assert project("and the other buildings", 0, m, [])[1] is None
    first = canvas((6, 2, 8, 7))
    for earlier in ([Drawn("the largest building", 1, first, first)],  # another image
                    [Drawn("I segment the largest field", 0, first, first)]):  # another thing
        out, rule = project("and the other bank of the river", 0, m, earlier) if "field" in earlier[0].label \
            else project("and the other buildings", 0, m, earlier)
        assert rule is None and np.array_equal(out, m)
    # singular and plural, "remaining", "rest of": one thing
    earlier = [Drawn("I segment the largest water body", 0, first, first)]
    for label in ("and the other water bodies", "the remaining water bodies", "the rest of the water bodies"):
        assert project(label, 0, m | first, earlier)[1] == "objects other than the largest"


@pytest.mark.parametrize(("which", "rows", "cols"), [
    ("northern", slice(0, 5), slice(None)), ("southern", slice(5, 11), slice(None)),
    ("western", slice(None), slice(0, 6)), ("eastern", slice(None), slice(6, 13)),
])
def test_half_cuts_to_that_half_and_odd_sizes_give_the_middle_to_south_and_east(which, rows, cols):
    m = np.ones((11, 13), bool)
    out, rule = project(f"I segment the buildings in the {which} half", 0, m, [])
    want = np.zeros_like(m)
    want[rows, cols] = True
    assert rule == f"{which} half" and np.array_equal(out, want)


def test_half_adds_the_same_things_earlier_mask_but_not_another_class():
    north = canvas((6, 0, 8, 4))  # the decoder put these buildings in the south although asked for the north
    earlier = [Drawn("I segment the buildings in the northern half", 0, north, north & regions.half_mask(
        north.shape, "north"))]
    south_raw = canvas((7, 8, 9, 10))
    out, _ = project("and the buildings in the southern half", 0, south_raw, earlier)
    assert np.array_equal(out, canvas((6, 0, 8, 4), (7, 8, 9, 10)))
    out, _ = project("and the forest in the southern half", 0, south_raw, earlier)
    assert np.array_equal(out, south_raw)


def test_largest_in_a_half_is_cut_first():
    m = canvas((0, 0, 4, 4), (6, 8, 8, 10))  # the bigger object lies in the north
    out, rule = project("the largest building in the southern half", 0, m, [])
    assert rule == "southern half, largest object" and np.array_equal(out, canvas((6, 8, 8, 10)))


def test_phrases_without_a_rule_and_empty_masks_are_left_alone():
    m = canvas((0, 0, 3, 3), (5, 5, 7, 7))
    for label in ("I first identify the water regions", "The buildings of that lost more than half of their"):
        out, rule = project(label, 0, m, [])
        assert rule is None and np.array_equal(out, m)
    empty = np.zeros((4, 4), bool)
    assert not project("the largest building", 0, empty, [])[0].any()
    with pytest.raises(ValueError, match="unknown image half"):
        regions.half_mask((4, 4), "up")


def test_resample_is_nearest_neighbour_on_the_other_grid():
    m = canvas((0, 0, 2, 3), shape=(4, 6))
    assert regions.resample(m, (4, 6)) is m
    assert np.array_equal(regions.resample(m, (8, 12)), np.kron(m, np.ones((2, 2), bool)))


PREFIX = ("<think>I segment the largest building [SEG] and the other buildings [SEG] then the buildings in the "
          "eastern half [SEG]")


def test_generation_applies_the_rules_only_when_asked():
    ts = tiny_scope(0)
    img = [ImageInput(rand_image(96, 128, seed=0))]
    raw = ts.answer(img, "q", settings=GenerationSettings(max_new_tokens=80), forced_prefix=PREFIX)
    ruled = ts.answer(img, "q", settings=GenerationSettings(max_new_tokens=80, region_rules=True),
                      forced_prefix=PREFIX)
    assert [s.region_rule for s in raw.steps] == [None, None, None]
    assert [s.region_rule for s in ruled.steps] == ["largest object", "objects other than the largest",
                                                   "eastern half"]
    # the first mask is drawn before anything differs: the rule keeps its largest 4-connected object
    lab, n = ndimage.label(raw.steps[0].mask, structure=FOUR)
    assert n > 1, "the random model should draw several objects here"
    biggest = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    assert np.array_equal(ruled.steps[0].mask, biggest)
    # what follows it never touches it, and the half mask stays in its half
    assert not (ndimage.binary_dilation(ruled.steps[0].mask, np.ones((3, 3), bool)) & ruled.steps[1].mask).any()
    assert not ruled.steps[2].mask[:, :64].any() and ruled.steps[2].mask.any()
    # fewer mask pixels, fewer injected tokens (λ = 6 caps both)
    assert len(ruled.steps[1].token_indices) < len(raw.steps[1].token_indices)
