"""The measured choice (worker/resolve.py): each rule on masks made here, expected options computed independently.

Grids are UTM 33N with 10 m pixels near the central meridian: a pixel is 100 m² of grid, and the ground differs
from the grid only by the UTM scale factor (0.9996), so a 10 x 10 pixel square is 1.00 ha within 0.1 %.
"""

from __future__ import annotations

import numpy as np
import pytest
from workerlib import GT10, UTM33, small_ask

from worker.measure import Georef, measure_mask
from worker.resolve import MeasuredImage, MeasuredStep, choice_check, measured_choice

GEOREF = Georef.from_gdal(GT10, UTM33)
NO_CRS = Georef.from_gdal([0.0, 1.0, 0.0, 0.0, 0.0, -1.0], None)


def img(role: str = "optical", georef: Georef = GEOREF, valid: np.ndarray | None = None) -> MeasuredImage:
    return MeasuredImage(role, georef, valid)


def grid(h: int = 40, w: int = 40) -> np.ndarray:
    return np.zeros((h, w), bool)


def box(m: np.ndarray, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
    m = m.copy()
    m[r0:r1, c0:c1] = True
    return m


def step(i: int, label: str, mask: np.ndarray, image: int = 0) -> MeasuredStep:
    return MeasuredStep(i, label, image, mask)


def ask(question: str, options: list[str], steps: list[MeasuredStep], images: list[MeasuredImage] | None = None):
    return measured_choice(question, options, steps, images or [img()])


# ------------------------------------------------------------------------------------------ numbers
def test_area_of_a_one_hectare_square_picks_the_hectare_option() -> None:
    square = box(grid(), 5, 5, 15, 15)  # 10 x 10 px of 10 m = 100 m x 100 m
    out = ask("What is the area of the water? Answer in hectares.", ["0.5 ha", "1.0 ha", "2.0 ha", "4.0 ha"],
              [step(0, "I segment the water", square)])
    assert out is not None and out["choice"] == "B" and out["quantity"] == "area" and out["steps"] == [0]
    assert out["value"] == pytest.approx(10_000.0, rel=2e-3) and out["value_text"] == "1.00 ha"
    assert "supports option B (1.0 ha)" in out["message"]
    # other area units are converted, not compared as bare numbers
    assert ask("How large is the water?", ["A. 2,000 m²", "B. 5,000 m²", "C. 9,800 m²", "D. 30,000 m²"],
               [step(0, "the water", square)])["choice"] == "C"
    assert ask("How large is the water?", ["0.001 km²", "0.01 km²", "0.1 km²"],
               [step(0, "the water", square)])["choice"] == "B"


def test_coverage_is_of_valid_pixels_and_uses_the_mask_the_question_names() -> None:
    water = box(grid(), 0, 0, 20, 40)  # top half: 50 %
    trees = box(grid(), 20, 0, 25, 8)  # 40 px: 2.5 %
    steps = [step(0, "I segment the water", water), step(1, "and the trees", trees)]
    assert ask("What percentage of the image is covered by trees?", ["2.5%", "10.0%", "25.0%", "50.0%"],
               steps)["choice"] == "A"
    out = ask("What share of the image is water?", ["12.0%", "30.0%", "49.0%", "80.0%"], steps)
    assert out["choice"] == "C" and out["value"] == pytest.approx(50.0) and out["steps"] == [0]
    # nodata pixels do not count: half of the grid is invalid, so the water covers all valid pixels
    valid = box(grid(), 0, 0, 20, 40)
    out = ask("What share of the image is water?", ["25.0%", "50.0%", "100.0%"], steps, [img(valid=valid)])
    assert out["choice"] == "C" and out["value_text"] == "100.0%"
    # without a label match the first mask is the relevant one
    assert ask("What share of the scene is it?", ["50.0%", "2.5%"], steps)["choice"] == "A"


def test_count_is_8_connected_objects() -> None:
    m = box(box(box(grid(), 2, 2, 6, 6), 10, 10, 14, 14), 30, 30, 33, 33)
    m = box(m, 14, 14, 16, 16)  # touches the second square at a corner: one object with it (8-connected)
    out = ask("How many buildings are there in the image?", ["1", "3", "5", "8"], [step(0, "the buildings", m)])
    assert out["choice"] == "B" and out["value"] == 3 and out["quantity"] == "count"
    assert ask("Count the buildings.", ["2 buildings", "4 buildings"], [step(0, "buildings", m)]) is not None


def test_distance_between_two_masks_is_geodesic_edge_to_edge() -> None:
    a = box(grid(), 10, 5, 20, 10)
    b = box(grid(), 10, 15, 20, 20)  # 5 empty columns of 10 m between them: 50 m
    out = ask("What is the distance between the water and the forest?", ["20 m", "50 m", "120 m", "0.3 km"],
              [step(0, "I segment the water", a), step(1, "and the forest", b)])
    assert out["choice"] == "B" and out["quantity"] == "distance" and out["steps"] == [0, 1]
    assert out["value"] == pytest.approx(50.0, rel=2e-3)


def test_largest_and_other_labels_measure_one_object_against_the_rest() -> None:
    """The model often draws all buildings for both masks: "largest" is its largest object, "other" the rest."""
    big = box(grid(), 5, 5, 15, 15)
    near = box(grid(), 5, 18, 8, 21)  # 3 empty columns from the big one: 30 m
    far = box(grid(), 30, 30, 33, 33)
    everything = big | near | far
    out = ask("How far is the largest building from the nearest other building?", ["10 m", "30 m", "90 m", "200 m"],
              [step(0, "I segment the largest building", everything), step(1, "and the other buildings", everything)])
    assert out["choice"] == "B" and out["value"] == pytest.approx(30.0, rel=2e-3)
    touching = box(grid(), 15, 15, 17, 17)  # corner contact: 8-connected, so part of the largest object itself
    beside = box(grid(), 5, 16, 8, 19)  # one empty column: adjacent
    yes = ask("Does the largest building border the other buildings?", ["No", "Yes"],
              [step(0, "the largest building", big | beside | far), step(1, "the other buildings", big | beside | far)])
    assert yes["choice"] == "B" and yes["value"] is True and yes["quantity"] == "adjacency"
    no = ask("Does the largest building border the other buildings?", ["No", "Yes"],
             [step(0, "the largest building", big | touching | far), step(1, "the other buildings", far)])
    assert no["choice"] == "A" and no["value"] is False


# ---------------------------------------------------------------------------------------- yes / no
def test_adjacency_and_existence() -> None:
    a, b = box(grid(), 0, 0, 10, 10), box(grid(), 0, 10, 10, 20)
    gap = box(grid(), 0, 14, 10, 20)  # 4 px gap
    steps = [step(0, "the water", a), step(1, "the forest", b)]
    assert ask("Does the water border the forest?", ["Yes", "No"], steps)["choice"] == "A"
    assert ask("Is the water adjacent to the forest?", ["Yes", "No"],
               [steps[0], step(1, "the forest", gap)])["choice"] == "B"
    assert ask("Is there any water in the image?", ["No", "Yes"], steps)["choice"] == "B"
    out = ask("Are there any clouds in the image?", ["Yes", "No"], [step(0, "I look for clouds", grid())])
    assert out["choice"] == "B" and out["quantity"] == "existence" and out["value"] is False
    larger = ask("Is the area of the water larger than the area of the forest?", ["Yes", "No"],
                 [steps[0], step(1, "the forest", gap)])
    assert larger["choice"] == "A" and larger["quantity"] == "larger"


# ------------------------------------------------------------------------------- regions and classes
def test_class_comparison_matches_options_to_mask_labels() -> None:
    water, forest = box(grid(), 0, 0, 20, 40), box(grid(), 25, 0, 30, 10)
    # labels as the worker records them: the injected measurement span may precede the words
    steps = [step(0, "I segment the forest", forest), step(1, "3% of valid area, 4 objects], and the water", water)]
    out = ask("Which covers a larger area: the forest or the water?", ["forest", "water"], steps)
    assert out["choice"] == "B" and out["quantity"] == "larger" and out["steps"] == [0, 1]
    assert 'mask 2 "and the water"' in out["message"] and "objects]" not in out["message"]
    assert ask("Comparing water and forest, which occupies more of the scene?", ["A. water", "B. forest"],
               steps)["choice"] == "A"
    # an option no mask stands for cannot be measured: no guess
    assert ask("Which is more extensive, cropland or water?", ["cropland", "water"], steps) is None


def test_halves_are_measured_on_the_class_mask() -> None:
    clouds = box(box(grid(), 0, 0, 5, 40), 25, 0, 40, 40)  # 200 px north, 600 px south
    out = ask("Which half of the image has more clouds: the northern or the southern half?",
              ["clouds in the northern half", "clouds in the southern half"],
              [step(0, "I segment the clouds in the northern half", clouds),
               step(1, "and the clouds in the southern half", clouds)])
    assert out["choice"] == "B" and out["quantity"] == "larger"
    west = box(grid(), 0, 0, 40, 12)
    assert ask("Is the forest area larger in the western half or in the eastern half of the image?",
               ["forest in the eastern half", "forest in the western half"],
               [step(0, "the forest", west)])["choice"] == "B"


# -------------------------------------------------------------------------------------------- change
def test_change_share_and_count_follow_the_building_change_definition() -> None:
    """4 buildings before; one gone, one shrunk to 40 % of its pixels (destroyed), one shrunk to 60 % (standing)."""
    before = grid()
    for c in (2, 12, 22, 32):
        before = box(before, 5, c, 10, c + 5)  # 25 px each
    after = before.copy()
    after[5:10, 2:7] = False  # gone
    after[5:10, 12:17] = False
    after[5:7, 12:17] = True  # 10 of 25 px left: destroyed
    after[8:10, 22:27] = False  # 15 of 25 px left: still standing
    images = [img("t0"), img("t1")]
    steps = [step(0, "In the buildings", before, 0), step(1, "In the buildings", after, 1),
             step(2, "The buildings of that lost more than half of their footprint by", before & ~after, 1)]
    out = ask("What percentage of the buildings were destroyed between the two images?",
              ["25.0%", "50.0%", "75.0%", "100.0%"], steps, images)
    assert out["choice"] == "B" and out["quantity"] == "change_share" and out["value"] == pytest.approx(50.0)
    assert out["steps"] == [0, 1]
    count = ask("How many buildings from the first image no longer stand in the second?", ["1", "2", "3", "4"],
                steps, images)
    assert count["choice"] == "B" and count["quantity"] == "change_count" and count["value"] == 2
    new = ask("How many new buildings were built between t0 and t1?", ["0", "1", "2"],
              [step(0, "In the buildings", after, 0), step(1, "In the buildings", before, 1)], images)
    assert new["quantity"] == "change_count" and new["choice"] == "B"  # the one that came back whole
    # without a plain mask of the second date there is nothing to compare
    assert ask("How many buildings were destroyed?", ["1", "2"], [steps[0], steps[2]], images) is None


# --------------------------------------------------------------------------------------- no guessing
@pytest.mark.parametrize(("question", "options"), [
    ("Describe the image.", None),
    ("Where is the water located in the image?", ["in the northern part", "in the centre", "scattered"]),
    ("Rank the water and forest by area.", ["water > forest", "forest > water"]),
    ("What share of the water lies within 50 m of the forest?", ["10.0%", "40.0%"]),
    ("How much more area does the water cover than the forest?", ["1 ha", "3 ha"]),
    ("By how much does the water area exceed the forest area?", ["1 ha", "3 ha"]),
    ("What is the area of the water?", ["1 ha", "a lot"]),
])
def test_no_rule_no_choice(question: str, options: list[str] | None) -> None:
    steps = [step(0, "the water", box(grid(), 0, 0, 20, 40)), step(1, "the forest", box(grid(), 25, 0, 30, 10))]
    assert measured_choice(question, options, steps, [img()]) is None


def test_without_a_crs_areas_and_distances_are_not_guessed() -> None:
    m = box(grid(), 0, 0, 10, 10)
    other = box(grid(), 0, 20, 10, 30)
    steps, images = [step(0, "the water", m), step(1, "the forest", other)], [img(georef=NO_CRS)]
    assert measured_choice("What is the area of the water?", ["1 ha", "4 ha"], steps, images) is None
    assert measured_choice("What is the distance between the water and the forest?", ["10 m", "40 m"], steps,
                           images) is None
    assert measured_choice("What share of the image is water?", ["6.3%", "30.0%"], steps, images)["choice"] == "A"
    assert measured_choice("What share of the image is water?", ["6.3%", "30.0%"], [], images) is None


def test_measurements_of_the_done_event_are_the_figures_used() -> None:
    m = box(grid(), 0, 0, 10, 10)
    meas = measure_mask(m, GEOREF).to_dict()
    s = MeasuredStep(0, "the water", 0, m, meas)
    out = measured_choice("What share of the image is water?", ["6.3%", "30.0%"], [s], [img()])
    assert out["value"] == meas["coverage_pct"]


def test_choice_check_names_the_model_letter_and_the_measured_option() -> None:
    out = ask("What share of the image is water?", ["6.3%", "30.0%"], [step(0, "the water", box(grid(), 0, 0, 10, 10))])
    check = choice_check("B", out, ["6.3%", "30.0%"])
    assert check["kind"] == "choice" and check["stated"] == "B" and check["measured"] == "A"
    assert check["message"].startswith("the model chose B (30.0%), but mask 1")
    assert "supports option A (6.3%)" in check["message"]
    assert choice_check("A", out, ["6.3%", "30.0%"]) is None and choice_check("B", None, ["6.3%"]) is None
    assert choice_check(None, out, ["6.3%", "30.0%"])["message"].startswith("the model chose no option")


# ---------------------------------------------------------------------------------------- real worker
def test_the_worker_reports_the_measured_choice_and_flags_a_different_letter(worker) -> None:
    """A forced trace makes the tiny model draw one mask; done.measured_choice must agree with its measurement.

    Option A (150 %) is no coverage at all, so the measured option is never A and the forced letter A is flagged.
    """
    options = ["150.0%", "2.0%", "47.0%", "96.0%"]  # midpoints 24.5 % and 71.5 % of 32 x 32 px: no ties
    header, arrays = small_ask("What percentage of the image is covered by the bright square?", max_new_tokens=60,
                               options=options)
    header["forced_prefix"] = "<think>I segment the bright square [SEG].</think><answer>A</answer>"
    with worker.client() as c:
        done = c.ask(header, arrays)
    (meas,) = done["measurements"]
    measured = done["measured_choice"]
    assert measured["quantity"] == "coverage" and measured["steps"] == [0]
    assert measured["value"] == pytest.approx(meas["coverage_pct"])
    nearest = "ABCD"[int(np.argmin([abs(float(o[:-1]) - meas["coverage_pct"]) for o in options]))]
    assert measured["choice"] == nearest != "A" and done["choice"] == "A"
    (check,) = [c for c in done["checks"] if c["kind"] == "choice"]
    assert check["stated"] == "A" and check["measured"] == nearest
    assert check["message"].startswith("the model chose A (150.0%), but mask 1")
    # free-form question: no options, no measured choice
    header, arrays = small_ask("Where is the bright square?", max_new_tokens=30)
    header["forced_prefix"] = "<think>I segment the bright square [SEG].</think><answer>here</answer>"
    with worker.client() as c:
        done = c.ask(header, arrays)
    assert done["measured_choice"] is None and not [c for c in done["checks"] if c["kind"] == "choice"]


# ------------------------------------------------------------------------------- span with answer
def test_span_gets_the_measured_answer_of_the_masks_so_far() -> None:
    """The span the worker injects names the option the masks drawn so far support; before they resolve the
    question (one mask of a distance question) or without options, the span is left as it was."""
    from worker.measure import grounding_text
    from worker.resolve import span_with_answer

    a, b = box(grid(), 0, 0, 10, 10), box(grid(), 0, 20, 10, 30)  # 10 px apart: 100 m of grid
    q, opts = "How far is the lake from the forest?", ["A. 50 m", "B. 100 m", "C. 200 m", "D. 400 m"]
    first = [step(0, "I segment the lake", a)]
    span_a = grounding_text(measure_mask(a, GEOREF))
    assert span_with_answer(span_a, q, opts, first, [img()]) == span_a  # one mask: no distance yet
    both = first + [step(1, "and the forest", b)]
    span_b = grounding_text(measure_mask(b, GEOREF))
    noted = span_with_answer(span_b, q, opts, both, [img()])
    assert noted == span_b[:-1] + "; measured answer B]"
    assert span_with_answer(noted, q, opts, both, [img()]) == noted  # never twice
    assert span_with_answer(span_b, q, None, both, [img()]) == span_b
    assert span_with_answer(span_b, "Where is the forest?", ["A. north", "B. south"], both, [img()]) == span_b
