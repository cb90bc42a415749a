"""The fast decode path (model/fast_decode.py) against the reference loop, on CPU with tiny random models.

Same greedy traces, masks, selected tokens and stop reasons as ``Generator.run``; the static cache after an
injection equals a full recompute; batches sharing an image prefix give each question's single answer. A
CUDA test (skipped without a GPU) checks the graph replays against the eager steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rand_image, tiny_scope

from model import fast_decode as fd
from model.api import TerraScope
from model.generation import GenerationTrace
from model.types import GenerationSettings, ImageInput

SEG2 = "<think>I first find the water [SEG] then the roads [SEG]"


@torch.no_grad()
def sharp_scope(seed: int = 0, **overrides) -> TerraScope:
    """A tiny model whose greedy choices and masks are far from ties (random init is nearly uniform)."""
    ts = tiny_scope(seed, **overrides)
    gen = torch.Generator().manual_seed(seed + 7)
    for _, p in ts.model.language_model.named_parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.12, generator=gen)
    for name, p in ts.model.grounding_encoder.mask_decoder.named_parameters():
        if "output_hypernetworks_mlps" in name and "proj_out" in name:
            p.mul_(8.0)  # mask logits well away from 0 except along mask boundaries
    return ts


def naive(ts: TerraScope, ctx, question: str, settings: GenerationSettings, **kw):
    """The reference loop; its trace keeps each mask's probabilities for ``assert_same``."""
    trace = GenerationTrace()
    res = ts.generator.run(ctx, question, None, settings, trace=trace, **kw)
    res.probs = [seg["probs"].numpy() for seg in trace.segs]
    return res


def assert_same(a, b) -> None:
    """Same ids, text, stop, selections; masks equal except pixels whose reference probability is within
    1e-3 of the 0.5 threshold (the two paths' attention kernels round differently, ~1e-6)."""
    assert a.token_ids == b.token_ids
    assert a.stopped == b.stopped
    assert a.text == b.text
    assert len(a.steps) == len(b.steps)
    for x, y in zip(a.steps, b.steps):
        assert x.image_index == y.image_index
        assert x.token_indices == y.token_indices
        assert x.modality == y.modality
        assert x.label == y.label
        assert x.grounding_text == y.grounding_text
        assert x.region_rule == y.region_rule
        assert x.mask.shape == y.mask.shape
        diff = x.mask != y.mask
        if hasattr(a, "probs"):
            near = np.abs(a.probs[x.step] - 0.5) < 1e-3
            assert not (diff & ~near).any(), "masks differ away from the threshold"
        else:
            assert not diff.any()
        assert diff.mean() < 1e-3
        assert x.score == pytest.approx(y.score, abs=1e-5)


@pytest.mark.parametrize("prefill_attention", ["sdpa", "bmm"])
@pytest.mark.parametrize("compat", ["native", "official"])
def test_fast_and_naive_give_identical_traces_and_masks(compat, prefill_attention, monkeypatch):
    """Both attentions of multi-token steps: SDPA (eager prompts) and bmm (what the injection graphs run)."""
    monkeypatch.setattr(fd.FastDecoder, "prefill_attention", prefill_attention)
    ts = sharp_scope(compat=compat)
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    forced = ts.tokenizer.encode(SEG2)
    ground = lambda step: f" area {step.step + 1}.5 ha"
    for kw in ({}, {"grounding": ground}):
        s = GenerationSettings(max_new_tokens=50)
        a = naive(ts, ctx, "Where is the water?", s, forced_ids=forced, **kw)
        deltas: list[str] = []
        b = fd.fast_run(ts.generator, ctx, "Where is the water?", None, s, forced_ids=forced,
                        on_token=deltas.append, **kw)
        assert len(a.steps) >= 2 and a.steps[0].mask.any() and a.steps[0].token_indices
        assert_same(a, b)
        assert "".join(deltas) == ts.tokenizer.decode(b.token_ids)
    # free greedy decoding (no forcing) follows the same path too
    s = GenerationSettings(max_new_tokens=24)
    assert_same(naive(ts, ctx, "Describe the scene.", s), fd.fast_run(ts.generator, ctx, "Describe the scene.",
                                                                      None, s))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_phrase_rules_shape_masks_the_same_on_both_paths(device):
    """model/regions.py runs inside the shared [SEG] handling: the fast path (CUDA graphs on a GPU) applies the
    same rules."""
    ts = sharp_scope()
    ts.model.to(device)
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    forced = ts.tokenizer.encode("<think>I segment the largest building [SEG] and the other buildings [SEG] and "
                                 "the buildings in the western half [SEG]")
    s = GenerationSettings(max_new_tokens=80, region_rules=True)
    a = naive(ts, ctx, "How far apart are they?", s, forced_ids=forced)
    b = fd.fast_run(ts.generator, ctx, "How far apart are they?", None, s, forced_ids=forced)
    assert [x.region_rule for x in a.steps] == ["largest object", "objects other than the largest", "western half"]
    assert_same(a, b)


