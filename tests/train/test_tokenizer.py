"""The trained tokenizer: specials are single ids in the official order, digits are single tokens."""

from __future__ import annotations

import json

import pytest

from model.tokenizer_train import SPECIAL_TOKENS, corpus_texts, load_tokenizer, main, train_tokenizer

RECORDS = [
    {"question": "What share of the tile is covered by buildings?", "choices": ["A. 12.5%", "B. 31.0%"],
     "target": "<think>I first identify the building regions [SEG] and measure them.</think><answer>A</answer>",
     "answer": "A"},
    {"question": "How many water bodies are there?", "target": "<think>The water [SEG]</think><answer>3</answer>"},
] * 20


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return p


def test_trained_tokenizer_round_trip(corpus, tmp_path):
    out = tmp_path / "tok"
    assert main(["--data", str(corpus), "--out", str(out), "--vocab-size", "600"]) == 0
    tok = load_tokenizer(out)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == sorted(ids) and len(set(ids)) == len(SPECIAL_TOKENS)  # appended in the official order
    assert ids[-1] == len(tok) - 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "<think>the building regions [SEG]<REGION> [area 12.31 ha, 4.2% of valid area]</think><answer>B</answer>"
    enc = tok.encode(text)
    assert tok.decode(enc) == text
    assert enc.count(tok.convert_tokens_to_ids("[SEG]")) == 1
    # every digit is its own token, so numbers compare digit by digit
    digits = tok.encode("12.31")
    assert [tok.decode([i]) for i in digits] == ["1", "2", ".", "3", "1"]
    # a frequent corpus word became a single merge (the BPE actually learned something)
    assert len(tok.encode(" building")) == 1


def test_corpus_reads_every_field_and_rejects_bad_json(corpus, tmp_path):
    texts = list(corpus_texts([corpus]))
    assert any("[SEG]" not in t and "building regions" in t for t in texts)  # specials stripped
    assert any(t == "A. 12.5%" for t in texts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        list(corpus_texts([bad]))
    with pytest.raises(FileNotFoundError):
        list(corpus_texts([tmp_path / "missing.jsonl"]))


def test_vocab_size_bounds():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
