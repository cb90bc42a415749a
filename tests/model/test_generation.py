"""Generation with tiny random models: injection into the live KV cache, SAM-2 caching, routing, SAR/optical
choice, streaming, cancel, stop rules, measurement grounding, and batched preparation (``prepare_many``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rand_image, tiny_config, tiny_scope

from model.api import TerraScope
from model.generation import AnswerState, GenerationTrace, SegEvent
from model.loading import random_model
from model.modeling_terrascope import text_relevance
from model.selection import choose_modality
from model.types import GenerationSettings, ImageInput

SEG2 = "<think>I first find the water [SEG] then the roads [SEG]"


def settings(**kw) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": 40, **kw})


def test_kv_cache_after_injection_equals_full_recompute(tiny):
    trace = GenerationTrace()
    img = [ImageInput(rand_image(90, 200, seed=1))]
    res = tiny.answer(img, "Where is the water?", settings=settings(max_new_tokens=60), forced_prefix=SEG2,
                      grounding=lambda step: f" area {step.step + 1}.5 ha", trace=trace)
    assert len(res.steps) == 2 and all(s.token_indices for s in res.steps)
    with torch.no_grad():
        full = torch.cat(trace.fed, dim=1)
        fresh = tiny.model.new_cache()
        hidden, _ = tiny.model.lm_forward(full, fresh, 0)
    live = trace.cache
    assert live.get_seq_length() == full.shape[1]
    for a, b in zip(live.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trace.last_hidden, hidden[0, -1], atol=1e-5, rtol=1e-4)
    # the injected rows are the projected visual tokens the mask selected
    region_chunk = trace.segs[0]["region_embeds"][0]
    ctx = tiny.prepare(img)
    torch.testing.assert_close(region_chunk, ctx.vit_flat[res.steps[0].token_indices])


def test_sam2_encodes_once_per_image_per_answer():
    ts = tiny_scope()
    img = [ImageInput(rand_image(64, 64, seed=2))]
    prefix = "<think>a [SEG] b [SEG] c [SEG]"
    res = ts.answer(img, "q", settings=settings(), forced_prefix=prefix)
    assert len(res.steps) == 3 and ts.model.sam2_encode_calls == 1
    series = [ImageInput(rand_image(64, 64, seed=s), f"t{s}") for s in range(3)]
    before = ts.model.sam2_encode_calls
    res = ts.answer(series, "q", settings=settings(max_new_tokens=100),
                    forced_prefix="<think>Image: t2 [SEG] Image: t0 [SEG] Image: t2 [SEG] Image: t0 [SEG]")
    assert [s.image_index for s in res.steps] == [2, 0, 2, 0]
    assert ts.model.sam2_encode_calls - before == 2  # t1 is never segmented, t0/t2 once each
    before = ts.model.sam2_encode_calls
    ctx = ts.prepare(img)
    out = ts.answer_batch(ctx, ["q1", "q2"], settings=settings(max_new_tokens=12))
    assert len(out) == 2
    ts.answer(ctx, "q3", settings=settings(), forced_prefix=prefix)
    ts.answer(ctx, "q4", settings=settings(), forced_prefix=prefix)
    assert ts.model.sam2_encode_calls - before == 1  # shared across the questions of one request


def test_time_series_routing_sends_mask_to_marked_image():
    ts = tiny_scope()
    sizes = [(64, 80), (50, 50), (72, 40)]
    series = [ImageInput(rand_image(h, w, seed=i), f"t{i}") for i, (h, w) in enumerate(sizes)]
    res = ts.answer(series, "What changed?", settings=settings(),
                    forced_prefix="<think>Image: t2 the field [SEG] and Image: t1 the field [SEG]")
    ctx = ts.prepare(series)
    assert [s.image_index for s in res.steps] == [2, 1]
    for step in res.steps:
        assert step.mask.shape == sizes[step.image_index]
        lo = ctx.offsets[step.image_index]
        hi = lo + ctx.token_counts[step.image_index]
        assert all(lo <= i < hi for i in step.token_indices)
    assert [s.label for s in res.steps] == ["the field", "and the field"]


def test_official_compat_routes_seg_k_to_image_k_mod_n():
    ts = tiny_scope(compat="official", template="qwen_chat", max_tokens_per_seg=8)
    series = [ImageInput(rand_image(60, 60, seed=i), f"t{i}") for i in range(3)]
    res = ts.answer(series, "q", settings=settings(max_new_tokens=100),
                    forced_prefix="<think>Image: t2 [SEG] x [SEG] y [SEG] z [SEG]")
    assert [s.image_index for s in res.steps] == [0, 1, 2, 0]


def test_beta_prefers_the_modality_aligned_with_the_question():
    """Eq. 4-5 on crafted embeddings: where the optical tokens are blanked (cloud), SAR wins, and vice versa."""
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 16
    q = torch.randn(5, d, generator=gen)
    signal = q.mean(0) / q.mean(0).norm() * 6
    optical, sar = (0.1 * torch.randn(n, d, generator=gen) for _ in range(2))
    cloud = torch.arange(n) < 8
    optical[~cloud] += signal  # clear sky: optical sees the target
    sar[cloud] += signal  # under the cloud only SAR sees it
    optical[cloud] = 0.0  # blanked
    b_opt, b_sar = text_relevance(optical, q), text_relevance(sar, q)
    assert float(b_opt.sum()) == pytest.approx(1.0) and float(b_sar.sum()) == pytest.approx(1.0)
    picks = choose_modality(b_opt.numpy(), b_sar.numpy(), list(range(n)))
    assert picks == ["sar"] * 8 + ["optical"] * 8


def test_pair_injects_per_position_modality_tokens():
    ts = tiny_scope()
    optical = np.zeros((64, 96, 3), np.uint8)  # blanked optical
    sar = rand_image(32, 48, seed=3)  # a different size: aligned onto the optical grid
    pair = [ImageInput(sar, "sar"), ImageInput(optical, "optical")]
    res = ts.answer(pair, "Where is the flood?", settings=settings(), forced_prefix="<think>the flood [SEG]")
    ctx = ts.prepare(pair)
    step = res.steps[0]
    assert ctx.roles == ["optical", "sar"] and step.mask.shape == (64, 96)
    assert len(step.modality) == len(step.token_indices) > 0
    n = ctx.token_counts[0]
    for idx, mod in zip(step.token_indices, step.modality):
        assert (idx >= n) == (mod == "sar")
    beta_opt, beta_sar = ts.generator._beta(ctx, "Where is the flood?")
    local = [i - n if m == "sar" else i for i, m in zip(step.token_indices, step.modality)]
    assert step.modality == choose_modality(beta_opt, beta_sar, local)


def test_streaming_deltas_and_mask_events_in_order():
    ts = tiny_scope()
    events: list[tuple[str, object]] = []
    res = ts.answer([ImageInput(rand_image(48, 48))], "q", settings=settings(max_new_tokens=25),
                    forced_prefix=SEG2, on_token=lambda t: events.append(("text", t)),
                    on_mask=lambda s: events.append(("mask", s.step)))
    text = "".join(t for kind, t in events if kind == "text")
    assert text == ts.tokenizer.decode(res.token_ids)
    assert text.strip() == res.text
    masks = [i for i, (kind, _) in enumerate(events) if kind == "mask"]
    assert [events[i][1] for i in masks] == [0, 1]
    before_first = "".join(t for kind, t in events[: masks[0]] if kind == "text")
    assert before_first.endswith("[SEG]") and "roads" not in before_first


def test_cancel_max_seg_and_answer_stop():
    ts = tiny_scope()
    img = [ImageInput(rand_image(48, 48))]
    polls = {"n": 0}

    def stop() -> bool:
        polls["n"] += 1
        return polls["n"] > 5

    res = ts.answer(img, "q", settings=settings(), should_stop=stop)
    assert res.stopped == "cancelled" and len(res.token_ids) == 5
    res = ts.answer(img, "q", settings=settings(max_seg=2), forced_prefix="<think>a [SEG] b [SEG] c [SEG]")
    assert res.stopped == "max_seg" and len(res.steps) == 2
    res = ts.answer(img, "q", ["x", "y", "z"], settings=settings(),
                    forced_prefix="<think>it is C</think><answer>B. y</answer> more")
    assert res.stopped == "answer" and res.text.endswith("</answer>")
    assert (res.reasoning, res.answer, res.choice) == ("it is C", "B. y", "B")
    res = ts.answer(img, "q", settings=settings(max_new_tokens=7))
    assert res.stopped in ("max_new_tokens", "eos", "answer") and len(res.token_ids) <= 7


def test_grounding_span_follows_the_region_tokens():
    ts = tiny_scope()
    span = " [area: 12.5 ha]"
    res = ts.answer([ImageInput(rand_image(40, 56))], "q", settings=settings(max_new_tokens=40),
                    forced_prefix="<think>water [SEG]", grounding=lambda s: span)
    step = res.steps[0]
    assert step.grounding_text == span
    region_id = ts.tokenizer.token_id("<REGION>")
    seg_at = res.token_ids.index(ts.tokenizer.token_id("[SEG]"))
    k = len(step.token_indices)
    assert res.token_ids[seg_at + 1: seg_at + 1 + k] == [region_id] * k
    g = ts.tokenizer.encode(span)
    assert res.token_ids[seg_at + 1 + k: seg_at + 1 + k + len(g)] == g
    assert span in res.text


def test_injection_modes():
    ts = tiny_scope()
    img = [ImageInput(rand_image(56, 56, seed=4))]
    runs = {m: ts.answer(img, "q", settings=settings(injection=m, max_tokens_per_seg=40),
                         forced_prefix="<think>x [SEG]") for m in ("mask", "box", "random", "none")}
    mask_idx = runs["mask"].steps[0].token_indices
    assert mask_idx
    assert set(mask_idx) <= set(runs["box"].steps[0].token_indices)
    assert len(runs["random"].steps[0].token_indices) == len(mask_idx)
    assert runs["none"].steps[0].token_indices == []
    region_id = ts.tokenizer.token_id("<REGION>")
    assert region_id not in runs["none"].token_ids
    again = ts.answer(img, "q", settings=settings(injection="random", max_tokens_per_seg=40),
                      forced_prefix="<think>x [SEG]")
    assert again.steps[0].token_indices == runs["random"].steps[0].token_indices  # seeded


def test_no_object_gives_an_empty_mask_and_no_injection():
    ts = tiny_scope()
    with torch.no_grad():
        ts.model.grounding_encoder.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(-50.0)
    res = ts.answer([ImageInput(rand_image(40, 40))], "q", settings=settings(), forced_prefix="<think>x [SEG]")
    assert not res.steps[0].mask.any() and res.steps[0].token_indices == []


def test_bad_inputs_raise_clear_errors():
    ts = tiny_scope()
    with pytest.raises(ValueError, match="uint8"):
        ts.answer([ImageInput(np.zeros((10, 10, 3), np.float32))], "q")
    with pytest.raises(ValueError, match="HxWx3"):
        ts.answer([ImageInput(np.zeros((10, 10), np.uint8))], "q")
    with pytest.raises(ValueError, match="roles"):
        ts.answer([ImageInput(rand_image(8, 8), "t1"), ImageInput(rand_image(8, 8), "t0")], "q")
    with pytest.raises(ValueError, match="empty"):
        ts.answer([ImageInput(rand_image(8, 8))], "  ")
    with pytest.raises(ValueError, match="option lists"):
        ts.answer_batch([ImageInput(rand_image(8, 8))], ["a", "b"], [["x"], ["y"], ["z"]])


def test_sampling_is_seeded_and_greedy_is_default():
    ts = tiny_scope()
    ctx = ts.prepare([ImageInput(rand_image(40, 40))])
    greedy = [ts.answer(ctx, "q", settings=settings(max_new_tokens=15)).token_ids for _ in range(2)]
    assert greedy[0] == greedy[1]
    hot = [ts.answer(ctx, "q", settings=settings(max_new_tokens=15, temperature=5.0, seed=s)).token_ids
           for s in (1, 1, 2)]
    assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != greedy[0]


# ---- batched preparation (prepare_many) and batched SAM-2 encodes ---------------------------------------------
def _requests() -> list[list[ImageInput]]:
    """Requests of every kind, with different tile counts (dynamic tiling, pair alignment, series)."""
    return [
        [ImageInput(rand_image(90, 200, seed=1))],  # 2 tiles + thumbnail
        [ImageInput(rand_image(64, 64, seed=2))],  # 1 tile
        [ImageInput(rand_image(32, 48, seed=3), "sar"), ImageInput(rand_image(64, 96, seed=4), "optical")],
        [ImageInput(rand_image(60, 60, seed=5 + i), f"t{i}") for i in range(3)],
        [ImageInput(rand_image(150, 70, seed=9))],
    ]


def _assert_same_context(a, b, exact: bool = True) -> None:
    assert (a.kind, a.roles, a.layouts, a.token_counts, a.offsets) == (b.kind, b.roles, b.layouts, b.token_counts,
                                                                       b.offsets)
    assert all(np.array_equal(x, y) for x, y in zip(a.pixels, b.pixels)) and len(a.pixels) == len(b.pixels)
    assert a.vit_flat.shape == b.vit_flat.shape and a.vit_flat.dtype == b.vit_flat.dtype
    if exact:
        assert torch.equal(a.vit_flat, b.vit_flat)
    else:  # bf16: a different batch may pick different kernels; equal within bf16 rounding
        torch.testing.assert_close(a.vit_flat.float(), b.vit_flat.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("max_tiles", [None, 3])
def test_prepare_many_equals_prepare_one_by_one(max_tiles):
    ts = tiny_scope()
    reqs = _requests()
    many = ts.generator.prepare_many(reqs, max_tiles=max_tiles)
    assert len(many) == len(reqs)
    for req, ctx in zip(reqs, many):
        _assert_same_context(ctx, ts.prepare(req))
        assert ctx.timings_ms["prepare_batch"] == len(reqs) and ctx.sam_cache == {}
    assert ts.generator.prepare_many([]) == []


def test_prepare_many_in_bfloat16_is_within_bf16_rounding():
    ts = TerraScope(random_model(tiny_config(), "cpu", torch.bfloat16, seed=0), tiny_scope().tokenizer, "random")
    reqs = _requests()
    for req, ctx in zip(reqs, ts.generator.prepare_many(reqs)):
        _assert_same_context(ctx, ts.prepare(req), exact=False)


def test_prepare_many_sam2_is_one_encode_equal_to_the_lazy_ones():
    ts = tiny_scope()
    reqs = _requests()
    before = ts.model.sam2_encode_calls
    many = ts.generator.prepare_many(reqs, sam2=True)
    assert ts.model.sam2_encode_calls - before == 1  # 8 images, one batched forward
    assert ts.generator.encode_sam_many(many) == 0 and ts.model.sam2_encode_calls - before == 1  # cached
    for req, ctx in zip(reqs, many):
        lazy = ts.prepare(req)
        for i in range(len(req)):
            got, want = ctx.sam_cache[i], ts.generator.sam_features(lazy, i)
            assert len(got.image_embeddings) == len(want.image_embeddings)
            for x, y in zip(got.image_embeddings, want.image_embeddings):
                assert torch.equal(x, y)
            assert torch.equal(got.image_pe, want.image_pe)
    # and the answers about them are the answers about one-by-one contexts
    for req, ctx in zip(reqs[:3], many[:3]):
        prefix = "<think>Image: t1 the field [SEG] and the optical [SEG]"
        a = ts.answer(ctx, "Where?", settings=settings(max_new_tokens=30), forced_prefix=prefix)
        b = ts.answer(req, "Where?", settings=settings(max_new_tokens=30), forced_prefix=prefix)
        assert a.token_ids == b.token_ids and len(a.steps) == len(b.steps) == 2
        for x, y in zip(a.steps, b.steps):
            assert np.array_equal(x.mask, y.mask) and x.token_indices == y.token_indices


def test_sam2_batches_are_capped_by_max_frames():
    ts = tiny_scope()
    reqs = _requests()
    one = [ts.prepare(r) for r in reqs]
    chunked = [ts.prepare(r) for r in reqs]
    before = ts.model.sam2_encode_calls
    assert ts.generator.encode_sam_many(chunked, max_frames=3) == 8
    assert ts.model.sam2_encode_calls - before == 3  # 3 + 3 + 2 frames
    for a, b in zip(one, chunked):
        for i in range(len(a.pixels)):
            want = ts.generator.sam_features(a, i)
            assert all(torch.equal(x, y) for x, y in zip(b.sam_cache[i].image_embeddings, want.image_embeddings))
    with pytest.raises(ValueError, match="max_frames"):
        ts.generator.encode_sam_many(one, max_frames=0)


def test_first_segs_of_one_step_share_one_sam2_encode():
    """Several answers hitting [SEG] at the same step (the batched fast path) encode their images together."""
    ts = tiny_scope()
    gen, h = ts.generator, ts.model.config.llm.hidden_size
    reqs = _requests()[:2] + _requests()[4:]
    hidden = torch.randn(len(reqs), h, generator=torch.Generator().manual_seed(0))

    def handle(ctxs, rows):
        states = [AnswerState(gen, ctx, "q", settings()) for ctx in ctxs]
        for st in states:
            st.out_ids = ts.tokenizer.encode("<think>the water [SEG]")
        fed: dict[int, torch.Tensor] = {}  # row -> its injected region embeddings
        gen.handle_segs([SegEvent(states[r], hidden[r]) for r in rows],
                        lambda i, kind, emb, ids: fed.setdefault(rows[i], emb))
        return states, fed

    before = ts.model.sam2_encode_calls
    batched, fed_b = handle([ts.prepare(r) for r in reqs], list(range(len(reqs))))
    assert ts.model.sam2_encode_calls - before == 1
    ctxs = [ts.prepare(r) for r in reqs]
    single = [handle(ctxs, [r]) for r in range(len(reqs))]
    assert ts.model.sam2_encode_calls - before == 1 + len(reqs)
    for r, (states, fed) in enumerate(single):
        x, y = batched[r].steps[0], states[r].steps[0]
        assert np.array_equal(x.mask, y.mask) and x.token_indices == y.token_indices
        assert x.score == pytest.approx(y.score, abs=1e-6)
        assert x.token_indices and r in fed_b
        torch.testing.assert_close(fed_b[r], fed[r])


def test_prepare_many_errors_name_the_request():
    ts = tiny_scope()
    bad = [[ImageInput(rand_image(20, 20))], [ImageInput(np.zeros((10, 10, 3), np.float32))]]
    with pytest.raises(ValueError, match=r"images_list\[1\].*uint8"):
        ts.generator.prepare_many(bad)
    with pytest.raises(ValueError, match="max_tiles"):
        ts.generator.prepare_many(bad[:1], max_tiles=0)
    ctx = ts.prepare(bad[0])
    with pytest.raises(ValueError, match="image index 1 out of range"):
        ts.generator.sam_features_many([(ctx, 1)])


def test_sam2_reads_the_resize_started_with_the_context_once():
    """On CUDA each context starts its SAM-2 resizes on the host pool (``VisualContext.sam_frames``); the
    encode must use that very frame and drop it. Here the started frames are planted by hand on a CPU model."""
    from concurrent.futures import Future

    from model.generation import sam2_resize

    ts = tiny_scope()
    req = _requests()[1]
    planted, plain = ts.prepare(req), ts.prepare(req)
    assert planted.sam_frames == {}  # CPU: nothing is started
    size = ts.model.config.sam2.image_size
    frames = {i: Future() for i in range(len(req))}
    for i, fut in frames.items():
        fut.set_result(sam2_resize(np.ascontiguousarray(req[i].pixels[::-1]), size))  # flipped: traceable
    planted.sam_frames = dict(frames)
    flipped = ts.prepare([ImageInput(np.ascontiguousarray(im.pixels[::-1]), im.role) for im in req])
    got = ts.generator.sam_features_many([(planted, i) for i in range(len(req))])
    assert planted.sam_frames == {}
    for i, feats in enumerate(got):
        want = ts.generator.sam_features(flipped, i)
        assert torch.equal(feats.image_embeddings[-1], want.image_embeddings[-1])
        assert not torch.equal(feats.image_embeddings[-1], ts.generator.sam_features(plain, i).image_embeddings[-1])
