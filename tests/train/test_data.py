"""Training sequences are built the way the runtime builds them, and the LM loss skips injected inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import generation
from model.configuration_terrascope import preset_config
from model.loading import random_model
from model.prompting import TokenizerWrapper
from model.tokenizer_train import corpus_texts, save_tokenizer, train_tokenizer
from model.training.data import ExampleBuilder, jitter_span, load_records, strip_letter
from model.training.losses import IGNORE_INDEX
from model.training.step import Banks, TrainingForward, collate, decode_all
from model.types import ImageInput

from .conftest import TINY_MODEL


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(corpus_texts([tiny_data]), 400, 1), tok_dir)
    tok = TokenizerWrapper(tok_dir)
    cfg = preset_config("terrascope-mini", **{k: v for k, v in TINY_MODEL.items()
                                                if k not in ("vision", "llm", "sam2")})
    data = {**cfg.to_dict(), **{k: {**cfg.to_dict()[k], **TINY_MODEL[k]} for k in ("vision", "llm", "sam2")}}
    data["llm"]["vocab_size"] = 448
    cfg = type(cfg).from_dict(data)
    model = random_model(cfg, "cpu", torch.float32, seed=0)
    records = load_records(tiny_data, ("train", "val"))
    builder = ExampleBuilder(cfg, tok, 1024)
    examples, errors = builder.build_all(records)
    assert not errors
    return tok, model, builder, examples, records


def _by_id(examples, rid):
    return next(e for e in examples if e.id == rid)


def test_images_and_prompt_match_the_runtime(setup):
    tok, model, _, examples, records = setup
    gen = generation.Generator(model, tok)
    for rid in ("ca0", "bce0", "sar0"):
        ex = _by_id(examples, rid)
        rec = next(r for r in records if r["id"] == rid)
        from model.training.data import read_image

        ims = [ImageInput(read_image(__import__("pathlib").Path(rec["_base"]) / im["path"]), im["role"])
               for im in rec["images"]]
        ctx = generation.prepare_images(model, ims)
        assert ctx.kind == ex.images.kind
        assert ctx.roles == ex.images.roles
        assert ctx.token_counts == ex.images.token_counts and ctx.offsets == ex.images.offsets
        assert [(lay.cols, lay.rows, lay.thumbnail) for lay in ctx.layouts] == \
               [(lay.cols, lay.rows, lay.thumbnail) for lay in ex.images.layouts]
        options = [strip_letter(c) for c in rec["choices"]] if rec.get("choices") else None
        assert gen.prompt_ids(ctx, rec["question"], options) == ex.prompt_ids


def test_labels_skip_prompt_regions_and_grounding(setup):
    tok, _, builder, examples, _ = setup
    ex = _by_id(examples, "ca0")
    assert ex.segs[0].local, "the building mask must select region tokens"
    seq = builder.sequence(ex, True, 0.0, np.random.default_rng(0))
    ids, labels = seq["ids"], seq["labels"]
    sp = tok.special_ids()
    span_ids = tok.encode(ex.segs[0].grounding)
    seg_at = seq["seg_pos"][0]
    k = len(ex.segs[0].local)
    assert ids[seg_at] == sp["seg"]
    assert ids[seg_at + 1:seg_at + 1 + k] == [sp["region"]] * k
    assert ids[seg_at + 1 + k:seg_at + 1 + k + len(span_ids)] == span_ids
    # positions that would predict the prompt, a region token or a span token are ignored
    n_prompt = len(ex.prompt_ids)
    assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt - 1])
    assert all(labels[p - 1] == IGNORE_INDEX for p in seq["region_pos"])
    span_start = seg_at + 1 + k
    assert all(labels[p - 1] == IGNORE_INDEX for p in range(span_start, span_start + len(span_ids)))
    # the [SEG] itself is a target, and after the span the trace continues as a target
    assert labels[seg_at - 1] == sp["seg"]
    assert labels[span_start + len(span_ids) - 1] == ids[span_start + len(span_ids)]
    # every target token is exactly the text pieces + [SEG] + <|im_end|>
    n_targets = sum(lab != IGNORE_INDEX for lab in labels)
    assert n_targets == sum(map(len, ex.pieces)) + ex.n_seg
    assert labels[-2] == sp["eos"] and labels[-1] == IGNORE_INDEX
    # without grounding the span is absent and the targets are unchanged
    seq2 = builder.sequence(ex, False, 0.0, np.random.default_rng(0))
    assert len(seq2["ids"]) == len(ids) - len(span_ids)
    assert [t for t in seq2["labels"] if t != IGNORE_INDEX] == [t for t in labels if t != IGNORE_INDEX]


def test_lm_loss_ignores_injected_tokens(setup):
    _, model, builder, examples, _ = setup
    exs = [_by_id(examples, r) for r in ("ca0", "bce0", "res1")]
    banks = Banks(examples, torch.device("cpu"))
    fwd = TrainingForward(model, banks).eval()
    batch = collate(exs, banks, builder, [True] * 3, 0.0, np.random.default_rng(0), pad_id=0)
    with torch.no_grad():
        base = fwd(batch)
        # the ids at region positions never matter: their embeddings are the visual tokens
        batch.ids[batch.reg_b, batch.reg_pos] = torch.randint(0, 300, (batch.reg_b.numel(),))
        same = fwd(batch)
        assert torch.equal(base["lm_loss"], same["lm_loss"])
        # the loss is the mean CE over exactly the target tokens
        _, hidden = fwd.encode(batch)
        logits = model.language_model.lm_head(hidden)
        mask = batch.labels != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[mask], batch.labels[mask])
        assert torch.allclose(manual, base["lm_loss"], atol=1e-6)
        assert int(base["n_tokens"]) == int(mask.sum())
        n_region = batch.reg_b.numel()
        assert n_region > 0 and not bool(mask[batch.reg_b, batch.reg_pos - 1].any())


def test_training_forward_matches_runtime_at_the_first_seg(setup):
    """Same prefix -> same [SEG] hidden state and the same SAM-2 mask logits as the generator."""
    tok, model, builder, examples, records = setup
    ex = _by_id(examples, "ca0")
    rec = next(r for r in records if r["id"] == "ca0")
    banks = Banks(examples, torch.device("cpu"))
    fwd = TrainingForward(model, banks).eval()
    batch = collate([ex], banks, builder, [False], 0.0, np.random.default_rng(0), pad_id=0)
    from pathlib import Path

    from model.api import TerraScope
    from model.training.data import read_image

    ts = TerraScope(model, tok, "test")
    prefix = rec["target"].split("[SEG]")[0] + "[SEG]"
    trace = generation.GenerationTrace()
    img = read_image(Path(rec["_base"]) / rec["images"][0]["path"])
    options = [strip_letter(c) for c in rec["choices"]]
    from model.types import GenerationSettings

    ts.answer([ImageInput(img)], rec["question"], options, forced_prefix=prefix, trace=trace,
              settings=GenerationSettings(max_new_tokens=len(tok.encode(prefix)) + 1, max_seg=1))
    with torch.no_grad():
        _, hidden = fwd.encode(batch)
        seg_h = hidden[batch.seg_b, batch.seg_pos]
        assert torch.allclose(seg_h[0], trace.segs[0]["hidden"][0], atol=1e-4)
        prompt = model.text_hidden_fcs(seg_h)
        from model.training.step import SAM2_MEAN, SAM2_STD, Sam2Features, normalize_pixels

        feats = model.sam2_encode(normalize_pixels(banks.sam[batch.sam_rows], SAM2_MEAN, SAM2_STD))
        per = Sam2Features([e[batch.seg_frame] for e in feats.image_embeddings], feats.image_pe)
        low, iou, _ = decode_all(model, per, prompt)
    best = int(iou[0].argmax())
    assert torch.allclose(low[0, best], trace.segs[0]["low_res"][0, 0], atol=1e-3)
    assert torch.allclose(iou[0], trace.segs[0]["iou"][0], atol=1e-5)


def test_jitter_span_scales_numbers():
    rng = np.random.default_rng(1)
    span = " [area 12.31 ha, 4.2% of valid area, 7 objects]"
    assert jitter_span(span, 0.0, rng) == span
    out = jitter_span(span, 0.2, rng)
    import re

    a, p, n = (float(x) for x in re.findall(r"\d+(?:\.\d+)?", out))
    assert out != span and 12.31 * 0.8 <= a <= 12.31 * 1.2 and 4.2 * 0.79 <= p <= 4.2 * 1.21
    assert abs(a / 12.31 - p / 4.2) < 0.03  # area and share move together
    assert 5 <= n <= 9 and out.count(".") == span.count(".")


def test_restated_value_follows_the_jittered_span(setup):
    """With span jitter, the value the trace restates is read from the jittered span (copying is what the
    target teaches); without a span or without jitter the trace is the record's own."""
    import re

    tok, _, builder, examples, records = setup
    ex = _by_id(examples, "ca0")
    rec = next(r for r in records if r["id"] == "ca0")
    assert ex.restate is not None and ex.restate.op == "coverage" and ex.restate.piece == 1
    written = rec["check"]["value_text"]

    def text_after_seg(seq: dict) -> str:
        ids = seq["ids"]
        seg_at = seq["seg_pos"][0]
        targets = [ids[t + 1] for t in range(seg_at, len(ids) - 1) if seq["labels"][t] != IGNORE_INDEX]
        return tok.decode(targets)

    def span_in(seq: dict) -> str:
        return tok.decode(seq["ids"][seq["seg_pos"][0] + 1:])

    rng = np.random.default_rng(0)
    assert written in text_after_seg(builder.sequence(ex, False, 0.3, rng))
    assert builder.sequence(ex, True, 0.0, rng)["ids"] == builder.sequence(ex, True, 0.0, rng)["ids"]
    assert written in text_after_seg(builder.sequence(ex, True, 0.0, rng))
    changed = 0
    for _ in range(10):
        seq = builder.sequence(ex, True, 0.3, rng)
        span_pct = re.search(r"(\d+\.\d)% of valid area", span_in(seq)).group(1)
        after = text_after_seg(seq)
        assert f"They cover {span_pct}%." in after, after
        changed += span_pct + "%" != written
    assert changed >= 5
    # a record whose span is rounder than the written value gets no restatement
    from model.training.data import find_restatement

    coarse = {**rec, "seg_masks": [{**rec["seg_masks"][0], "grounding": " [area 0.01 ha, 9.9% of valid area, 1 object]"}]}
    assert find_restatement(coarse, rec["target"].split("[SEG]")) is None


