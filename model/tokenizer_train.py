"""Train the small byte-level BPE tokenizer of our own TerraScope models (terrascope-mini).

The official release uses Qwen2.5's 151k-entry vocabulary; an embedded model cannot afford a
151k x hidden embedding, so we train a small vocabulary (2-8k) on the Terra-CoT corpus with the same
pipeline as Qwen2 (NFC, the Qwen2 split regex with single digits, byte-level), then append the special
tokens in the official order. Single-digit pre-tokenisation matters: the model must compare the numbers of
a measurement span with the numbers of the options digit by digit.

Usage: ``python -m model.tokenizer_train --data DATASET_DIR_OR_JSONL... --out DIR [--vocab-size 4096]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

#: Qwen2's pre-tokeniser pattern (same as the official checkpoint's tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Special tokens in the official order: Qwen2.5 chat tokens, InternVL tokens, TerraScope tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    "<think>", "</think>", "<answer>", "</answer>", "[SEG]", "<REGION>", "<p>", "</p>", "<vp>", "</vp>",
    "<|end|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: Text that every prompt contains whatever the corpus (kept in the corpus so it tokenises compactly).
_FIXED_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "Answer with the option's letter from the given choices directly. Options: Image: t0 t1 t2 t3 "
    "optical SAR before after user assistant system\n"
)
_RECORD_FIELDS = ("question", "target", "answer", "grounding")


def _strip_specials(text: str) -> str:
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, " ")
    return text


def record_texts(rec: dict) -> Iterator[str]:
    """The text of one dataset record (question, options, target trace, grounding spans)."""
    for key in _RECORD_FIELDS:
        val = rec.get(key)
        if isinstance(val, str) and val:
            yield _strip_specials(val)
    for choice in rec.get("choices") or []:
        if isinstance(choice, str):
            yield choice
    for seg in rec.get("seg_masks") or []:
        if isinstance(seg, dict) and isinstance(seg.get("grounding"), str):
            yield seg["grounding"]


def _jsonl_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted([*p.rglob("*.jsonl"), *p.rglob("*.jsonl.gz")]))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"tokenizer corpus path does not exist: {p}")
    if not out:
        raise ValueError(f"no .jsonl corpus files found under {[str(p) for p in paths]}")
    return out


def corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every text of every record in the given JSONL files/folders (plus the fixed prompt text)."""
    yield _FIXED_TEXT
    for f in _jsonl_files(paths):
        if f.suffix == ".gz":
            import gzip

            lines = gzip.decompress(f.read_bytes()).decode("utf-8").splitlines()
        else:
            lines = f.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{f}:{n}: not valid JSON ({exc.msg})") from None
            if isinstance(rec, dict):
                yield from record_texts(rec)
            else:
                yield str(rec)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries in total, special tokens appended last."""
    if not 256 + len(SPECIAL_TOKENS) < vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in ({256 + len(SPECIAL_TOKENS)}, 65536], got {vocab_size}")
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def save_tokenizer(tok: Tokenizer, out: str | Path, model_max_length: int = 8192) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (transformers-loadable)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    cfg = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
        "additional_special_tokens": cfg["additional_special_tokens"],
    }, indent=2) + "\n", encoding="utf-8")
    return out


def load_tokenizer(folder: str | Path):
    """The saved tokenizer as a transformers ``PreTrainedTokenizerFast`` (what the runtime uses)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.tokenizer_train", description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, help="dataset folders or JSONL files")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--min-frequency", type=int, default=2)
    a = ap.parse_args(argv)
    try:
        tok = train_tokenizer(corpus_texts(a.data), a.vocab_size, a.min_frequency)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_tokenizer(tok, a.out)
    print(f"tokenizer: {tok.get_vocab_size()} entries -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
