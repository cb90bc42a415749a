"""SAM-2 dihedral test-time augmentation (``config.sam2_tta``, model/sam2_tta.py) with tiny random models.

Expected values are built independently of the implementation: numpy flips/rotations of the input, the
transformers SAM-2 modules called directly (the pre-TTA code, copied below), numpy undo of each view.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import rand_image, tiny_config, tiny_scope

from model import sam2_tta
from model.api import TerraScope
from model.configuration_terrascope import TerraScopeConfig
from model.generation import GenerationTrace
from model.modeling_terrascope import Sam2Features, TerraScopeModel
from model.preprocess import sam2_pixels
from model.types import GenerationSettings, ImageInput

# numpy definitions of the views on [..., H, W] and their inverses (rot90 turns counter-clockwise)
NP_VIEWS = {
    "identity": (lambda a: a, lambda a: a),
    "hflip": (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
    "vflip": (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    "rot180": (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1]),
    "transpose": (lambda a: np.swapaxes(a, -1, -2), lambda a: np.swapaxes(a, -1, -2)),
    "rot90": (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, -1, (-2, -1))),
    "rot270": (lambda a: np.rot90(a, -1, (-2, -1)), lambda a: np.rot90(a, 1, (-2, -1))),
    "antitranspose": (lambda a: np.swapaxes(a, -1, -2)[..., ::-1, ::-1],
                      lambda a: np.swapaxes(a[..., ::-1, ::-1], -1, -2)),
}


@torch.no_grad()
def sharp(ts: TerraScope, seed: int = 5) -> TerraScope:
    """Random SAM-2 weights at unit gain: logits of order 1 that depend on orientation (the default 0.02
    init gives near-constant maps on which a flip/undo mistake would not show)."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in ts.model.grounding_encoder.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
    return ts


def scope(views: int, seed: int = 0) -> TerraScope:
    return sharp(tiny_scope(seed, sam2_tta=views))


def ref_multimask(model: TerraScopeModel, maps: list[torch.Tensor], prompt: torch.Tensor):
    """The pre-TTA decode, all three multimask outputs: (logits [B,3,s,s], IoU [B,3], object score [B,1])."""
    sam = model.grounding_encoder
    batch = prompt.shape[0]
    points = torch.zeros(batch, 1, 1, 2, dtype=prompt.dtype)
    labels = -torch.ones(batch, 1, 1, dtype=torch.int32)
    sparse, dense = sam.prompt_encoder(input_points=points, input_labels=labels, input_boxes=None,
                                       input_masks=None)
    sparse = torch.cat([sparse, prompt[:, None, None, :].to(sparse.dtype)], dim=2)
    pe = sam.get_image_wide_positional_embeddings().repeat(batch, 1, 1, 1)
    low, iou, _, obj = sam.mask_decoder(image_embeddings=maps[-1], image_positional_embeddings=pe,
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=True, high_resolution_features=maps[:-1])
    return low[:, 0].float(), iou[:, 0].float(), obj[:, 0].float()


@torch.no_grad()
def expected_tta(model: TerraScopeModel, g: np.ndarray, prompt: torch.Tensor, names: list[str],
                 undo_as: list[str] | None = None):
    """Mean over views of undo(decode(view(g))) per multimask channel; best-of-3 on the mean IoU.
    ``undo_as`` undoes each view as another one (to show that a mismatched undo would be caught)."""
    lows, ious, objs = [], [], []
    for name, undo in zip(names, undo_as or names):
        fwd, inv = NP_VIEWS[name][0], NP_VIEWS[undo][1]
        maps = model._sam2_maps(torch.from_numpy(np.ascontiguousarray(fwd(g))))
        low, iou, obj = ref_multimask(model, maps, prompt)
        lows.append(np.ascontiguousarray(inv(low.numpy())))
        ious.append(iou.numpy())
        objs.append(obj.numpy())
    low, iou, obj = np.mean(lows, 0), np.mean(ious, 0), np.mean(objs, 0)
    best = iou.argmax(-1)
    return low[np.arange(len(best)), best][:, None], iou, obj, best


