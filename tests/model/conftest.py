"""Shared fixtures for the model tests: the official tiny checkpoint, its references, tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.api import TerraScope
from model.configuration_terrascope import TerraScopeConfig
from model.loading import random_model
from model.prompting import TokenizerWrapper
from model.types import ImageInput

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "terrascope-official-tiny"
CHECKPOINT = FIXTURE / "checkpoint"


@pytest.fixture(scope="session")
def refs() -> np.lib.npyio.NpzFile:
    return np.load(FIXTURE / "references.npz")


@pytest.fixture(scope="session")
def meta() -> dict:
    return json.loads((FIXTURE / "references.json").read_text())["meta"]


@pytest.fixture(scope="session")
def official() -> TerraScope:
    return TerraScope.load(str(CHECKPOINT), device="cpu")


def fixture_image(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURE / "images" / f"{name}.png").convert("RGB"))


def fixture_inputs(tag: str) -> list[ImageInput]:
    if "multi" in tag:
        return [ImageInput(fixture_image("C_pre"), "t0"), ImageInput(fixture_image("C_post"), "t1")]
    return [ImageInput(fixture_image("A" if tag.endswith("_A") else "B"))]


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.unpackbits(packed)[: int(np.prod(shape))].reshape(shape).astype(bool)


def tiny_config(**overrides) -> TerraScopeConfig:
    """A very small model: 112-px tiles (16 tokens per tile, 4x4 grid), 256-px SAM-2, vocab of the fixture."""
    data = {
        "name": "tiny-test",
        "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                   "image_size": 112, "patch_size": 14},
        "llm": {"vocab_size": 1066, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 96},
        "sam2": {"image_size": 256, "hiera_embed_dim": 8, "hiera_num_heads": 1, "hiera_stages": [1, 1, 2, 1],
                 "hiera_global_att_blocks": [3], "hiera_window_spec": [8, 4, 4, 4],
                 "hiera_window_pos_embed_bkg": [4, 4], "hidden_dim": 32, "decoder_mlp_dim": 64,
                 "decoder_num_heads": 2, "iou_head_hidden_dim": 32},
        "template": "terrascope",
        "compat": "native",
        "max_tokens_per_seg": 6,
    }
    data.update(overrides)
    return TerraScopeConfig.from_dict(data)


def tiny_scope(seed: int = 0, **overrides) -> TerraScope:
    cfg = tiny_config(**overrides)
    return TerraScope(random_model(cfg, "cpu", seed=seed), TokenizerWrapper(CHECKPOINT), "random", cfg.name)


@pytest.fixture()
def tiny() -> TerraScope:
    return tiny_scope()


def rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core box run ~20x faster single-threaded (no spin-waiting on busy cores)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
