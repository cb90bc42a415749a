"""Prompt templates, <think>/<answer> parsing, option letters as the release's evaluation extracts them."""

from __future__ import annotations

import pytest
from conftest import rand_image, tiny_scope

from model.prompting import build_prompt, extract_choice, parse_response, route_marker, seg_label
from model.types import ImageInput


@pytest.mark.parametrize("text,n,want", [
    ("<think>water is 40%</think><answer>C</answer>", 4, "C"),
    ("<think>..</think><answer> b) 25%</answer>", 4, "B"),  # leading letter, case-insensitive, ")" allowed
    ("<think>..</think><answer>The answer is D. 60%</answer>", 4, "D"),  # first \b[A-D]\b inside <answer>
    ("<think>..</think><answer>Dense forest</answer>", 4, "D"),  # the release's leading-letter regex quirk
    ("I think it is B.", 4, "B"),  # no tags: leading-letter test fails ("I"), whole-response fallback
    ("<answer>E. 17</answer>", 5, "E"),
    ("<answer>E. 17</answer>", 4, None),  # E is not an option among four
    ("<think>a region was found</think><answer>none of these</answer>", 4, None),
    ("", 4, None),
])
def test_extract_choice(text, n, want):
    assert extract_choice(text, n) == want


def test_parse_response_strips_special_tokens():
    text = "<think>I first identify the water [SEG]<REGION><REGION> then compare</think><answer>B. 25%</answer>"
    reasoning, answer = parse_response(text)
    assert reasoning == "I first identify the water then compare"
    assert answer == "B. 25%"
    assert parse_response("plain answer") == ("", "plain answer")
    assert parse_response("<think>unfinished [SEG]") == ("unfinished", "")
    assert parse_response("<think>x</think> tail") == ("x", "tail")


def test_templates():
    official = build_prompt("qwen_chat", "How much water?", ["10%", "25%"], [3], ["optical"])
    assert official.startswith("<|im_start|>user\nA conversation between User and Assistant.")
    assert "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nHow much water?\nA. 10%\nB. 25%\n<|im_end|>" in official
    assert official.endswith("<|im_start|>assistant\n")
    multi = build_prompt("qwen_chat", "q", None, [1, 1], ["t0", "t1"])
    assert "<img><IMG_CONTEXT></img>\n<img><IMG_CONTEXT></img>\nq\n" in multi
    ours = build_prompt("terrascope", "q", None, [1, 2], ["t0", "t1"])
    assert "Image: t0\n<img><IMG_CONTEXT></img>\nImage: t1\n<img>" in ours
    with pytest.raises(ValueError, match="empty"):
        build_prompt("terrascope", " ", None, [1], ["optical"])
    with pytest.raises(ValueError, match="template"):
        build_prompt("chatml", "q", None, [1], ["optical"])


def test_route_marker_and_label():
    assert route_marker("<think>Before, Image: t0 shows x. Now Image: T3 the") == "t3"
    assert route_marker("no marker") is None
    assert seg_label("<think>I first identify the water regions [SEG]") == "I first identify the water regions"
    assert seg_label("a [SEG]<REGION> then, Image: t1 the new roads [SEG]") == "then, the new roads"
    # the measurement span injected after the previous mask is not part of the next label
    assert seg_label("I segment the water [SEG]<REGION> [area 211.61 ha, 10.3% of valid area, 83 objects] "
                     "and the background [SEG]") == "and the background"


def test_option_labels_written_by_users_are_not_doubled():
    from model.prompting import options_text

    text = options_text(["A. water", "B) forest", "(C) crops", "D: bare", "Apple orchard"])
    assert text == "A. water\nB. forest\nC. crops\nD. bare\nE. Apple orchard\n"


@pytest.mark.parametrize("compat", ["official", "native"])
def test_prompt_ids_expand_one_placeholder_per_image_to_the_full_tokenisation(compat):
    """``Generator.prompt_ids`` tokenises one image-context token per image and expands it; the ids must equal
    tokenising the fully expanded prompt, for one image, a pair and a series, and a question that itself
    spells the placeholder (which takes the full path)."""
    ts = tiny_scope(compat=compat)
    img = rand_image(60, 90)
    cases = [[ImageInput(img)], [ImageInput(img, "optical"), ImageInput(img, "sar")],
             [ImageInput(img, "t0"), ImageInput(img, "t1"), ImageInput(img, "t2")]]
    template = ts.model.config.template
    for images in cases:
        ctx = ts.prepare(images)
        for question, options in [("Which share is flooded?", ["<5%", "5-10%", "ä ü 30%"]),
                                  ("Count the buildings.\n\nThen stop.", None),
                                  ("What is <IMG_CONTEXT> here?", None)]:
            full = ts.tokenizer.encode(build_prompt(template, question, options, ctx.token_counts, ctx.roles))
            assert ts.generator.prompt_ids(ctx, question, options) == full


def test_measured_answer_note_is_added_once_and_stripped() -> None:
    from model.prompting import MEASURED_ANSWER, strip_measured_answer, with_measured_answer

    span = " [area 1.00 ha, 6.2% of valid area, 1 object]"
    noted = with_measured_answer(span, "C")
    assert noted == " [area 1.00 ha, 6.2% of valid area, 1 object; measured answer C]"
    assert MEASURED_ANSWER.search(noted).group(1) == "C"
    assert with_measured_answer(noted, "A") == noted
    assert strip_measured_answer(noted) == span and strip_measured_answer(span) == span
    assert with_measured_answer("no brackets", "B") == "no brackets"
