"""Parity with the official inference code on the tiny fixture checkpoint (references computed in float32).

Tolerances follow the fixture README: 1e-4 for logits / hidden states / embeddings, 1e-3 for SAM-2 logits,
exact ids, token indices and boolean masks.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import fixture_image, fixture_inputs, unpack_mask

from model import preprocess as P
from model.generation import GenerationTrace
from model.modeling_terrascope import mask_probabilities, pixel_shuffle_v2
from model.prompting import OFFICIAL_INSTRUCTION, build_prompt
from model.transfer import normalized_on
from model.types import GenerationSettings

ATOL = 1e-4
SAM_ATOL = 1e-3
RUNS = ["short_B", "forced_A", "forced_B", "greedy_A", "forced_multi", "greedy_multi"]


def close(a, b, atol=ATOL) -> None:
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max())
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def traces(official, refs, meta):
    """Run every reference trace once (teacher-forced where the reference was)."""
    out = {}
    for tag in RUNS:
        run = meta["runs"][tag]
        trace = GenerationTrace()
        ctx = official.prepare(fixture_inputs(tag))
        res = official.generator.run(
            ctx, "unused", None, GenerationSettings(max_new_tokens=len(run["generated_ids"])),
            forced_ids=run["forced_prefix_ids"], prompt_ids=refs[f"{tag}.input_ids"].tolist(), trace=trace)
        out[tag] = (res, trace, ctx)
    return out


# ---- preprocessing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,tag", [("A", "forced_A"), ("B", "forced_B")])
def test_tiles_pixels_and_layout_bit_exact(name, tag, refs, meta):
    img = fixture_image(name)
    tiles, layout = P.dynamic_tiles(img)
    assert np.array_equal(tiles, refs[f"pre_{name}.tiles_u8"])
    pre = meta[f"pre_{name}"]
    assert [layout.cols, layout.rows] == pre["target_aspect_ratio(cols,rows)"]
    assert layout.n_tiles == pre["n_tiles_incl_thumbnail"]
    pv = P.normalize_tiles(tiles)
    assert hashlib.sha256(pv.tobytes()).hexdigest() == meta["runs"][tag]["pixel_values_sha256_f32"]
    assert np.array_equal(pv[:, :, ::8, ::8], refs[f"{tag}.pixel_values_sub8"])
    np.testing.assert_allclose(pv.astype(np.float64).mean(axis=(2, 3)), refs[f"{tag}.pixel_values_tile_channel_mean"],
                               atol=1e-6)
    assert np.array_equal(P.sam2_resize(img), refs[f"pre_{name}.sam_resized_u8"])
    g = P.sam2_pixels(img)[None]
    assert hashlib.sha256(g.tobytes()).hexdigest() == meta["runs"][tag]["g_pixel_values_sha256_f32"]


@pytest.mark.parametrize("name,tag", [("A", "forced_A"), ("B", "forced_B")])
def test_model_input_normalised_on_the_device_hashes_like_the_official_pixels(name, tag, official, meta):
    """``normalized_on`` (what prepare and the SAM-2 encode feed the model) is bit-identical to the reference."""
    img = fixture_image(name)
    pv = normalized_on(official.model, P.dynamic_tiles(img)[0], P.IMAGENET_MEAN, P.IMAGENET_STD)
    assert pv.dtype == torch.float32 and pv.is_contiguous()
    assert hashlib.sha256(pv.cpu().numpy().tobytes()).hexdigest() == meta["runs"][tag]["pixel_values_sha256_f32"]
    g = normalized_on(official.model, P.sam2_resize(img)[None], P.SAM2_MEAN, P.SAM2_STD)
    assert hashlib.sha256(g.cpu().numpy().tobytes()).hexdigest() == meta["runs"][tag]["g_pixel_values_sha256_f32"]


def test_series_pixels_bit_exact(meta):
    imgs = [fixture_image("C_pre"), fixture_image("C_post")]
    pv = P.normalize_tiles(np.concatenate([P.single_tile(i)[0] for i in imgs]))
    assert hashlib.sha256(pv.tobytes()).hexdigest() == meta["runs"]["forced_multi"]["pixel_values_sha256_f32"]
    g = np.stack([P.sam2_pixels(i) for i in imgs])
    assert hashlib.sha256(g.tobytes()).hexdigest() == meta["runs"]["forced_multi"]["g_pixel_values_sha256_f32"]


def test_sam2_constants_are_bf16_rounded(meta):
    eff = meta["sam2_preprocess_constants_effective"]
    assert P.SAM2_MEAN.tolist() == eff["mean"] and P.SAM2_STD.tolist() == eff["std"]


# ---- prompt ids -------------------------------------------------------------------------------------------------
def test_prompt_ids(official, refs, meta, traces):
    for tag in ("forced_A", "forced_multi"):
        run = meta["runs"][tag]
        question = run["user_text"].split("<image>\n", 1)[1]
        assert run["user_text"].startswith(OFFICIAL_INSTRUCTION)
        ctx = traces[tag][2]
        text = build_prompt("qwen_chat", question.rstrip("\n"), None, ctx.token_counts, ctx.roles)
        assert text == run["prompt_text"]
        assert official.tokenizer.encode(text) == refs[f"{tag}.input_ids"].tolist()
    # forced_A with options passed as a list gives the same prompt as the demo's format_prompt
    question, *opts = meta["runs"]["forced_A"]["user_text"].split("<image>\n", 1)[1].rstrip("\n").split("\n")
    ids = official.generator.prompt_ids(traces["forced_A"][2], question, [o[3:] for o in opts])
    assert ids == refs["forced_A.input_ids"].tolist()
    assert official.tokenizer.encode(meta["runs"]["short_B"]["prompt_text"]) == refs["short_B.input_ids"].tolist()
    for sample, want in meta["tokenizer_samples"].items():
        assert official.tokenizer.encode(sample) == want["ids"]
        assert official.tokenizer.decode(want["ids"]) == want["decoded"]


# ---- vision, prefill ---------------------------------------------------------------------------------------------
def test_pixel_shuffle_v2_exact(refs):
    out = pixel_shuffle_v2(torch.from_numpy(refs["fn.pixel_shuffle_in"]))
    assert torch.equal(out, torch.from_numpy(refs["fn.pixel_shuffle_out"]))


def test_vit_and_projector(official, refs):
    tiles, _ = P.dynamic_tiles(fixture_image("B"))
    pv = torch.from_numpy(P.normalize_tiles(tiles))
    with torch.no_grad():
        close(official.model.vision_model(pixel_values=pv).last_hidden_state, refs["forced_B.vit_last_hidden_state"])
    for tag in ("short_B", "forced_A", "forced_multi"):
        ctx = official.prepare(fixture_inputs(tag))
        close(ctx.vit_flat.reshape(refs[f"{tag}.vit_embeds"].shape), refs[f"{tag}.vit_embeds"])


def test_prefill_full_logits(official, refs):
    ids = torch.from_numpy(refs["short_B.input_ids"])
    ctx = official.prepare(fixture_inputs("short_B"))
    with torch.no_grad():
        emb = official.model.embed_ids(ids)[None]
        emb[0, ids == 1048] = ctx.vit_flat
        close(emb[0, ids == 1048][:4], refs["short_B.prefill_inputs_embeds_img_rows"])
        hidden, logits = official.model.lm_forward(emb, None, 0, all_logits=True)
    close(logits[0], refs["short_B.prefill_full_logits"])
    close(hidden[0, -1], refs["short_B.prefill_hidden_last"])


@pytest.mark.parametrize("tag", RUNS)
def test_prefill_and_every_call(tag, traces, refs):
    _, trace, _ = traces[tag]
    close(trace.calls[0][1], refs[f"{tag}.prefill_last_logits"])
    close(trace.prefill_hidden, refs[f"{tag}.prefill_hidden_last"])
    want = refs[f"{tag}.call_last_logits"]
    # the official loop also feeds the final token (whose logits nobody uses); we stop before it
    assert len(trace.calls) == len(want) - 1
    close(torch.stack([c[1] for c in trace.calls]), want[: len(trace.calls)])


# ---- end-to-end traces -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", RUNS)
def test_greedy_trace_ids(tag, traces, meta, refs):
    res, _, _ = traces[tag]
    assert res.token_ids == refs[f"{tag}.generated_ids"].tolist() == meta["runs"][tag]["generated_ids"]
    assert len(res.steps) == meta["runs"][tag]["n_masks"]


# ---- SAM-2 ------------------------------------------------------------------------------------------------------
def test_sam2_features(official, refs, traces):
    g = torch.from_numpy(P.sam2_pixels(fixture_image("B")))[None]
    sam = official.model.grounding_encoder
    with torch.no_grad():
        out = sam.vision_encoder(g)
        fpn, pos = out.fpn_hidden_states, out.fpn_position_encoding
    feats = traces["forced_B"][2].sam_cache[0]
    close(fpn[0][:, :, ::8, ::8], refs["forced_B.sam2_backbone_fpn0_sub8"])
    close(fpn[1][:, :, ::4, ::4], refs["forced_B.sam2_backbone_fpn1_sub4"])
    close(fpn[2][:, :, ::4, ::4], refs["forced_B.sam2_backbone_fpn2_sub4"])
    close(pos[2][:, :, ::4, ::4], refs["forced_B.sam2_pos_enc2_sub4"])
    no_mem = sam.no_memory_embedding.reshape(1, -1, 1, 1)
    close(feats.image_embeddings[-1] - no_mem, refs["forced_B.sam2_vision_features"])


@pytest.mark.parametrize("tag,n_seg", [("forced_A", 1), ("forced_B", 1), ("forced_multi", 2)])
def test_seg_hidden_prompt_mask_and_regions(tag, n_seg, traces, refs, meta):
    res, trace, _ = traces[tag]
    assert len(trace.segs) == n_seg
    for k, seg in enumerate(trace.segs):
        p = f"{tag}.seg{k}."
        frame = seg["image"] if "multi" in tag else 0
        if "multi" in tag:
            assert frame == k % 2  # the release routes [SEG] k to image k % n
        close(seg["hidden"], refs[p + "hidden"])
        close(seg["prompt"], refs[p + "text_hidden_fcs"])
        close(seg["iou"][0], refs[p + "decoder_iou"][frame])
        close(seg["obj"][0], refs[p + "decoder_obj_score"][frame])
        close(seg["low_res"][0], refs[p + "lowres_logits"][frame], SAM_ATOL)
        shape = tuple(refs[p + "mask_shape"])
        if "multi" in tag:
            close(seg["probs"][::4, ::4], refs[p + "mask_prob_sub4"][frame])
            want_mask = unpack_mask(refs[p + "mask_bool_packed"], shape)[frame]
            assert seg["local"] == refs[p + "region_indices_local"].tolist()
        else:
            close(seg["probs"], refs[p + "mask_prob"][0])
            want_mask = unpack_mask(refs[p + "mask_bool_packed"], shape)
            assert seg["local"] == refs[p + "region_indices"].tolist()
        assert np.array_equal(res.steps[k].mask, want_mask)
        close(seg["region_embeds"], refs[p + "region_embeds"])
        assert res.steps[k].score == pytest.approx(float(refs[p + "decoder_iou"][frame].max()))
        want_idx = [i + frame * 256 for i in seg["local"]]
        assert res.steps[k].token_indices == want_idx


def test_mask_prob_and_decoder_all_frames(official, refs, traces):
    """Both frames of a multi [SEG] (the release decodes every frame; we decode the routed one on demand)."""
    imgs = [fixture_image("C_pre"), fixture_image("C_post")]
    prompt = torch.from_numpy(refs["forced_multi.seg1.text_hidden_fcs"])
    cache = traces["forced_multi"][2].sam_cache
    assert sorted(cache) == [0, 1]
    with torch.no_grad():
        for f in range(2):
            dec = official.model.sam2_decode(cache[f], prompt)
            close(dec.low_res[0], refs["forced_multi.seg1.lowres_logits"][f], SAM_ATOL)
            probs = mask_probabilities(dec.low_res, imgs[0].shape[:2])[0]
            close(probs[::4, ::4], refs["forced_multi.seg1.mask_prob_sub4"][f])


def test_oneshot_equals_incremental(official, refs, meta):
    """A single no-cache forward over prompt + forced prefix reproduces the [SEG] logits and hidden state."""
    run = meta["runs"]["forced_A"]
    ids = torch.tensor(refs["forced_A.input_ids"].tolist() + run["forced_prefix_ids"])
    ctx = official.prepare(fixture_inputs("forced_A"))
    with torch.no_grad():
        emb = official.model.embed_ids(ids)[None]
        emb[0, ids == 1048] = ctx.vit_flat
        hidden, logits = official.model.lm_forward(emb, None, 0)
        close(logits[0, -1], refs["oneshot_A.logits_last"])
        close(hidden[0, -1:], refs["oneshot_A.seg_hidden"])
        close(official.model.seg_prompt(hidden[0, -1:]), refs["oneshot_A.text_hidden_fcs"])
