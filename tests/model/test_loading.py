"""Checkpoint loading: official layout mapping, SAM-2 sizes from shapes, pickles, native round trip."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import CHECKPOINT, FIXTURE, rand_image, tiny_config, tiny_scope

from model.api import TerraScope
from model.configuration_terrascope import PRESETS, TerraScopeConfig, preset_config
from model.loading import (
    CheckpointError,
    build_empty,
    infer_sam2_spec,
    load_model,
    map_official_name,
    random_model,
    save_native,
    tensor_shapes,
)
from model.types import GenerationSettings, ImageInput


def test_every_official_tensor_is_mapped_or_deliberately_skipped(official):
    shapes = tensor_shapes(CHECKPOINT)
    assert len(shapes) == 477
    skipped = official.load_info["skipped"]
    assert all(n.startswith("grounding_encoder.sam2_model.") for n in skipped)
    assert not any("image_encoder" in n or "sam_mask_decoder" in n or "sam_prompt_encoder" in n for n in skipped)
    params = dict(official.model.named_parameters()) | dict(official.model.named_buffers())
    covered = set()
    for name, shape in shapes.items():
        for ours, _ in map_official_name(name, shape):
            covered.add(ours.split("#row")[0])
    assert set(params) - {"language_model.model.rotary_emb.inv_freq",
                          "language_model.model.rotary_emb.original_inv_freq"} <= covered
    with pytest.raises(CheckpointError, match="unexpected"):
        map_official_name("vision_model.encoder.layers.0.attn.unknown.weight", (4,))


def test_sam2_architecture_inferred_from_shapes_matches_fixture_arch():
    arch = json.loads((FIXTURE / "sam2_tiny_arch.json").read_text())
    spec = infer_sam2_spec(tensor_shapes(CHECKPOINT))
    changed = arch["changed"]
    assert spec.hiera_embed_dim == changed["image_encoder.trunk(Hiera).embed_dim"]["fixture"]
    assert spec.hiera_stages == changed["image_encoder.trunk(Hiera).stages"]["fixture"]
    assert spec.hiera_global_att_blocks == changed["image_encoder.trunk(Hiera).global_att_blocks"]["fixture"]
    assert list(reversed(spec.stage_dims)) == changed["image_encoder.neck.backbone_channel_list"]["fixture"]
    assert spec.hidden_dim == changed["image_encoder.neck.d_model"]["fixture"]
    assert spec.decoder_mlp_dim == changed["sam_mask_decoder.transformer(TwoWayTransformer).mlp_dim"]["fixture"]
    assert spec.mem_dim == changed["memory_encoder.out_dim (=> mem_dim)"]["fixture"]
    assert spec.hiera_window_spec == arch["unchanged"]["Hiera"]["window_spec"]
    assert spec.stage_heads == arch["derived_fixture_dims"]["hiera_stage_heads"]
    assert spec.hiera_num_heads == arch["unchanged"]["Hiera"]["num_heads"]


def test_official_load_keeps_the_checkpoint_dtype_policy(official):
    assert official.model.dtype == torch.float32
    info = official.info()
    assert info["compat"] == "official" and info["template"] == "qwen_chat" and info["max_tokens_per_seg"] == 8
    bf16 = TerraScope.load(str(CHECKPOINT), device="cpu", dtype="bfloat16")
    dtypes = {p.dtype for p in bf16.model.parameters()}
    assert dtypes == {torch.bfloat16}


def _copy_checkpoint(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, dst)
    os.chmod(dst, 0o755)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    return dst


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickles_are_refused_with_a_reason(tmp_path):
    folder = _copy_checkpoint(tmp_path)
    (folder / "model.safetensors").unlink()
    plain = folder / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="convert them to safetensors"):
        load_model(folder, torch.device("cpu"), torch.float32)
    plain.unlink()
    with open(folder / "model.pth", "wb") as fh:
        pickle.dump({"w": _Evil()}, fh, protocol=2)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_model(folder, torch.device("cpu"), torch.float32)


def test_missing_and_mismatched_tensors_fail_clearly(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_checkpoint(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("mlp1.1.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder, torch.device("cpu"), torch.float32)
    state["mlp1.1.weight"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(folder, torch.device("cpu"), torch.float32)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        load_model(folder, torch.device("cpu"), torch.float32)


def test_native_save_load_round_trip(tmp_path):
    ts = tiny_scope(seed=3)
    out = save_native(ts.model, tmp_path / "native", tokenizer_dir=CHECKPOINT)
    assert json.loads((out / "config.json").read_text())["sam2"]["hiera_stages"] == [1, 1, 2, 1]
    again = TerraScope.load(str(out), device="cpu")
    a, b = ts.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    img = [ImageInput(rand_image(50, 70, seed=5))]
    s = GenerationSettings(max_new_tokens=20)
    r1 = ts.answer(img, "q", settings=s, forced_prefix="<think>x [SEG]")
    r2 = again.answer(img, "q", settings=s, forced_prefix="<think>x [SEG]")
    assert r1.token_ids == r2.token_ids and r1.steps[0].token_indices == r2.steps[0].token_indices


def test_official_checkpoint_converts_to_native(tmp_path, official):
    out = save_native(official.model, tmp_path / "conv", tokenizer_dir=CHECKPOINT)
    again = TerraScope.load(str(out), device="cpu")
    assert again.model.config.compat == "official" and again.model.config.format == "terrascope-native"
    a, b = official.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_model_is_built_in_the_target_dtype():
    model = random_model(tiny_config(), "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(t.device.type == "meta" for t in model.state_dict().values())


def test_presets_are_data_and_build():
    assert set(PRESETS) == {"terrascope-8b", "terrascope-mini"}
    mini = build_empty(preset_config("terrascope-mini"), torch.float32)
    n = sum(p.numel() for p in mini.parameters())
    assert 10e6 <= n <= 14e6, n
    big = preset_config("terrascope-8b")
    assert (big.llm.hidden_size, big.llm.num_hidden_layers, big.vision.num_hidden_layers) == (3584, 28, 24)
    assert big.sam2.hiera_stages == [2, 6, 36, 4] and big.tokens_per_tile == 256
    with pytest.raises(ValueError, match="unknown"):
        TerraScopeConfig.from_dict({"bogus": 1})


def test_preset_without_weights_says_so(monkeypatch):
    from model import configuration_terrascope

    # a clone without the embedded weights (e.g. a sparse checkout): point the preset at a missing folder
    monkeypatch.setitem(configuration_terrascope.PRESET_WEIGHTS, "terrascope-mini", "resources/models/absent")
    with pytest.raises(CheckpointError, match="no weights"):
        TerraScope.load("terrascope-mini", device="cpu")


def test_sharded_checkpoint_with_index_loads_identically(tmp_path, official):
    from safetensors.torch import load_file, save_file

    folder = _copy_checkpoint(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map |= {k: shard for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_model(folder, torch.device("cpu"), torch.float32)
    a, b = official.model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder, torch.device("cpu"), torch.float32)


def test_warm_up_costs_nothing_off_cuda(official):
    """The worker calls warm_up at load; off CUDA nothing is compiled or captured later, so it does nothing."""
    assert official.warm_up() == 0.0