def test_pair_series_and_no_injection_match():
    ts = sharp_scope()
    pair = ts.prepare([ImageInput(rand_image(64, 96, seed=3), "optical"), ImageInput(rand_image(64, 96, seed=4),
                                                                                     "sar")])
    series = ts.prepare([ImageInput(rand_image(64, 64, seed=s), f"t{s}") for s in range(3)])
    s = GenerationSettings(max_new_tokens=60)
    f_pair = ts.tokenizer.encode(SEG2)
    f_series = ts.tokenizer.encode("<think>Image: t2 [SEG] Image: t0 [SEG]")
    for ctx, forced in ((pair, f_pair), (series, f_series)):
        assert_same(naive(ts, ctx, "What changed?", s, forced_ids=forced),
                    fd.fast_run(ts.generator, ctx, "What changed?", None, s, forced_ids=forced))
    # injection "none": nothing is fed after a [SEG]; decoding resumes from the [SEG] step's own logits
    s_none = GenerationSettings(max_new_tokens=30, injection="none")
    a = naive(ts, pair, "q", s_none, forced_ids=f_pair)
    assert len(a.steps) == 2 and not a.steps[0].token_indices
    assert_same(a, fd.fast_run(ts.generator, pair, "q", None, s_none, forced_ids=f_pair))


def test_stop_rules_match_reference():
    ts = sharp_scope()
    ctx = ts.prepare([ImageInput(rand_image(80, 80, seed=5))])
    sp = ts.tokenizer.special_ids()
    seg4 = ts.tokenizer.encode("<think>a [SEG] b [SEG] c [SEG] d [SEG]")
    cases = [
        (GenerationSettings(max_new_tokens=200, max_seg=2), seg4, "max_seg"),
        (GenerationSettings(max_new_tokens=20), seg4, "max_new_tokens"),
        (GenerationSettings(max_new_tokens=200), seg4[:3] + [sp["answer_end"]], "answer"),
        (GenerationSettings(max_new_tokens=200), seg4[:3] + [sp["eos"]], "eos"),
    ]
    for s, forced, why in cases:
        a = naive(ts, ctx, "q", s, forced_ids=forced)
        b = fd.fast_run(ts.generator, ctx, "q", None, s, forced_ids=forced)
        assert a.stopped == why
        assert_same(a, b)
    calls = iter(range(1000))
    b = fd.fast_run(ts.generator, ctx, "q", None, GenerationSettings(max_new_tokens=200),
                    should_stop=lambda: next(calls) >= 5)
    assert b.stopped == "cancelled" and len(b.token_ids) <= 8


def test_static_cache_after_injection_equals_full_recompute():
    ts = sharp_scope()
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    forced = ts.tokenizer.encode(SEG2)
    s = GenerationSettings(max_new_tokens=45)
    trace = GenerationTrace()
    a = ts.generator.run(ctx, "Where?", None, s, forced_ids=forced, trace=trace,
                         grounding=lambda st: " 3 ha")
    fd.release_decoders(ts.model)
    b = fd.fast_run(ts.generator, ctx, "Where?", None, s, forced_ids=forced, grounding=lambda st: " 3 ha")
    assert_same(a, b)
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    with torch.no_grad():
        full = torch.cat(trace.fed, dim=1)  # every embedding the reference fed, in order
        fresh = ts.model.new_cache()
        ts.model.lm_forward(full, fresh, 0)
    n = full.shape[1]
    p = int(dec.prefix_len[0])
    for li, layer in enumerate(fresh.layers):
        for ours_pre, ours_row, ref in ((dec.k_pre, dec.k_row, layer.keys), (dec.v_pre, dec.v_row, layer.values)):
            ours = torch.cat([ours_pre[li, 0, :, :p], ours_row[li, 0, :, 0, : n - p]], dim=1)
            torch.testing.assert_close(ours, ref[0], atol=2e-5, rtol=1e-4)


