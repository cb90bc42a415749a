"""A tiny dataset in the exported record format and a tiny model config, for CPU training tests.

The dataset is real in format (PNG images, PNG masks, JSONL records with grounding spans) and content
(a bright "building" rectangle on textured ground whose mask and measurements the records state), so the
training code reads it exactly as it reads ``python -m model.data.build`` output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: Model overrides that keep every CPU test fast (112 px ViT tiles -> 16 tokens, 128 px SAM-2).
TINY_MODEL = {
    "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": 112},
    "llm": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "intermediate_size": 64},
    "sam2": {"image_size": 128, "hiera_embed_dim": 8, "hiera_num_heads": 1, "hiera_stages": [1, 1, 2, 1],
             "hiera_global_att_blocks": [3], "hiera_window_spec": [4, 4, 4, 4], "hiera_window_pos_embed_bkg": [4, 4],
             "hidden_dim": 16, "decoder_mlp_dim": 32, "decoder_num_heads": 2, "iou_head_hidden_dim": 16,
             "mem_dim": 8},
    "max_dynamic_patch": 2,
    "max_tokens_per_seg": 4,
}


def _scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    img = (rng.integers(40, 90, (size, size, 3))).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    h, w = rng.integers(10, 30, 2)
    r, c = rng.integers(0, size - h), rng.integers(0, size - w)
    mask[r:r + h, c:c + w] = True
    img[mask] = (200, 190, 180)
    return img, mask


def _span(mask: np.ndarray) -> str:
    pct = 100.0 * mask.mean()
    return f" [area {mask.sum() * 0.25 / 1e4:.2f} ha, {pct:.1f}% of valid area, 1 object]"


def write_dataset(root: Path, n_scenes: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    recs = []
    for i in range(n_scenes):
        split = "val" if i == n_scenes - 1 else "train"
        img, mask = _scene(rng)
        img2, mask2 = _scene(rng)
        Image.fromarray(img).save(root / f"images/s{i}.png")
        Image.fromarray(img2).save(root / f"images/s{i}b.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"masks/s{i}.png")
        Image.fromarray(mask2.astype(np.uint8) * 255).save(root / f"masks/s{i}b.png")
        pct = 100.0 * mask.mean()
        opts = [f"{pct:.1f}%", f"{pct * 2.2:.1f}%", f"{pct * 0.4:.1f}%", f"{pct * 3.1:.1f}%"]
        order = rng.permutation(4)
        letters = "ABCD"
        choices = [f"{letters[k]}. {opts[j]}" for k, j in enumerate(order)]
        answer = letters[int(np.flatnonzero(order == 0)[0])]
        one = [{"path": f"images/s{i}.png", "role": "optical"}]
        seg = [{"path": f"masks/s{i}.png", "image": 0, "grounding": _span(mask)}]
        recs += [
            {"id": f"res{i}", "kind": "res", "task": "res", "images": one,
             "question": "Please segment the buildings.", "answer": "", "target": "[SEG]", "seg_masks": seg,
             "split": split},
            {"id": f"ca{i}", "kind": "l1", "task": "CA", "images": one,
             "question": "What share of the image do buildings cover?", "choices": choices, "answer": answer,
             "target": f"<think>I first identify the buildings [SEG]. They cover {pct:.1f}%.</think>"
                       f"<answer>{answer}</answer>", "seg_masks": seg, "split": split,
             "check": {"op": "coverage", "segs": [0], "value_text": f"{pct:.1f}%"}},
            {"id": f"bce{i}", "kind": "l2", "task": "BCE",
             "images": [{"path": f"images/s{i}.png", "role": "t0"}, {"path": f"images/s{i}b.png", "role": "t1"}],
             "question": "Did the buildings grow?", "choices": ["A. yes", "B. no"], "answer": "A",
             "target": "<think>Image: t0 the buildings [SEG] Image: t1 the buildings [SEG]</think><answer>A</answer>",
             "seg_masks": [{"path": f"masks/s{i}.png", "image": 0, "grounding": _span(mask)},
                           {"path": f"masks/s{i}b.png", "image": 1, "grounding": _span(mask2)}],
             "split": split},
            {"id": f"sar{i}", "kind": "cap", "task": "cap",
             "images": [{"path": f"images/s{i}b.png", "role": "sar"}, {"path": f"images/s{i}.png", "role": "optical"}],
             "question": "Describe the scene.", "answer": "",
             "target": "<think>Image: optical the buildings [SEG] cover part of the tile.</think><answer>buildings</answer>",
             "seg_masks": [{"path": f"masks/s{i}.png", "image": 1, "grounding": _span(mask)}], "split": split},
        ]
    with (root / "records.jsonl").open("w") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    return root


def write_config(path: Path, data: Path, out: Path, **stage_over) -> Path:
    stage1 = {"name": "stage1_res", "kinds": ["res"], "batch_size": 2, "max_steps": 2, "lr": 1e-3,
              "train": ["vision", "projector", "llm", "llm_embed", "sam2_image_encoder", "sam2_prompt_encoder",
                        "sam2_mask_decoder", "seg_projector"], "sam2_dihedral": True,
              "sam2_photometric": 0.2, "sam2_crop_min_side": 0.6}
    stage2 = {"name": "stage2_sft", "kinds": ["res", "l1", "l2", "cap"], "batch_size": 2, "max_steps": 2,
              "lr": 1e-3, "train": ["projector", "sam2_mask_decoder", "seg_projector"],
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "ground_prob": 0.5, "ground_jitter": 0.1,
              "option_redraw": 0.5, "redraw_jitter": 0.4}
    stage2.update(stage_over)
    cfg = {"name": "tiny", "model": {"preset": "terrascope-mini", "overrides": TINY_MODEL},
           "tokenizer": {"vocab_size": 400, "min_frequency": 1}, "data": str(data), "out": str(out),
           "stages": [stage1, stage2], "seed": 0, "log_every": 1, "max_seq_len": 512, "num_workers": 1, "val_limit": 4}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_data"))
