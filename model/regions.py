"""Regions that a phrase defines exactly: each [SEG] mask is projected onto what its phrase allows.

Why: SAM-2 draws a [SEG] mask from one hidden state, and nothing in the decoder makes "the largest building" a
single object, keeps "the buildings in the eastern half" out of the western half, or stops "the other
buildings" from including the largest one. These phrases are functions of a class mask (the Terra-CoT data
builds its ground truth this way, model/data/l2.py: 4-connected objects and ``half_mask`` halves),
so a mask that breaks them is wrong by definition. The rules apply to the phrase that introduced the [SEG]
(``prompting.seg_label``) before the mask's visual tokens are chosen, so the mask a user gets, the tokens the
model reads back and every measurement agree. A phrase no rule names leaves the mask as the decoder drew it.

* "... in the northern|southern|eastern|western half": the mask cut to that image half; an earlier mask of
  the same answer and image whose phrase names the same thing in another half adds its pixels first (the
  decoder's pixels of that thing there are evidence too).
* "the largest|biggest ...": the mask's largest 4-connected object.
* "the other / remaining / rest of the ..." after a "largest" mask of the same thing: this mask and the rest of
  that earlier mask, without the objects (8-connected) that touch the largest one.

With terrascope-mini they lifted the best-match IoU of "largest building" masks from 0.43 to 0.62, "other
buildings" from 0.32 to 0.45 and half regions from 0.36 to 0.57 on a bench from its training tiles (where the
rules were checked), and from 0.31 to 0.40, 0.21 to 0.29 and 0.21 to 0.34 on the held-back bench
(docs/TRAINING.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

HALF = re.compile(r"\bin the (north|south|east|west)ern half\b", re.IGNORECASE)
LARGEST = re.compile(r"\b(?:largest|biggest)\b", re.IGNORECASE)
OTHER = re.compile(r"\b(?:other|remaining|rest)\b", re.IGNORECASE)
_THING_BEFORE_HALF = re.compile(r"(\w+)\s+in the (?:north|south|east|west)ern half\b", re.IGNORECASE)

_FILLER = {"the", "and", "of", "in", "one", "ones", "patch", "patches", "area", "areas"}
_CONNECTIVITY4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
_CONNECTIVITY8 = np.ones((3, 3), dtype=bool)


@dataclass
class Drawn:
    """One earlier mask of the answer: its phrase, image, the decoder's mask and the projected one."""

    label: str
    image: int
    raw: np.ndarray
    mask: np.ndarray


def half_mask(shape: tuple[int, ...], which: str) -> np.ndarray:
    """Boolean mask of one image half (north = top rows; the middle row / column of an odd size goes south /
    east). The one definition: the data synthesis, worker/resolve.py and the rules below use it."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), bool)
    rows = {"north": slice(0, h // 2), "south": slice(h // 2, h)}
    cols = {"west": slice(0, w // 2), "east": slice(w // 2, w)}
    if which in rows:
        out[rows[which]] = True
    elif which in cols:
        out[:, cols[which]] = True
    else:
        raise ValueError(f"unknown image half {which!r} (north, south, east or west)")
    return out


def largest_object(mask: np.ndarray) -> np.ndarray:
    """The mask's largest 4-connected object ("the largest X" in the data); the mask itself when empty."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=_CONNECTIVITY4)
    if n == 0:
        return np.asarray(mask, bool)
    return lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1


def without_objects_touching(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``mask`` minus its 8-connected objects that overlap ``other``."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=_CONNECTIVITY8)
    if n == 0:
        return np.asarray(mask, bool)
    hit = np.unique(lab[other & (lab > 0)])
    return (lab > 0) & ~np.isin(lab, hit)


def _thing_before_half(label: str) -> str | None:
    m = _THING_BEFORE_HALF.search(label)
    return m.group(1).lower() if m else None


def _same_thing(largest_label: str, other_label: str) -> bool:
    """Do "the largest building" and "the other buildings" name one thing? A word after each keyword shares
    its first four letters (building / buildings, body / bodies), so "the other bank" after "the largest
    field" is left alone."""
    def words(label: str, keyword: re.Pattern[str]) -> set[str]:
        m = keyword.search(label)
        tail = label[m.end():] if m else ""
        return {w[:4].lower() for w in re.findall(r"[A-Za-z]{3,}", tail) if w.lower() not in _FILLER}
    return bool(words(largest_label, LARGEST) & words(other_label, OTHER))


def project(label: str, image: int, mask: np.ndarray, earlier: list[Drawn]) -> tuple[np.ndarray, str | None]:
    """The mask the phrase ``label`` allows, and which rule applied (None: the decoder's mask unchanged).

    ``earlier``: this answer's earlier masks, in order; only those on the same image and grid are used."""
    mask = np.asarray(mask, bool)
    same = [d for d in earlier if d.image == image and d.raw.shape == mask.shape]
    out, rules = mask, []
    half = HALF.search(label)
    if half:
        which = half.group(1).lower()
        thing = _thing_before_half(label)
        for d in same:
            if thing and HALF.search(d.label) and _thing_before_half(d.label) == thing:
                out = out | d.raw
        out = out & half_mask(mask.shape, which)
        rules.append(f"{which}ern half")
    if LARGEST.search(label):
        out = largest_object(out)
        rules.append("largest object")
    elif OTHER.search(label):
        big = next((d for d in reversed(same) if LARGEST.search(d.label) and _same_thing(d.label, label)), None)
        if big is not None:
            out = without_objects_touching(out | big.raw, big.mask)
            rules.append("objects other than the largest")
    return out, (", ".join(rules) if rules else None)


def resample(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` on another pixel grid of the same image (nearest neighbour; the same array when it fits)."""
    h, w = int(shape[0]), int(shape[1])
    if mask.shape == (h, w):
        return mask
    rows = np.minimum((np.arange(h) + 0.5) * mask.shape[0] / h, mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * mask.shape[1] / w, mask.shape[1] - 1).astype(int)
    return mask[rows[:, None], cols[None, :]]