def test_batch_sharing_prefixes_gives_each_single_answer():
    ts = sharp_scope()
    ctxs = [ts.prepare([ImageInput(rand_image(70, 120, seed=10 + i))]) for i in range(2)]
    forced = ts.tokenizer.encode(SEG2)
    s = GenerationSettings(max_new_tokens=40)
    qs = [fd.Question(ctxs[0], "Where is the water?", None, forced),
          fd.Question(ctxs[1], "Where is the water?", None, forced),
          fd.Question(ctxs[0], "Which roads are flooded?", None, forced),
          fd.Question(ctxs[0], "Describe it.", None, None)]
    batch = fd.answer_many(ts.generator, qs, s)
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    assert (dec.G, dec.R) == (2, 3)  # one prefix per image, computed once for its three questions
    for q, got in zip(qs, batch):
        assert_same(naive(ts, q.ctx, q.question, s, forced_ids=q.forced_ids), got)
    # a second call about the same image reuses its prefix cache
    before = ts.model.sam2_encode_calls
    again = fd.answer_many(ts.generator, qs, s)
    assert [r.token_ids for r in again] == [r.token_ids for r in batch]
    assert ts.model.sam2_encode_calls == before  # SAM-2 features stay cached on each image's context


@pytest.mark.parametrize("max_tokens", [8192, 12])
def test_prefixes_prefilled_together_equal_one_by_one(max_tokens):
    """``set_prefixes`` packs groups into shared GEMMs (12 tokens: a pack per prefix, and one over the limit)."""
    ts = sharp_scope()
    h = ts.model.config.llm.hidden_size
    gen = torch.Generator().manual_seed(3)
    prefixes = [torch.randn(n, h, generator=gen) * 0.3 for n in (7, 13, 4)]
    one = fd.FastDecoder(ts.model, groups=3, max_prefix=16, max_row_len=40, inject_len=4)
    for g, e in enumerate(prefixes):
        one.set_prefix(g, e)
    many = fd.FastDecoder(ts.model, groups=3, max_prefix=16, max_row_len=40, inject_len=4)
    many.set_prefixes(list(enumerate(prefixes)), max_tokens=max_tokens)
    assert many.prefix_len.tolist() == one.prefix_len.tolist() == [7, 13, 4]
    torch.testing.assert_close(many.k_pre, one.k_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many.v_pre, one.v_pre, atol=1e-5, rtol=1e-5)
    assert torch.equal(many.pmask, one.pmask)


def test_the_transposed_lm_head_layout_gives_the_same_answers(monkeypatch):
    """The "wx" lm_head layout (picked on CUDA where it is faster) decodes the same tokens as "xw"."""
    monkeypatch.setattr(fd.FastDecoder, "_pick_lm_head", lambda self: "wx")
    ts = sharp_scope()
    ctx = ts.prepare([ImageInput(rand_image(70, 120, seed=4))])
    s = GenerationSettings(max_new_tokens=30)
    qs = [fd.Question(ctx, "Where is the water?", None, ts.tokenizer.encode(SEG2)),
          fd.Question(ctx, "Describe it.", None, None)]
    got = fd.answer_many(ts.generator, qs, s)
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    assert dec.lm_head_mode == "wx"
    for q, r in zip(qs, got):
        assert_same(naive(ts, q.ctx, q.question, s, forced_ids=q.forced_ids), r)


def test_answer_batch_api_uses_the_fast_path_when_enabled(monkeypatch):
    ts = sharp_scope()
    ctx = ts.prepare([ImageInput(rand_image(64, 64, seed=2))])
    s = GenerationSettings(max_new_tokens=12)
    ref = ts.answer_batch(ctx, ["q1", "q2"], settings=s)
    monkeypatch.setenv("TERRASCOPE_FAST_DECODE", "1")
    assert fd.enabled(ts.model, s)
    fast = ts.answer_batch(ctx, ["q1", "q2"], settings=s)
    assert [r.timings_ms.get("fast_path") for r in fast] == [1.0, 1.0]
    assert [r.token_ids for r in fast] == [r.token_ids for r in ref]
    assert not fd.enabled(ts.model, GenerationSettings(temperature=0.7))  # sampling stays on the reference
    monkeypatch.setenv("TERRASCOPE_FAST_DECODE", "0")
    assert not fd.enabled(ts.model, s)