def test_mask_losses():
    from model.training.losses import dice_bce_per_mask, mask_iou

    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 2:6] = 1.0
    good = (target * 40 - 20)[:, None].repeat(1, 3, 1, 1)
    good[:, 1] = -good[:, 1]  # candidate 1 is the complement
    loss = dice_bce_per_mask(good, target)
    assert loss.shape == (2, 3)
    assert float(loss[:, 0].max()) < 0.02 and float(loss[:, 1].min()) > 1.0
    assert torch.allclose(mask_iou(good[:, 0], target), torch.ones(2))
    assert torch.allclose(mask_iou(good[:, 1], target), torch.zeros(2))
    with pytest.raises(ValueError, match="differ"):
        dice_bce_per_mask(good, target[:, :4])


def test_forward_backward_under_bf16_autocast(setup):
    """fp32 master weights + bf16 autocast (the GPU recipe; CPU autocast catches dtype mix-ups here)."""
    _, model, builder, examples, _ = setup
    model.requires_grad_(True)
    exs = [_by_id(examples, r) for r in ("ca0", "bce0", "sar0", "res1")]
    banks = Banks(examples, torch.device("cpu"))
    fwd = TrainingForward(model, banks)
    batch = collate(exs, banks, builder, [True] * 4, 0.1, np.random.default_rng(0), pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fwd(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.grounding_encoder.mask_decoder.iou_token.weight.grad is not None
    assert model.vision_model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def test_cached_frozen_encoders_give_the_same_losses(setup):
    from model.training.step import vit_features

    _, model, builder, examples, _ = setup
    exs = [_by_id(examples, r) for r in ("ca0", "bce0", "sar0", "res1")]
    banks = Banks(examples, torch.device("cpu"))
    fwd = TrainingForward(model, banks).eval()
    batch = collate(exs, banks, builder, [True] * 4, 0.0, np.random.default_rng(0), pad_id=0)
    with torch.no_grad():
        x = torch.randn(2, 3, 112, 112)
        assert torch.allclose(model.mlp1(vit_features(model, x)), model.extract_feature(x), atol=1e-6)
        ref = fwd(batch)
        banks.build_caches(model, vit=True, sam=True, dtype=torch.float32, chunk=3)
        assert banks.vit_cache.shape[0] == banks.tiles.shape[0] and len(banks.sam_cache) == 3
        cached = fwd(batch)
        banks.drop_caches()
    for k in ("lm_loss", "seg_loss", "aux_loss"):
        assert torch.allclose(ref[k], cached[k], atol=1e-5), k


def test_option_redraw_names_the_option_nearest_the_span(setup):
    """Redrawn records get fresh options around the true value; the trace restates the (jittered) span and
    names the option nearest it, as the worker's measured choice would; without a span, the true option."""
    import re

    from model.data.numbers import parse_number, well_separated

    tok, _, builder, _, records = setup
    rec = dict(next(r for r in records if r["id"] == "ca0"))
    true = rec["check"]["value_text"]
    rec["target"] = (f"<think>I first identify the buildings [SEG]. They cover {true}. The option that matches is "
                     f"{rec['answer']} ({true}).</think><answer>{rec['answer']}</answer>")
    ex = builder.build(rec)
    assert ex.options is not None and ex.options.op == "coverage"

    def read(seq: dict) -> tuple[dict[str, float], str, str, str]:
        seg_at = seq["seg_pos"][0]
        prompt = tok.decode(seq["ids"][:seg_at])
        opts = {m.group(1): float(m.group(2)) for m in re.finditer(r"\b([A-D])\. (\d+(?:\.\d+)?)%", prompt)}
        after = tok.decode([seq["ids"][t + 1] for t in range(seg_at, len(seq["ids"]) - 1)
                            if seq["labels"][t] != IGNORE_INDEX])
        span = tok.decode(seq["ids"][seg_at + 1:])
        return opts, after, span, re.search(r"<answer>\s*([A-D])", after).group(1)

    rng = np.random.default_rng(1)
    seen_sets, followed_span = set(), 0
    for _ in range(40):
        seq = builder.sequence(ex, True, 0.0, rng, 1.0, 0.6)
        assert all(seq["ids"][p] == builder.img_id for p in seq["img_pos"])
        opts, after, span, letter = read(seq)
        assert len(opts) == 4 and well_separated(list(opts.values()))
        assert parse_number(true) in opts.values()  # drawn around the truth, as the bench does
        seen_sets.add(tuple(sorted(opts.values())))
        measured = float(re.search(r"(\d+\.\d)% of valid area", span).group(1))
        assert f"They cover {measured:.1f}%." in after  # the restated value is the span's
        nearest = min(opts, key=lambda k: abs(opts[k] - measured))
        assert letter == nearest, (opts, measured, after)
        listing = ", ".join(f"{k} {v:.1f}%" for k, v in sorted(opts.items()))
        assert f"The options are {listing}; the nearest is {letter} ({opts[letter]:.1f}%)." in after, after
        followed_span += opts[letter] != parse_number(true)
    assert len(seen_sets) > 10 and followed_span >= 3  # fresh options; the letter follows a far-off span
    for _ in range(10):  # no span in the input: the true value and its option
        opts, after, _, letter = read(builder.sequence(ex, False, 0.0, rng, 1.0, 0.6))
        assert opts[letter] == parse_number(true) and f"They cover {true}." in after
    assert builder.sequence(ex, True, 0.0, rng)["ids"] == builder.sequence(ex, True, 0.0, rng)["ids"]  # redraw off
    for _ in range(10):  # with marks, each listed option is tagged against the restated value
        seq = builder.sequence(ex, True, 0.0, rng, 1.0, 0.6, True)
        opts, after, span, letter = read(seq)
        measured = float(re.search(r"(\d+\.\d)% of valid area", span).group(1))
        tags = ", ".join(f"{k} {v:.1f}% ({'above' if v > measured else 'below' if v < measured else 'equal'})"
                         for k, v in sorted(opts.items()))
        assert f"The options are {tags}; the nearest is {letter} (" in after, after


def test_options_bucket_draws_the_redrawable_records(setup):
    from model.training.config import StageConfig
    from model.training.loop import StageSampler

    _, _, _, examples, _ = setup
    stage = StageConfig("s", ["res", "l1", "l2", "cap"], ["projector"], max_steps=1, option_redraw=1.0,
                        kind_weights={"options": 3.0, "res": 1.0})
    sampler = StageSampler(examples, stage, seed=0)
    drawn = sampler.draw(400)
    with_plan = sum(ex.options is not None for ex in drawn)
    assert all(ex.options is not None or ex.kind == "res" for ex in drawn)
    assert 0.65 < with_plan / len(drawn) < 0.85  # 3 : 1
    assert {ex.kind for ex in drawn if ex.options is None} == {"res"}


def test_measured_answer_in_the_span_is_input_and_redraw_drops_it(setup):
    """A span's "measured answer" note is read, never predicted; option redraw names its own letter from the
    jittered value, so the record's note (for the record's own options) is left out there."""
    from model.prompting import with_measured_answer

    tok, _, builder, _, records = setup
    rec = json.loads(json.dumps(next(r for r in records if r["id"] == "ca0")))
    seg = rec["seg_masks"][0]
    seg["grounding"] = with_measured_answer(seg["grounding"], rec["answer"])
    ex = builder.build(rec)
    seq = builder.sequence(ex, True, 0.0, np.random.default_rng(0))
    span_ids = tok.encode(seg["grounding"])
    start = seq["seg_pos"][0] + 1 + len(ex.segs[0].local)
    assert seq["ids"][start:start + len(span_ids)] == span_ids
    assert all(seq["labels"][p - 1] == IGNORE_INDEX for p in range(start, start + len(span_ids)))
    rng = np.random.default_rng(1)
    for _ in range(5):
        redrawn = builder.sequence(ex, True, 0.0, rng, 1.0, 0.6)
        assert "measured answer" not in tok.decode(redrawn["ids"])
