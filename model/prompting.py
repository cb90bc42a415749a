"""Prompts, the tokenizer wrapper, <think>/<answer> parsing and option-letter extraction.

Two templates:
* ``qwen_chat`` (official checkpoints): ``<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n``
  where ``input`` is the release demo's instruction + ``<image>\\n`` + question + one ``X. option`` line each;
  ``<image>`` becomes ``<img><IMG_CONTEXT>*n</img>`` (several images: one block each, joined by ``\\n``).
* ``terrascope`` (our checkpoints): same chat markers, a short system turn, and every image block labelled
  with its role (``Image: t0``), which is what lets the model route a [SEG] with an ``Image: t_i`` marker.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from .configuration_terrascope import SPECIAL_TOKENS

#: The instruction the release's demo and benchmark scripts put before every question.
OFFICIAL_INSTRUCTION = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in their mind and then provides the user a "
    "concise final answer in a short word or phrase. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
    "</think><answer> answer here </answer>\n\n"
)
NATIVE_SYSTEM = (
    "You are TerraScope, an Earth-observation analyst. Think step by step inside <think> </think>, "
    "segment each region you reason about with [SEG], then give the final answer inside <answer> </answer>."
)
OPTION_LETTERS = "ABCDEFGH"
#: Special tokens removed from the reasoning / answer text shown to users.
_STRIP_TOKENS = ("[SEG]", "<REGION>", "<think>", "</think>", "<answer>", "</answer>", "<|im_end|>",
                 "<|endoftext|>", "<|end|>", "<p>", "</p>")
_MARKER = re.compile(r"Image:\s*(t\d+|optical|sar)\b", re.IGNORECASE)


class TokenizerWrapper:
    """A ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (no remote code, no transformers glue)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: tokenizer.json not found")
        self.tok = Tokenizer.from_file(str(file))
        self.path = file

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of several texts in one call (the Rust side runs them in parallel, outside the GIL)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        idx = self.tok.token_to_id(token)
        if idx is None:
            raise ValueError(f"tokenizer {self.path} has no token {token!r}")
        return idx

    def special_ids(self) -> dict[str, int]:
        return {key: self.token_id(tok) for key, tok in SPECIAL_TOKENS.items()}


def image_block(n_tokens: int) -> str:
    return f"{SPECIAL_TOKENS['img_start']}{SPECIAL_TOKENS['img_context'] * n_tokens}{SPECIAL_TOKENS['img_end']}"


def options_text(options: list[str] | None) -> str:
    if not options:
        return ""
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options are supported, got {len(options)}")
    return "".join(f"{OPTION_LETTERS[i]}. {strip_option_label(opt, OPTION_LETTERS[i])}\n"
                   for i, opt in enumerate(options))


def strip_option_label(option: str, letter: str) -> str:
    """Users and bench files write options as "A. water"; the prompt adds the letter itself, so drop a
    leading label that matches the option's own letter ("A. ", "A) ", "(A) ", "A: ") rather than print "A. A. water"."""
    m = re.match(rf"\s*\(?{letter}[.):]\s+", option)
    return option[m.end():] if m else option.strip()


def build_prompt(template: str, question: str, options: list[str] | None, token_counts: list[int],
                 roles: list[str]) -> str:
    """The full prompt text (image placeholders expanded) for one question."""
    if not question.strip():
        raise ValueError("the question is empty")
    if len(token_counts) != len(roles):
        raise ValueError("one role per image is required")
    body = f"{question}\n{options_text(options)}"
    if template == "qwen_chat":
        images = "\n".join(image_block(n) for n in token_counts)
        user = OFFICIAL_INSTRUCTION + images + "\n" + body
        return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if template == "terrascope":
        if len(token_counts) == 1:
            images = image_block(token_counts[0])
        else:
            images = "\n".join(f"Image: {role}\n{image_block(n)}" for role, n in zip(roles, token_counts))
        return (f"<|im_start|>system\n{NATIVE_SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{images}\n{body}<|im_end|>\n<|im_start|>assistant\n")
    raise ValueError(f"unknown template {template!r}")