def test_fused_weights_are_views_and_the_transformers_path_is_unchanged():
    ts = sharp_scope()
    ids = torch.tensor([[5, 9, 300, 17]])
    with torch.no_grad():
        before = ts.model.lm_forward(ts.model.embed_ids(ids), None, 0, all_logits=True)[1]
        layers = fd.fuse_llm_weights(ts.model)
        after = ts.model.lm_forward(ts.model.embed_ids(ids), None, 0, all_logits=True)[1]
    torch.testing.assert_close(before, after)
    attn = ts.model.language_model.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == layers[0].wqkv.data_ptr() + attn.q_proj.weight.numel() * 4
    assert fd.fuse_llm_weights(ts.model)[0].wqkv.data_ptr() == layers[0].wqkv.data_ptr()  # idempotent


def test_engine_refuses_bad_requests_with_clear_errors():
    ts = sharp_scope()
    h = ts.model.config.llm.hidden_size
    dec = fd.FastDecoder(ts.model, max_prefix=8, max_row_len=40, inject_len=4)
    st = fd.DecodeSettings(stop_ids=(-1,), seg_id=-2, max_new_tokens=10)  # ids no model emits
    with pytest.raises(ValueError, match="set_prefix"):
        dec.generate([fd.RowInput(0, torch.zeros(3, h))], st, lambda r: [])
    with pytest.raises(ValueError, match="does not fit"):
        dec.set_prefix(0, torch.zeros(9, h))
    dec.set_prefix(0, torch.randn(5, h))
    with pytest.raises(ValueError, match="out of range"):
        dec.generate([fd.RowInput(1, torch.zeros(3, h))], st, lambda r: [])
    with pytest.raises(ValueError, match="more than 1 questions"):
        dec.generate([fd.RowInput(0, torch.zeros(3, h)), fd.RowInput(0, torch.zeros(3, h))], st, lambda r: [])
    with pytest.raises(ValueError, match="outgrew the cache"):
        dec.generate([fd.RowInput(0, torch.randn(3, h))], fd.DecodeSettings((-1,), -2, max_new_tokens=500),
                     lambda r: [])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_match_eager_steps():
    ts = sharp_scope()
    ts.model.to("cuda")
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    forced = ts.tokenizer.encode(SEG2)
    s = GenerationSettings(max_new_tokens=50)
    a = naive(ts, ctx, "Where is the water?", s, forced_ids=forced)
    b = fd.fast_run(ts.generator, ctx, "Where is the water?", None, s, forced_ids=forced)
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    assert dec.use_graphs and {key[0] for key in dec._graphs} == {"decode", "ragged"}
    assert_same(a, b)
    c = fd.fast_run(ts.generator, ctx, "Where is the water?", None, s, forced_ids=forced)  # graphs replayed
    assert_same(b, c)


def test_a_failed_kernel_compile_falls_back_to_eager_with_the_same_answer(monkeypatch):
    """No C++ compiler, an Inductor bug: the compiled helpers fail at first call; the decoder goes eager."""
    ts = sharp_scope()
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    forced = ts.tokenizer.encode(SEG2)
    s = GenerationSettings(max_new_tokens=40)
    want = fd.answer_many(ts.generator, [fd.Question(ctx, "Where?", None, forced)], s, kernels="eager")[0]
    fd.release_decoders(ts.model)

    def broken_compile(fn, *a, **kw):
        def fails(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    got = fd.answer_many(ts.generator, [fd.Question(ctx, "Where?", None, forced)], s, kernels="compiled")[0]
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    assert dec.kernels == "eager" and "C++ compiler" in dec.kernels_reason
    assert_same(want, got)


def test_default_kernels_are_compiled_on_cuda_only(monkeypatch):
    monkeypatch.setattr(fd, "DEFAULT_KERNELS", None)
    assert fd.default_kernels(torch.device("cpu")) == "eager"
    assert fd.default_kernels(torch.device("cuda")) == "compiled"
    monkeypatch.setattr(fd, "DEFAULT_KERNELS", "eager")  # TERRASCOPE_FAST_KERNELS=eager
    assert fd.default_kernels(torch.device("cuda")) == "eager"
