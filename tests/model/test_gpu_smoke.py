"""GPU smoke test: the official 8B shape with random bf16 weights built directly on the device, one question
with a forced [SEG]. Skipped without CUDA. Prints the figures (build time, peak memory, timings)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import CHECKPOINT

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
