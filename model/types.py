"""Data passed between the model runtime and its callers (worker, bench, training).

This is the contract between ``model/`` and ``worker/``: the worker builds
``ImageInput``s from prepared rasters, calls ``TerraScope.answer`` and turns the
``MaskStep``s and ``AnswerResult`` into wire events. Keep it torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

#: "optical" and "sar" may appear together (one pair); "t0", "t1", ... form an ordered series.
ImageRole = str

InjectionMode = Literal["mask", "box", "random", "none"]


@dataclass
class ImageInput:
    """One prepared image: ``pixels`` is HxWx3 uint8 (the worker already stretched it)."""

    pixels: np.ndarray
    role: ImageRole = "optical"


@dataclass
class MaskStep:
    """One ``[SEG]`` event: the mask on the image's own pixel grid and what was injected."""

    step: int  # 0-based index of the [SEG] in the answer
    label: str  # the reasoning text that introduced this [SEG] (e.g. "the water regions")
    image_index: int  # index into the ``images`` list given to ``answer``
    mask: np.ndarray  # bool, HxW of images[image_index].pixels
    score: float  # SAM-2 predicted IoU of the chosen mask
    token_indices: list[int] = field(default_factory=list)  # visual tokens injected
    modality: list[str] = field(default_factory=list)  # per injected token: "optical"/"sar" (pairs only)
    grounding_text: str | None = None  # measurement span injected after the mask, if any
    region_rule: str | None = None  # the phrase rule that shaped the mask (model/regions.py), if any


@dataclass
class AnswerResult:
    """What ``TerraScope.answer`` returns once generation stops."""

    text: str  # full generated text, special tokens such as [SEG] included
    reasoning: str  # the <think> part, special tokens removed
    answer: str  # the <answer> part (or the whole text when the tags are missing)
    choice: str | None  # option letter when options were given, as the official evaluation extracts it
    steps: list[MaskStep]
    token_ids: list[int]
    timings_ms: dict[str, float]
    stopped: str = "eos"  # "eos" | "answer" | "max_new_tokens" | "max_seg" | "cancelled"


@dataclass
class GenerationSettings:
    max_new_tokens: int = 512
    max_seg: int = 20
    temperature: float = 0.0  # 0 = greedy
    injection: InjectionMode = "mask"
    max_tokens_per_seg: int | None = None  # λ; None = the checkpoint's own value
    seed: int = 0
    # project each mask onto what its phrase defines ("the largest ...", "... in the eastern half"; model/regions.py).
    # Off here so the model matches the official code; the worker turns it on unless a request says not to.
    region_rules: bool = False


#: Called with each decoded text delta as it is produced.
TokenCallback = Callable[[str], None]
#: Called with each finished mask step, before generation resumes.
MaskCallback = Callable[[MaskStep], None]
#: Given a finished mask step, returns a short measurement span to inject into the
#: trace (measurement grounding), or None to inject nothing.
GroundingFn = Callable[[MaskStep], "str | None"]
#: Polled once per decode step; True stops generation with ``stopped="cancelled"``.
StopFn = Callable[[], bool]
