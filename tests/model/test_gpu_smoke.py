"""GPU smoke test: the official 8B shape with random bf16 weights built directly on the device, one question
with a forced [SEG]. Skipped without CUDA. Prints the figures (build time, peak memory, timings)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import CHECKPOINT, tiny_config

from model.api import TerraScope
from model.types import GenerationSettings, ImageInput

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_8b_random_bf16_forced_seg_on_gpu():
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ts = TerraScope.random("terrascope-8b", CHECKPOINT, device="cuda", dtype="bfloat16")
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = {p.dtype for p in ts.model.parameters()}
    assert params == {torch.bfloat16}
    assert all(p.device.type == "cuda" for p in ts.model.parameters())
    n_params = sum(p.numel() for p in ts.model.parameters())
    assert n_params > 7.5e9
    # no float32 copy of the model ever existed: peak stays close to the bf16 weights themselves
    assert torch.cuda.max_memory_allocated() < 2 * n_params * 1.25

    warm_s = ts.warm_up()  # what the worker runs at load: compile, graphs, cuBLAS
    assert warm_s > 0
    img = np.random.default_rng(0).integers(0, 256, size=(600, 900, 3), dtype=np.uint8)
    t1 = time.perf_counter()
    res = ts.answer([ImageInput(img)], "What proportion of the image is water?", ["10%", "25%", "40%", "60%"],
                    settings=GenerationSettings(max_new_tokens=48),
                    forced_prefix="<think>I first identify the water regions [SEG]")
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t1
    assert len(res.steps) == 1
    step = res.steps[0]
    assert step.mask.shape == (600, 900) and step.mask.dtype == bool
    assert 1 <= len(step.token_indices) <= ts.model.config.max_tokens_per_seg
    assert res.token_ids.count(ts.tokenizer.token_id("<REGION>")) == len(step.token_indices)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    gen_tokens = res.timings_ms["generated_tokens"]
    print(f"\n[gpu-smoke] {torch.cuda.get_device_name()} params={n_params / 1e9:.2f}B build={build_s:.1f}s "
          f"warm-up={warm_s:.1f}s first answer after warm-up={first_s:.2f}s "
          f"peak={peak_gib:.1f}GiB timings={ {k: round(v, 1) for k, v in res.timings_ms.items()} } "
          f"decode_tok_s={gen_tokens / max(res.timings_ms['decode_ms'], 1e-6) * 1e3:.1f} stopped={res.stopped}")


def test_model_input_normalised_on_cuda_is_bit_identical_to_numpy():
    """The ViT and SAM-2 inputs are normalised on the device; float32 /255, -mean, /std are correctly rounded
    there too, so the pixels equal the numpy reference (and so the official pipeline's) bit for bit."""
    from types import SimpleNamespace

    from model import preprocess as P
    from model.transfer import normalized_on

    img = np.random.default_rng(1).integers(0, 256, size=(700, 500, 3), dtype=np.uint8)
    dev = SimpleNamespace(device=torch.device("cuda"))
    tiles = P.dynamic_tiles(img)[0]
    got = normalized_on(dev, tiles, P.IMAGENET_MEAN, P.IMAGENET_STD).cpu().numpy()
    assert np.array_equal(got, P.normalize_tiles(tiles))
    parts = normalized_on(dev, [tiles[:2], tiles[2:]], P.IMAGENET_MEAN, P.IMAGENET_STD).cpu().numpy()
    assert np.array_equal(parts, got)  # a batch's images go through the pinned buffer in one upload
    got = normalized_on(dev, P.sam2_resize(img)[None], P.SAM2_MEAN, P.SAM2_STD).cpu().numpy()
    assert np.array_equal(got, P.sam2_pixels(img)[None])


def test_sam2_frames_started_with_the_context_equal_the_host_path():
    """On CUDA a context starts its SAM-2 resizes on the host pool and uploads them on a side stream; the
    encoder input made from those device frames is the host path's, bit for bit."""
    from model import preprocess as P
    from model.api import TerraScope

    ts = TerraScope.random(tiny_config(), CHECKPOINT, device="cuda", dtype="float32")
    imgs = [np.random.default_rng(k).integers(0, 256, size=(300 + 40 * k, 260, 3), dtype=np.uint8) for k in range(3)]
    ctx = ts.prepare([ImageInput(im, f"t{k}") for k, im in enumerate(imgs)])
    assert sorted(ctx.sam_frames) == [0, 1, 2]
    frames = [ts.generator._sam_frame(ctx, k) for k in range(3)]
    assert ctx.sam_frames == {} and all(f.device.type == "cuda" and f.dtype == torch.uint8 for f in frames)
    got = ts.generator._sam_input(frames).cpu().numpy()
    size = ts.model.config.sam2.image_size
    assert np.array_equal(got, np.stack([P.sam2_pixels(im, size) for im in imgs]))


def test_sam2_encoder_graph_replays_equal_the_eager_encoder(monkeypatch):
    """The SAM-2 encoder's CUDA graphs (model/sam2_graph.py) give the eager encoder's maps, and a replay's
    result is not overwritten by the next one."""
    from model.loading import random_model

    model = random_model(tiny_config(), "cuda", seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    size = model.config.sam2.image_size
    a, b = (torch.randn(n, 3, size, size, device="cuda", generator=gen) for n in (1, 3))
    monkeypatch.setenv("TERRASCOPE_SAM2_GRAPH", "0")
    eager_a, eager_b = model.sam2_encode(a), model.sam2_encode(b)
    monkeypatch.setenv("TERRASCOPE_SAM2_GRAPH", "1")
    graph_a = model.sam2_encode(a)
    graph_b = model.sam2_encode(b)
    again_a = model.sam2_encode(a)
    graphs = model.__dict__["_ts_sam2_graphs"]
    assert not graphs.disabled_reason and len(graphs.entries) == 2
    for eager, graph in ((eager_a, graph_a), (eager_b, graph_b), (eager_a, again_a)):
        for x, y in zip(eager.image_embeddings, graph.image_embeddings):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
