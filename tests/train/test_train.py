"""The training entry point end to end on CPU: both stages, export, overfit, resume, DDP, bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.train import main
from model.training.config import ConfigError, config_from_dict, load_config
from model.training.trainlog import read_log

from .conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def test_two_stages_export_a_loadable_model(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "cfg.json", tiny_data, tmp_path / "run")
    save = tmp_path / "model"
    assert main([str(cfg), "--device", "cpu", "--save-dir", str(save), "--no-progress"]) == 0
    rows = read_log(tmp_path / "run" / "train_log.jsonl")
    assert [r["stage"] for r in rows] == ["stage1_res"] * 2 + ["stage2_sft"] * 2
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "run" / "train_loss.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "val_mask_iou" in summary["stages"][1]
    # bf16 safetensors, LoRA merged away, loadable by the runtime, answers with a mask
    state = load_file(str(save / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values() if t.is_floating_point())
    assert not any("lora" in k for k in state)
    from model.api import TerraScope
    from model.training.data import read_image
    from model.types import GenerationSettings, ImageInput

    ts = TerraScope.load(str(save), device="cpu")
    img = read_image(tiny_data / "images" / "s0.png")
    res = ts.answer([ImageInput(img)], "Please segment the buildings.", forced_prefix="[SEG]",
                    settings=GenerationSettings(max_new_tokens=4, max_seg=1))
    assert len(res.steps) == 1 and res.steps[0].mask.shape == img.shape[:2]


def test_loss_decreases_on_an_overfit_batch(tiny_data, tmp_path):
    from model.prompting import TokenizerWrapper
    from model.training.data import ExampleBuilder, load_records
    from model.training.loop import build_model, init_dist, prepare_tokenizer
    from model.training.step import Banks, TrainingForward, collate

    cfg = load_config(write_config(tmp_path / "cfg.json", tiny_data, tmp_path / "run"))
    d = init_dist("cpu")
    tok = TokenizerWrapper(prepare_tokenizer(cfg, tmp_path / "run", d))
    model = build_model(cfg, tok, d)
    builder = ExampleBuilder(model.config, tok, 1024)
    exs, _ = builder.build_all([r for r in load_records(tiny_data) if r["id"] in ("ca0", "res1")])
    banks = Banks(exs, d.device)
    fwd = TrainingForward(model, banks)
    batch = collate(exs, banks, builder, [True, True], 0.0, np.random.default_rng(0), pad_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        out = fwd(batch)
        losses.append((float(out["lm_loss"].detach()), float(out["seg_loss"].detach())))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    (lm0, seg0), (lm1, seg1) = losses[0], losses[-1]
    assert lm1 < 0.6 * lm0, losses
    assert seg1 < seg0, losses


def test_resume_continues_exactly(tiny_data, tmp_path):
    """3+3 steps in one go == stop after 2, resume to the end (sampler, optimiser, RNG, schedule restored)."""
    import shutil

    raw = json.loads(write_config(tmp_path / "a.json", tiny_data, tmp_path / "a").read_text())
    raw["stages"][0]["max_steps"] = 3
    raw["stages"][1]["max_steps"] = 3
    raw["val_limit"] = 0
    (tmp_path / "a.json").write_text(json.dumps(raw))
    assert main([str(tmp_path / "a.json"), "--device", "cpu", "--save-dir", str(tmp_path / "ma"), "--no-progress"]) == 0
    raw["out"] = str(tmp_path / "b")
    (tmp_path / "b.json").write_text(json.dumps(raw))
    shutil.copytree(tmp_path / "a" / "tokenizer", tmp_path / "b" / "tokenizer")
    for stop in (2, 4):  # once inside stage 1, once inside the LoRA stage
        assert main([str(tmp_path / "b.json"), "--device", "cpu", "--resume", "--stop-after-steps", str(stop),
                     "--no-progress"]) == 0
        ck = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)
        assert ck["global_step"] == stop
    assert main([str(tmp_path / "b.json"), "--device", "cpu", "--resume", "--save-dir", str(tmp_path / "mb"),
                 "--no-progress"]) == 0
    a = load_file(str(tmp_path / "ma" / "model.safetensors"))
    b = load_file(str(tmp_path / "mb" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    rows = read_log(tmp_path / "b" / "train_log.jsonl")
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ref = read_log(tmp_path / "a" / "train_log.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]


def test_bad_configs_name_the_problem(tmp_path):
    base = {"name": "x", "model": {"preset": "terrascope-mini"}, "data": "d",
            "stages": [{"name": "s", "kinds": ["res"], "train": ["sam2_mask_decoder"], "max_steps": 1}]}
    config_from_dict(base)
    cases = [
        ({"stages": [{**base["stages"][0], "train": ["brain"]}]}, "unknown group"),
        ({"stages": [{**base["stages"][0], "kinds": ["movies"]}]}, "kinds"),
        ({"stages": [{**base["stages"][0], "max_steps": None}]}, "max_steps, epochs or time_fraction"),
        ({"stages": [{**base["stages"][0], "train": ["llm"], "lora": {"r": 4}}]}, "LoRA"),
        ({"model": {"preset": "a", "checkpoint": "b"}}, "exactly one"),
        ({"stages": [{**base["stages"][0], "lr": 0}]}, "lr"),
        ({"stages": [{**base["stages"][0], "option_redraw": 1.5}]}, "option_redraw"),
        ({"stages": [{**base["stages"][0], "redraw_jitter": -0.1}]}, "redraw_jitter"),
        ({"stages": [{**base["stages"][0], "kind_weights": {"films": 1.0}}]}, "unknown kind"),
        ({"stages": [{**base["stages"][0], "kind_weights": {"options": 1.0}}]}, "needs option_redraw"),
        ({"bogus": 1}, "unknown key"),
    ]
    for over, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({**base, **over})
    (tmp_path / "bad.json").write_text("{oops")
    assert main([str(tmp_path / "bad.json")]) == 2
    assert main([str(tmp_path / "missing.json")]) == 2


def test_shipped_configs_are_valid():
    for name in ("terrascope-mini.json", "terrascope-8b-finetune.json"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.stages[0].name.startswith("stage1")
    cont = load_config(REPO / "configs" / "terrascope-mini-continue.json")
    assert cont.model["checkpoint"] == cont.save_dir == "resources/models/terrascope-mini"
    assert {"vision", "sam2_image_encoder"}.isdisjoint(cont.stages[-1].train) and cont.stages[-1].cache_frozen
    seg = load_config(REPO / "configs" / "terrascope-mini-seg.json")
    assert seg.stages[0].sam2_dihedral and set(seg.stages[0].train) <= {
        "sam2_image_encoder", "sam2_prompt_encoder", "sam2_mask_decoder", "seg_projector"}
    ft = load_config(REPO / "configs" / "terrascope-8b-finetune.json")
    assert "vision" not in ft.stages[1].train and ft.stages[1].lora is not None
    assert set(ft.stages[0].train) <= {"sam2_mask_decoder", "sam2_prompt_encoder", "seg_projector"}


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_data, tmp_path):
    """The DDP path (gloo on CPU): two ranks, one step per stage, one exported model."""
    cfg = write_config(tmp_path / "cfg.json", tiny_data, tmp_path / "run", max_steps=1)
    raw = json.loads(cfg.read_text())
    raw["stages"][0]["max_steps"] = 1
    cfg.write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "model.train", str(cfg), "--device", "cpu", "--save-dir", str(tmp_path / "m"), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_log(tmp_path / "run" / "train_log.jsonl")
    assert len(rows) == 2  # rank 0 logs once per step
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_same_code_fine_tunes_an_official_checkpoint(tiny_data, tmp_path):
    """The 8B recipe (frozen ViT, LoRA LLM, mask decoder + projectors) on the official-layout tiny fixture."""
    raw = json.loads((REPO / "configs" / "terrascope-8b-finetune.json").read_text())
    raw.update(model={"checkpoint": str(REPO / "tests/fixtures/terrascope-official-tiny/checkpoint"),
                      "load_dtype": "fp32"},
               data=str(tiny_data), out=str(tmp_path / "run"), save_dir=str(tmp_path / "m"), max_seq_len=4096,
               gradient_checkpointing=True, val_limit=0)
    for st in raw["stages"]:
        st.update(epochs=None, max_steps=1, batch_size=1, grad_accum=1, kinds=["res", "l1"])
    (tmp_path / "ft.json").write_text(json.dumps(raw))
    before = load_file(str(REPO / "tests/fixtures/terrascope-official-tiny/checkpoint/model.safetensors"))
    assert main([str(tmp_path / "ft.json"), "--device", "cpu", "--no-progress", "--limit-records", "4"]) == 0
    after = load_file(str(tmp_path / "m" / "model.safetensors"))
    vit = "vision_model.encoder.layer.0.attention.q_proj.weight"
    assert torch.equal(after[vit], before["vision_model.encoder.layers.0.attn.qkv.weight"][:64].to(torch.bfloat16))
    dec = [k for k in after if k.startswith("grounding_encoder.mask_decoder.") and k.endswith("weight")]
    changed = [k for k in dec if not torch.equal(after[k].float(), _official(before, k))]
    assert changed, "the mask decoder did not train"
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q].to(torch.bfloat16)), "the LoRA update was not merged"
    from model.api import TerraScope

    assert TerraScope.load(str(tmp_path / "m"), device="cpu").model.config.compat == "official"


def _official(before: dict, ours: str) -> torch.Tensor:
    from model.loading import map_official_name

    for name, t in before.items():
        for mapped, transform in map_official_name(name, tuple(t.shape)):
            if mapped == ours:
                return transform(t).to(torch.bfloat16).float()
    raise KeyError(ours)


def test_export_shards_under_the_cap_and_loads(tmp_path):
    from model.api import TerraScope
    from model.configuration_terrascope import PRESETS, TerraScopeConfig
    from model.loading import random_model
    from model.tokenizer_train import save_tokenizer, train_tokenizer
    from model.training.export import export
    from model.training.loop import _deep_merge

    from .conftest import TINY_MODEL

    cfg = TerraScopeConfig.from_dict(_deep_merge(PRESETS["terrascope-mini"], TINY_MODEL))
    model = random_model(cfg, "cpu", torch.float32, seed=3)
    save_tokenizer(train_tokenizer(["a building [SEG] 12.5%"] * 10, 300, 1), tmp_path / "tok")
    cap = 400_000
    out = export(model, tmp_path / "m", tmp_path / "tok", "bf16", max_shard_bytes=cap)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert all(p.stat().st_size < cap for p in shards)
    loaded = TerraScope.load(str(out), device="cpu", dtype="float32").model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded[name], t.to(torch.bfloat16).float()), name


def test_dihedral_turns_image_and_mask_together():
    """All 8 symmetries are distinct, and a mask made from the image stays the mask of the turned image."""
    from model.training.augment import dihedral

    img = torch.zeros(8, 6, 6, 3, dtype=torch.uint8)
    img[:, 0, 1:4, 0] = 200  # an asymmetric L-shape in channel 0
    img[:, 1:3, 0, 0] = 200
    mask = (img[..., 0] > 0).to(torch.uint8)
    ks = torch.arange(8)
    turned, turned_mask = dihedral(img, ks, (1, 2)), dihedral(mask, ks, (1, 2))
    assert torch.equal((turned[..., 0] > 0).to(torch.uint8), turned_mask)
    assert len({bytes(t.flatten().tolist()) for t in turned_mask}) == 8
    assert torch.equal(turned[0], img[0]) and torch.equal(turned[2], img[2].flip(0).flip(1))


def _frames_with_masks(n: int = 6, size: int = 64, tsize: int = 16, seed: int = 0):
    """uint8 frames whose red channel is 200 exactly on blocky objects, and those objects as [n, tsize, tsize]
    masks: whatever a transform does to a frame, red > 100 must stay its mask."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, tsize // 4, tsize // 4, generator=g) > 0.6).float()
    mask = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)  # objects of 4x4 mask pixels
    img = torch.randint(0, 90, (n, size, size, 3), dtype=torch.uint8, generator=g)
    up = mask.repeat_interleave(size // tsize, 1).repeat_interleave(size // tsize, 2).bool()
    img[..., 0][up] = 200
    return img, mask


def test_scale_crop_moves_masks_with_their_frames_and_keeps_most_of_each_mask():
    from model.training.augment import MIN_KEPT, scale_crop

    img, mask = _frames_with_masks()
    seg_frame = torch.arange(img.shape[0])
    cropped, cmask = scale_crop(img, mask, seg_frame, 0.5, torch.Generator().manual_seed(1))
    assert cropped.shape == img.shape and cropped.dtype == torch.uint8 and cmask.shape == mask.shape
    assert not torch.equal(cropped, img)  # at least one frame was cropped
    changed = 0
    for f in range(img.shape[0]):
        if torch.equal(cropped[f], img[f]):
            continue
        changed += 1
        # the mask, upsampled to the frame, still sits where the red objects are (bilinear edges aside)
        up = torch.nn.functional.interpolate(cmask[f][None, None], size=img.shape[1:3], mode="nearest")[0, 0]
        red = cropped[f, ..., 0] > 100
        agree = ((up > 0.5) == red).float().mean()
        assert agree > 0.9, float(agree)
        # zooming in: the crop holds a share >= MIN_KEPT of the object pixels, at a larger scale
        assert cmask[f].sum() >= MIN_KEPT * mask[f].sum() * 0.9
    assert changed >= 2
    # a frame whose crop would cut away most of its only object stays whole
    one = torch.zeros(1, 16, 16)
    one[0, :2, :2] = 1
    px = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    for seed in range(20):
        _, out_m = scale_crop(px, one, torch.zeros(1, dtype=torch.long), 0.3, torch.Generator().manual_seed(seed))
        assert out_m.sum() >= MIN_KEPT * one.sum()


def test_photometric_jitter_changes_radiometry_not_geometry():
    from model.training.augment import photometric

    img, _ = _frames_with_masks(seed=3)
    assert photometric(img, 0.0) is img
    out = photometric(img, 0.3, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == img.shape and not torch.equal(out, img)
    # bright objects stay the brightest red pixels of their frame: the mask is still readable from the image
    for f in range(img.shape[0]):
        obj = img[f, ..., 0] == 200
        if obj.any() and (~obj).any():
            assert out[f, ..., 0][obj].float().mean() > out[f, ..., 0][~obj].float().mean()


def test_sam2_augmentation_needs_a_trained_encoder(tmp_path):
    from model.training.config import ConfigError, _stage

    base = {"name": "s", "kinds": ["res"], "train": ["sam2_mask_decoder"], "max_steps": 1}
    with pytest.raises(ConfigError, match="sam2_image_encoder"):
        _stage({**base, "sam2_photometric": 0.2}, 0)
    with pytest.raises(ConfigError, match="sam2_crop_min_side"):
        _stage({**base, "train": ["sam2_image_encoder"], "sam2_crop_min_side": 1.5}, 0)
    st = _stage({**base, "train": ["sam2_image_encoder"], "sam2_crop_min_side": 0.6, "sam2_photometric": 0.2}, 0)
    assert st.sam2_augment.active and st.sam2_augment.crop_min_side == 0.6
