"""Pixel-grounded reasoning traces: building them with their masks, and parsing them back.

Format (paper §3.3): ``<think>... the water regions [SEG] ... </think><answer>...</answer>``; each
``[SEG]`` owns one ground-truth mask, in order. Multi-image traces name the image right before the
``[SEG]`` ("Image: t1") and visit the images in order t0, t1, ... so that the k-th ``[SEG]`` also
refers to image ``k mod n`` (the official multi-image runtime's convention).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

SEG = "[SEG]"
_TRACE = re.compile(r"^<think>(?P<think>.*)</think><answer>(?P<answer>.*)</answer>$", re.DOTALL)


@dataclass
class SegRef:
    """One ``[SEG]``: its mask (scene frame + mask name in the scene's Facts), label, grounding, image.

    ``image`` indexes the record's image list (a SAR-only view of a pair uses frame 0's labels on image 0).
    """

    frame: int
    name: str
    label: str
    grounding: str
    image: int = 0


@dataclass
class Trace:
    parts: list[str] = field(default_factory=list)
    segs: list[SegRef] = field(default_factory=list)

    def say(self, text: str) -> Trace:
        self.parts.append(text)
        return self

    def seg(self, frame: int, name: str, label: str, grounding: str, image: int = 0) -> Trace:
        """Append `` [SEG]`` for mask ``name`` of ``frame`` (the label is the phrase that introduced it)."""
        self.parts.append(f" {SEG}")
        self.segs.append(SegRef(frame, name, label, grounding, image))
        return self

    def render(self, answer: str) -> str:
        think = "".join(self.parts).strip()
        return f"<think>{think}</think><answer>{answer}</answer>"


@dataclass
class ParsedTrace:
    think: str
    answer: str
    n_seg: int


def parse_target(target: str) -> ParsedTrace:
    """Split a target into its think and answer parts; ValueError naming what is malformed.

    RES targets are the bare ``[SEG]`` (no think/answer), as in referring-segmentation pretraining.
    """
    if target.strip() == SEG:
        return ParsedTrace("", "", 1)
    m = _TRACE.match(target)
    if not m:
        raise ValueError(f"trace is not <think>...</think><answer>...</answer>: {target[:80]!r}")
    think, answer = m.group("think"), m.group("answer")
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        if tag in think or tag in answer:
            raise ValueError(f"nested {tag} in trace")
    if SEG in answer:
        raise ValueError("[SEG] inside <answer>")
    if not answer.strip():
        raise ValueError("empty <answer>")
    return ParsedTrace(think, answer, think.count(SEG))


def image_tag(frame: int) -> str:
    return f"Image: t{frame}"


def check_image_order(seg_frames: list[int], n_images: int) -> bool:
    """True when the k-th [SEG] refers to image k mod n (only meaningful for series/change inputs)."""
    return all(f == k % n_images for k, f in enumerate(seg_frames))


def as_bool_mask(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool)