def frames(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


# ---- config ------------------------------------------------------------------------------------------------
def test_config_field_round_trips_and_defaults_to_off(tmp_path):
    cfg = tiny_config(sam2_tta=4)
    cfg.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["sam2_tta"] == 4
    assert TerraScopeConfig.from_dict(data).sam2_tta == 4
    del data["sam2_tta"]  # configs written before the field existed (and official checkpoints) -> off
    assert TerraScopeConfig.from_dict(data).sam2_tta == 1
    assert tiny_config().sam2_tta == 1


@pytest.mark.parametrize("bad", [0, 9, -1, 2.0, True, "4"])
def test_config_rejects_bad_view_counts(bad):
    with pytest.raises(ValueError, match="sam2_tta"):
        tiny_config(sam2_tta=bad)


def test_encode_rejects_bad_view_counts():
    model = tiny_scope().model
    with pytest.raises(ValueError, match="views"):
        model.sam2_encode(torch.zeros(1, 3, 256, 256), views=9)


# ---- the transforms ----------------------------------------------------------------------------------------
def test_views_match_their_numpy_definitions_and_undo_exactly():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(2, 5, 5)
    seen = []
    for v, name in enumerate(sam2_tta.VIEW_NAMES):
        fwd, inv = NP_VIEWS[name]
        y = sam2_tta.apply_view(x, v)
        assert np.array_equal(y.numpy(), fwd(x.numpy())), name
        assert torch.equal(sam2_tta.undo_view(y, v), x), name
        assert np.array_equal(inv(y.numpy()), x.numpy()), name  # the numpy table is self-consistent
        assert np.array_equal(sam2_tta.undo_view(torch.from_numpy(np.ascontiguousarray(fwd(x.numpy()))), v).numpy(),
                              x.numpy()), name
        seen.append(tuple(y.flatten().tolist()))
    assert len(set(seen)) == 8  # eight distinct transforms


def test_merge_views_averages_logits_or_probabilities_in_the_original_frame():
    gen = torch.Generator().manual_seed(11)
    low, iou, obj = torch.randn(4, 2, 3, 6, 6, generator=gen) * 3, torch.rand(4, 2, 3), torch.randn(4, 2, 1)
    names = sam2_tta.VIEW_NAMES[:4]
    undone = np.stack([np.ascontiguousarray(NP_VIEWS[n][1](low[v].numpy())) for v, n in enumerate(names)])
    m_low, m_iou, m_obj = sam2_tta.merge_views(low, iou, obj)
    np.testing.assert_allclose(m_low.numpy(), undone.mean(0), atol=1e-6)
    np.testing.assert_allclose(m_iou.numpy(), iou.numpy().mean(0), atol=1e-7)
    np.testing.assert_allclose(m_obj.numpy(), obj.numpy().mean(0), atol=1e-7)
    p_low = sam2_tta.merge_views(low, iou, obj, "probs")[0]
    np.testing.assert_allclose(p_low.sigmoid().numpy(), (1 / (1 + np.exp(-undone))).mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="mean"):
        sam2_tta.merge_views(low, iou, obj, "median")


# ---- k = 1 is the previous code ----------------------------------------------------------------------------
@torch.no_grad()
def test_one_view_is_the_previous_code_bit_for_bit():
    model = scope(1).model
    g = torch.from_numpy(frames(2, 256, seed=1))
    prompt = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    feats = model.sam2_encode(g)
    want = model._sam2_maps(g)
    assert feats.views == 1 and len(feats.image_embeddings) == 3
    assert all(torch.equal(a, b) for a, b in zip(feats.image_embeddings, want))
    dec = model.sam2_decode(feats, prompt)
    low, iou, obj = ref_multimask(model, want, prompt)
    best = iou.argmax(-1)
    assert torch.equal(dec.iou, iou) and torch.equal(dec.object_score, obj) and torch.equal(dec.best, best)
    assert torch.equal(dec.low_res, low[torch.arange(2), best][:, None])


# ---- k > 1 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("views", [2, 4, 8])
@torch.no_grad()
def test_tta_decode_averages_each_view_mapped_back(views):
    """Against numpy-built views and undos: a swapped hflip/vflip (k=2 uses hflip only) or a rotation undone
    the wrong way changes the expected maps by far more than the tolerance (checked below)."""
    model = scope(views).model
    g = frames(1, 256, seed=3)
    prompt = torch.randn(1, 32, generator=torch.Generator().manual_seed(4))
    dec = model.sam2_decode(model.sam2_encode(torch.from_numpy(g)), prompt)
    names = list(sam2_tta.VIEW_NAMES[:views])
    low, iou, obj, best = expected_tta(model, g, prompt, names)
    np.testing.assert_allclose(dec.low_res.numpy(), low, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(dec.iou.numpy(), iou, atol=1e-5)
    np.testing.assert_allclose(dec.object_score.numpy(), obj, atol=1e-5)
    assert dec.best.tolist() == best.tolist()
    # the test has power: hflip undone as vflip (or a rotation undone the wrong way) is far off
    wrong = {"hflip": "vflip", "vflip": "hflip", "rot90": "rot270", "rot270": "rot90"}
    bad_low = expected_tta(model, g, prompt, names, [wrong.get(n, n) for n in names])[0]
    assert np.abs(bad_low - low).mean() > 0.02
    if views == 2:  # and a k=2 that flipped vertically (swapped views) would not match either
        assert np.abs(expected_tta(model, g, prompt, ["identity", "vflip"])[0] - low).mean() > 0.02


@pytest.mark.parametrize("views", [4, 8])
@torch.no_grad()
def test_symmetric_image_gives_the_one_view_scores_and_a_symmetrised_mask(views):
    """Every view of a symmetric image is the same input, so scores equal k=1's and the mask is the mean of
    the undone copies of k=1's mask (itself symmetric); a random network is not equivariant, so it is not
    k=1's mask itself."""
    one, many = scope(1).model, scope(views).model  # same seeds -> same weights
    a = torch.from_numpy(frames(1, 256, seed=6))
    sym = (a + a.flip(-1) + a.flip(-2) + a.flip(-1, -2)) / 4
    if views == 8:
        sym = (sym + sym.transpose(-1, -2)) / 2
    prompt = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    ref = one.sam2_decode(one.sam2_encode(sym), prompt)
    got = many.sam2_decode(many.sam2_encode(sym), prompt)
    torch.testing.assert_close(got.iou, ref.iou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.object_score, ref.object_score, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.best, ref.best)
    symmetrised = torch.stack([sam2_tta.undo_view(ref.low_res, v) for v in range(views)]).mean(0)
    torch.testing.assert_close(got.low_res, symmetrised, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got.low_res, got.low_res.flip(-1), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got.low_res, got.low_res.flip(-2), atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_views_stay_with_their_frames_through_slicing_and_concatenation():
    """What generation and the fast path do with features (``frame(k)`` of a batched encode, maps
    concatenated image by image for one batched decode) keeps every frame's views together."""
    model = scope(4).model
    g = torch.from_numpy(frames(3, 256, seed=8))
    both = model.sam2_encode(g)
    assert both.views == 4 and len(both.image_embeddings) == 12
    singles = [model.sam2_encode(g[i:i + 1]) for i in range(3)]
    for i in range(3):
        for x, y in zip(both.frame(i).image_embeddings, singles[i].image_embeddings):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    cat = Sam2Features([torch.cat([f.image_embeddings[i] for f in singles]) for i in range(12)], singles[0].image_pe)
    prompts = torch.randn(3, 32, generator=torch.Generator().manual_seed(9))
    dec = model.sam2_decode(cat, prompts)
    for i in range(3):
        one = model.sam2_decode(singles[i], prompts[i:i + 1])
        torch.testing.assert_close(dec.low_res[i:i + 1], one.low_res, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(dec.iou[i:i + 1], one.iou, atol=1e-5, rtol=1e-5)


def test_features_with_a_broken_map_count_are_refused():
    broken = Sam2Features([torch.zeros(1, 32, 16, 16)] * 4, torch.zeros(1, 32, 16, 16))
    with pytest.raises(ValueError, match="3 per dihedral view"):
        tiny_scope().model.sam2_decode(broken, torch.zeros(1, 32))


@torch.no_grad()
def test_answers_use_tta_end_to_end():
    """Through ``TerraScope.answer`` (two images encoded in one batch, then a [SEG] on each): the traced mask
    logits are the TTA of each [SEG]'s prompt over that image, and differ from the k=1 model's."""
    ts = scope(4)
    imgs = [ImageInput(rand_image(64, 96, seed=20 + i), f"t{i}") for i in range(2)]
    ctx = ts.prepare(imgs)
    assert ts.generator.encode_sam_many([ctx]) == 2
    trace = GenerationTrace()
    res = ts.answer(ctx, "q", settings=GenerationSettings(max_new_tokens=30), trace=trace,
                    forced_prefix="<think>Image: t1 [SEG] Image: t0 [SEG]")
    assert [s.image_index for s in res.steps] == [1, 0]
    size = ts.model.config.sam2.image_size
    for seg, step in zip(trace.segs, res.steps):
        g = sam2_pixels(imgs[step.image_index].pixels, size)[None]
        low = expected_tta(ts.model, g, seg["prompt"], list(sam2_tta.VIEW_NAMES[:4]))[0]
        np.testing.assert_allclose(seg["low_res"].numpy(), low, atol=2e-4, rtol=1e-4)
    plain = scope(1)
    trace1 = GenerationTrace()
    plain.answer(plain.prepare(imgs), "q", settings=GenerationSettings(max_new_tokens=30), trace=trace1,
                 forced_prefix="<think>Image: t1 [SEG] Image: t0 [SEG]")
    assert np.abs(trace1.segs[0]["low_res"].numpy() - trace.segs[0]["low_res"].numpy()).mean() > 0.02