def clean(text: str) -> str:
    for tok in _STRIP_TOKENS:
        text = text.replace(tok, " ")
    return re.sub(r"[ \t]+", " ", re.sub(r" *\n *", "\n", text)).strip()


def parse_response(text: str) -> tuple[str, str]:
    """(reasoning, answer): the <think> part and the <answer> part, special tokens removed.

    Without an <answer> tag the answer is the text after </think> (or the whole text when there is no tag
    at all), so callers always get something to show.
    """
    think = re.search(r"<think>(.*?)(?:</think>|<answer>|$)", text, flags=re.DOTALL)
    reasoning = clean(think.group(1)) if think else ""
    ans = re.search(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.DOTALL | re.IGNORECASE)
    if ans:
        answer = clean(ans.group(1))
    elif "</think>" in text:
        answer = clean(text.split("</think>", 1)[1])
    elif think:
        answer = ""
    else:
        answer = clean(text)
    return reasoning, answer


def extract_choice(text: str, n_options: int = 4) -> str | None:
    """Option letter as the release's evaluation extracts it.

    1. ``infer_terrascope_bench.extract_answer``: the text inside <answer>...</answer> (else the whole
       response), matched with ``^\\s*([A-Da-d])[.)]?\\s*`` - a leading letter, case-insensitive;
    2. ``eval_terrascope_bench.maybe_parse_from_response``: the first ``\\b[A-D]\\b`` inside <answer>
       (case-insensitive);
    3. the first standalone capital letter in the whole response (the demo's last resort; we keep it
       case-sensitive so the article "a" in the reasoning does not count).
    Letters beyond the number of options are ignored (A-D for 4 options, A-E for 5, ...).
    """
    n = max(1, min(n_options, len(OPTION_LETTERS)))
    letters = OPTION_LETTERS[:n]
    cls = f"[{letters}{letters.lower()}]"
    block = re.search(r"<answer>\s*(.*?)\s*</answer>", text, flags=re.DOTALL | re.IGNORECASE)
    raw = block.group(1).strip() if block else text.strip()
    lead = re.match(rf"^\s*({cls})[\.\)]?\s*", raw)
    if lead:
        return lead.group(1).upper()
    if block:
        inner = re.search(rf"\b({cls})\b", block.group(1))
        if inner:
            return inner.group(1).upper()
    whole = re.search(rf"\b([{letters}])\b", clean(text))
    return whole.group(1) if whole else None


def route_marker(text: str) -> str | None:
    """The role named by the last ``Image: <role>`` marker in ``text`` (``t3``, ``optical``, ``sar``)."""
    found = _MARKER.findall(text)
    return found[-1].lower() if found else None


_SPAN = re.compile(r"\[(?!SEG\])[^\[\]]*\]")


def seg_label(text_before: str) -> str:
    """The phrase that introduced a [SEG]: text since the previous region, last clause, tokens removed."""
    part = text_before.rstrip().removesuffix("[SEG]")
    for sep in ("[SEG]", "<REGION>"):
        part = part.rsplit(sep, 1)[-1]
    # the measurement span injected after the previous mask (" [area 0.16 ha, 27.0% of valid area, ...]") is
    # worker input, not the model's words: drop it before splitting clauses at its decimal points
    part = _SPAN.sub(" ", part)
    part = clean(_MARKER.sub(" ", part))
    clause = re.split(r"[.;:\n!?]", part)[-1].strip(" ,")
    return clause or part.strip()


# The measured answer the worker appends to a grounding span ("[...; measured answer B]", worker/resolve.py);
# here, free of the worker's geodesy, because the training machine rewrites spans too.
MEASURED_ANSWER = re.compile(r"; measured answer ([A-H])\]$")


def with_measured_answer(span: str, letter: str) -> str:
    """``span`` ("[... objects]") with "; measured answer <letter>" before its closing bracket (once)."""
    if not span.endswith("]") or MEASURED_ANSWER.search(span):
        return span
    return f"{span[:-1]}; measured answer {letter}]"


def strip_measured_answer(span: str) -> str:
    return MEASURED_ANSWER.sub("]", span)
