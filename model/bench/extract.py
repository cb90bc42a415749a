"""Option extraction, as the official TerraScope-Bench evaluation does it.

Official code (``infer_terrascope_bench.extract_answer`` then ``eval_terrascope_bench.norm_ans``):
take the ``<answer>...</answer>`` content (or the whole response when the tags are missing); if it
starts with a letter A-D (optionally followed by "." or ")") that letter is the choice. Note the
official pattern has no word boundary: an answer "Developed land" reads as "D"; we keep that.
Otherwise the first stand-alone letter A-D inside ``<answer>`` (the evaluation script's own fallback),
else the whole response, upper-cased (which only matches when it *is* the letter).
"""

from __future__ import annotations

import re

_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_LEADING = re.compile(r"^\s*([A-Da-d])[\.\)]?\s*")
_STANDALONE = re.compile(r"\b([A-D])\b", re.IGNORECASE)


def extract_choice(response: str | None) -> str:
    """The predicted option letter, or the normalised response text when no letter can be found."""
    if not response:
        return ""
    m = _ANSWER.search(response)
    inner = m.group(1).strip() if m else response.strip()
    lead = _LEADING.match(inner)
    if lead:
        return lead.group(1).upper()
    if m:
        alone = _STANDALONE.search(inner)
        if alone:
            return alone.group(1).upper()
    return response.strip().upper()


def is_correct(response: str | None, answer: str) -> bool:
    gt = answer.strip().upper()
    return bool(gt) and extract_choice(response) == gt
