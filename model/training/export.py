"""Export a trained model as a native folder whose every file stays under a size cap (repo rule: < 16 MiB)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.loading import save_native
from model.modeling_terrascope import TerraScopeModel

MAX_SHARD_BYTES = 15 * 2**20


def shard_safetensors(folder: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Split ``model.safetensors`` into ``model-0000k-of-0000n.safetensors`` + index when it is too big.

    The index layout is the one transformers writes and ``model.loading`` reads.
    """
    single = folder / "model.safetensors"
    if single.stat().st_size <= max_bytes:
        return [single]
    state = load_file(str(single))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name]
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"tensor {name} alone is {nbytes} bytes > shard cap {max_bytes}")
        if size + nbytes > max_bytes - 64 * 1024 and shards[-1]:  # leave room for the header
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    n = len(shards)
    weight_map, paths = {}, []
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        paths.append(folder / fname)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    single.unlink()
    return paths


def export(model: TerraScopeModel, folder: Path, tokenizer_dir: Path, dtype: str = "bf16",
           max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The native folder (config, safetensors in ``dtype``, tokenizer) that ``TerraScope.load`` reads."""
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    small = sum(p.numel() for p in model.parameters()) < 200_000_000
    m = copy.deepcopy(model) if small else model  # the 8B is cast in place (no second copy in memory)
    m.to(device="cpu" if small else next(model.parameters()).device, dtype=target)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()  # a previous export's shards must not mix with this one
    save_native(m, folder, tokenizer_dir)
    shard_safetensors(folder, max_shard_bytes)
    return folder
