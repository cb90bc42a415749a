"""Checkpoint loading: the official Sa2VA/TerraScope release layout and our native folder format.

Both paths build the modules on the ``meta`` device (no memory), then stream tensors shard by shard
(safetensors, memory-mapped) straight to the target device and dtype, assigning each one; nothing is ever
materialised in float32 first. Pickled checkpoints are refused unless ``torch.load(weights_only=True)``
accepts them: a pickle can run arbitrary code when unpickled, and ``weights_only`` is the loader that
refuses to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .configuration_terrascope import LLMSpec, Sam2Spec, TerraScopeConfig, VisionSpec
from .modeling_terrascope import TerraScopeModel

OFFICIAL_ARCH = "Sa2VAChatModel"
NATIVE_FORMAT = "terrascope-native"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")

#: SAM-2 video-memory tensors of the release. With a language prompt on every frame, every frame is an
#: initial conditioning frame, so the official outputs never read them; they are not loaded.
SAM2_MEMORY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "obj_ptr_proj.", "mask_downsample.", "maskmem_tpos_enc",
    "no_mem_pos_enc", "no_obj_ptr",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded, with the reason."""


# ---- tensor sources -------------------------------------------------------------------------------------
def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        _check_pickles(pickles)
        raise CheckpointError(
            f"{folder}: only pickled weights ({', '.join(p.name for p in pickles)}); they load with "
            "weights_only=True, but convert them to safetensors first (pickles are not streamed)."
        )
    raise CheckpointError(f"{folder}: no model.safetensors (or shards) found")


def _check_pickles(pickles: list[Path]) -> None:
    for path in pickles:
        try:
            torch.load(path, map_location="meta", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not a plain tensor pickle
            raise CheckpointError(
                f"refusing {path.name}: it is a pickle that does not load with torch.load(weights_only=True) "
                f"({type(exc).__name__}: {exc}). Unpickling it could execute arbitrary code; "
                "convert it to safetensors with a trusted tool."
            ) from None


def iter_tensors(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """Yield (name, loader, shape) for every tensor, shard by shard, without loading anything yet."""
    for path in _safetensor_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                shape = tuple(handle.get_slice(name).get_shape())
                yield name, (lambda h=handle, n=name: h.get_tensor(n)), shape


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, _, shape in iter_tensors(folder)}


# ---- official layout -> our modules ----------------------------------------------------------------------
_SAM2_RULES: list[tuple[str, str]] = [
    (r"image_encoder\.trunk\.patch_embed\.proj\.", "vision_encoder.backbone.patch_embed.projection."),
    (r"image_encoder\.trunk\.pos_embed$", "vision_encoder.backbone.pos_embed"),
    (r"image_encoder\.trunk\.pos_embed_window$", "vision_encoder.backbone.pos_embed_window"),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.norm1\.", r"vision_encoder.backbone.blocks.\1.layer_norm1."),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.norm2\.", r"vision_encoder.backbone.blocks.\1.layer_norm2."),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.attn\.", r"vision_encoder.backbone.blocks.\1.attn."),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.0\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_in."),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.mlp\.layers\.1\.", r"vision_encoder.backbone.blocks.\1.mlp.proj_out."),
    (r"image_encoder\.trunk\.blocks\.(\d+)\.proj\.", r"vision_encoder.backbone.blocks.\1.proj."),
    (r"image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    (r"sam_prompt_encoder\.no_mask_embed\.", "prompt_encoder.no_mask_embed."),
    (r"sam_prompt_encoder\.not_a_point_embed\.", "prompt_encoder.not_a_point_embed."),
    (r"sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.0\.", r"mask_decoder.transformer.layers.\1.mlp.proj_in."),
    (r"sam_mask_decoder\.transformer\.layers\.(\d+)\.mlp\.layers\.1\.", r"mask_decoder.transformer.layers.\1.mlp.proj_out."),
    (r"sam_mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"sam_mask_decoder\.transformer\.(.*)\.out_proj\.", r"mask_decoder.transformer.\1.o_proj."),
    (r"sam_mask_decoder\.transformer\.", "mask_decoder.transformer."),
    (r"sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    (r"sam_mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.0\.",
     r"mask_decoder.\1.proj_in."),
    (r"sam_mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.1\.",
     r"mask_decoder.\1.layers.0."),
    (r"sam_mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.2\.",
     r"mask_decoder.\1.proj_out."),
    (r"sam_mask_decoder\.", "mask_decoder."),
    (r"no_mem_embed$", "no_memory_embedding"),
]

_VIT_RULES: list[tuple[str, str]] = [
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"encoder\.layers\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.projection_layer."),
    (r"encoder\.layers\.(\d+)\.attn\.q_norm\.", r"encoder.layer.\1.attention.q_norm."),
    (r"encoder\.layers\.(\d+)\.attn\.k_norm\.", r"encoder.layer.\1.attention.k_norm."),
    (r"encoder\.layers\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
    (r"encoder\.layers\.(\d+)\.norm1\.", r"encoder.layer.\1.layernorm_before."),
    (r"encoder\.layers\.(\d+)\.norm2\.", r"encoder.layer.\1.layernorm_after."),
    (r"encoder\.layers\.(\d+)\.ls1$", r"encoder.layer.\1.lambda_1"),
    (r"encoder\.layers\.(\d+)\.ls2$", r"encoder.layer.\1.lambda_2"),
]


def _apply_rules(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, count = re.subn("^" + pattern if not pattern.startswith("^") else pattern, repl, name, count=1)
        if count:
            return new
    return None


def map_official_name(name: str, shape: tuple[int, ...]) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Official tensor name -> [(our name, transform)], [] for tensors deliberately not loaded.

    Raises CheckpointError for a name we do not know (so a layout change cannot go unnoticed).
    """
    ident: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    if name.startswith(("language_model.", "mlp1.", "text_hidden_fcs.")):
        if name.startswith("text_hidden_fcs.") and not re.match(r"text_hidden_fcs\.[02]\.", name):
            raise CheckpointError(f"unexpected tensor {name}")
        return [(name, ident)]
    if name.startswith("vision_model."):
        rest = name[len("vision_model."):]
        qkv = re.match(r"encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", rest)
        if qkv:
            layer, kind = qkv.groups()
            base = f"vision_model.encoder.layer.{layer}.attention"
            third = shape[0] // 3
            return [(f"{base}.{p}_proj.{kind}", (lambda t, i=i: t[i * third:(i + 1) * third]))
                    for i, p in enumerate("qkv")]
        mapped = _apply_rules(rest, _VIT_RULES)
        if mapped is None:
            raise CheckpointError(f"unexpected vision tensor {name}")
        return [("vision_model." + mapped, ident)]
    if name.startswith("grounding_encoder.sam2_model."):
        rest = name[len("grounding_encoder.sam2_model."):]
        if rest.startswith(SAM2_MEMORY_PREFIXES):
            return []
        pe = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
        if rest == pe:
            return [("grounding_encoder.prompt_encoder.shared_embedding.positional_embedding", ident),
                    ("grounding_encoder.shared_image_embedding.positional_embedding", ident)]
        point = re.match(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$", rest)
        if point:
            row = int(point.group(1))
            return [(f"grounding_encoder.prompt_encoder.point_embed.weight#row{row}", ident)]
        mapped = _apply_rules(rest, _SAM2_RULES)
        if mapped is None:
            raise CheckpointError(f"unexpected SAM-2 tensor {name}")
        if mapped == "no_memory_embedding":
            return [("grounding_encoder.no_memory_embedding", lambda t: t.reshape(1, 1, -1))]
        return [("grounding_encoder." + mapped, ident)]
    raise CheckpointError(f"unexpected tensor {name} (not part of the official TerraScope layout)")


# ---- official config -> ours ------------------------------------------------------------------------------
def infer_sam2_spec(shapes: dict[str, tuple[int, ...]], prefix: str = "grounding_encoder.sam2_model.") -> Sam2Spec:
    """SAM-2 sizes from tensor shapes (the official config has none: the research code hard-codes Hiera-L).

    Shapes give every size. Hyper-parameters that leave no trace in shapes follow the release's Hiera-L
    recipe: 2 heads doubling per stage, window sizes [w0, 4, 16, 8], 3 query-pool stages, 8 decoder heads.
    Global-attention blocks: Hiera-L's [23, 33, 43] for the Hiera-L stage layout, else the last block of the
    third stage (where every SAM-2 Hiera puts its final global block). Pass an explicit block to override.
    """
    def shape(key: str) -> tuple[int, ...]:
        full = prefix + key
        if full not in shapes:
            raise CheckpointError(f"SAM-2 tensor {full} missing; cannot infer the SAM-2 architecture")
        return shapes[full]

    embed = shape("image_encoder.trunk.patch_embed.proj.weight")[0]
    block_ids = sorted({int(m.group(1)) for k in shapes
                        if (m := re.match(re.escape(prefix) + r"image_encoder\.trunk\.blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError("SAM-2 Hiera blocks are missing or not numbered 0..n-1")
    starts = [b for b in block_ids if prefix + f"image_encoder.trunk.blocks.{b}.proj.weight" in shapes]
    bounds = [0] + starts + [len(block_ids)]
    stages = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    dims = [shape(f"image_encoder.trunk.blocks.{bounds[i]}.norm2.weight")[0] for i in range(len(stages))]
    if dims != [embed * 2**i for i in range(len(stages))]:
        raise CheckpointError(f"SAM-2 Hiera stage dims {dims} are not embed_dim doubling per stage")
    if stages == [2, 6, 36, 4]:
        global_blocks = [23, 33, 43]
    elif len(stages) >= 3:
        global_blocks = [sum(stages[:3]) - 1]
    else:
        global_blocks = []
    window0 = shape("image_encoder.trunk.pos_embed_window")[-1]
    bkg = list(shape("image_encoder.trunk.pos_embed")[-2:])
    hidden = shape("sam_prompt_encoder.no_mask_embed.weight")[-1]
    neck = [shape(f"image_encoder.neck.convs.{i}.conv.weight") for i in range(len(stages))]
    if [n[1] for n in neck] != list(reversed(dims)) or any(n[0] != hidden for n in neck):
        raise CheckpointError("SAM-2 neck channels do not match the Hiera stages / prompt dim")
    n_dec = len({k for k in shapes if re.match(re.escape(prefix) + r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight$", k)})
    mem_key = prefix + "memory_encoder.out_proj.weight"
    return Sam2Spec(
        image_size=1024,
        hiera_embed_dim=embed,
        hiera_num_heads=2,
        hiera_stages=stages,
        hiera_global_att_blocks=global_blocks,
        hiera_window_spec=[window0, 4, 16, 8][: len(stages)],
        hiera_window_pos_embed_bkg=bkg,
        hiera_q_pool=min(3, len(stages) - 1),
        hidden_dim=hidden,
        decoder_mlp_dim=shape("sam_mask_decoder.transformer.layers.0.mlp.layers.0.weight")[0],
        decoder_num_heads=8,
        decoder_depth=n_dec,
        iou_head_hidden_dim=shape("sam_mask_decoder.iou_prediction_head.layers.0.weight")[0],
        mask_input_channels=shape("sam_prompt_encoder.mask_downscaling.3.weight")[0],
        mem_dim=shapes[mem_key][0] if mem_key in shapes else 64,
    )


def official_config(folder: Path, shapes: dict[str, tuple[int, ...]],
                    sam2_override: dict[str, Any] | None = None) -> TerraScopeConfig:
    raw = json.loads((folder / "config.json").read_text())
    vc, lc = raw.get("vision_config") or {}, raw.get("llm_config") or {}
    if lc.get("architectures", ["Qwen2ForCausalLM"])[0] != "Qwen2ForCausalLM":
        raise CheckpointError(f"{folder}: LLM {lc.get('architectures')} is not supported (only Qwen2)")
    image_size = raw.get("force_image_size") or vc.get("image_size", 448)
    vision = VisionSpec(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"],
        num_attention_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"],
        image_size=image_size, patch_size=vc.get("patch_size", 14), layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        qkv_bias=vc.get("qkv_bias", True), qk_normalization=vc.get("qk_normalization", False),
        norm_type=vc.get("norm_type", "layer_norm"), hidden_act=vc.get("hidden_act", "gelu"),
    )
    rope = lc.get("rope_theta") or (lc.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
    llm = LLMSpec(
        vocab_size=lc["vocab_size"], hidden_size=lc["hidden_size"], num_hidden_layers=lc["num_hidden_layers"],
        num_attention_heads=lc["num_attention_heads"],
        num_key_value_heads=lc.get("num_key_value_heads", lc["num_attention_heads"]),
        intermediate_size=lc["intermediate_size"], rms_norm_eps=lc.get("rms_norm_eps", 1e-6), rope_theta=rope,
        max_position_embeddings=lc.get("max_position_embeddings", 32768),
        tie_word_embeddings="language_model.lm_head.weight" not in shapes, hidden_act=lc.get("hidden_act", "silu"),
    )
    sam2 = infer_sam2_spec(shapes)
    if sam2_override:
        sam2 = Sam2Spec(**{**sam2.__dict__, **sam2_override})
    cfg = TerraScopeConfig(
        vision=vision, llm=llm, sam2=sam2, name=folder.name,
        downsample_ratio=raw.get("downsample_ratio", 0.5), ps_version=raw.get("ps_version", "v2"),
        select_layer=raw.get("select_layer", -1), min_dynamic_patch=raw.get("min_dynamic_patch", 1),
        max_dynamic_patch=raw.get("max_dynamic_patch", 12), use_thumbnail=raw.get("use_thumbnail", True),
        template=raw.get("template", "qwen_chat").replace("-", "_"), compat="official", max_tokens_per_seg=8,
        suppress_no_object=False, format="sa2va-official",
    )
    cfg.validate()
    return cfg


def detect_format(folder: Path) -> str:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    raw = json.loads(cfg_path.read_text())
    if raw.get("format") == NATIVE_FORMAT:
        return NATIVE_FORMAT
    if OFFICIAL_ARCH in (raw.get("architectures") or []) or raw.get("model_type") == "sa2va_chat":
        return "sa2va-official"
    raise CheckpointError(f"{folder}: config.json is neither a TerraScope native config nor a Sa2VA release")


# ---- building and streaming ----------------------------------------------------------------------------------
@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_empty(config: TerraScopeConfig, dtype: torch.dtype) -> TerraScopeModel:
    """Build the module tree on the meta device (no storage) in ``dtype``."""
    with torch.device("meta"), _default_dtype(dtype):
        model = TerraScopeModel(config)
    return model.eval()


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise CheckpointError(f"tensor {name} has no place in the model")


def _finish(model: TerraScopeModel, device: torch.device) -> TerraScopeModel:
    """Rebuild non-persistent buffers (rotary inv_freq) on the device and check nothing is left on meta."""
    lm = model.language_model.model
    rotary_cls = type(lm.rotary_emb)
    with torch.device(device):  # the constructor's signature differs across transformers 5.x releases
        lm.rotary_emb = rotary_cls(lm.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"checkpoint is missing {len(left)} tensors, e.g. {left[:5]}")
    model.requires_grad_(False)  # inference by default; training code turns on what it trains
    return model.eval()


def _target(tensor: torch.Tensor, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(like.shape):
        raise CheckpointError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs model {tuple(like.shape)}")
    dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype).contiguous()


def load_official(folder: Path, device: torch.device, dtype: torch.dtype,
                  sam2_override: dict[str, Any] | None = None) -> tuple[TerraScopeModel, dict[str, Any]]:
    shapes = tensor_shapes(folder)
    config = official_config(folder, shapes, sam2_override)
    model = build_empty(config, dtype)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    point_rows: dict[int, torch.Tensor] = {}
    skipped: list[str] = []
    for name, load, shape in iter_tensors(folder):
        mapped = map_official_name(name, shape)
        if not mapped:
            skipped.append(name)
            continue
        raw = load()
        for k, (ours, transform) in enumerate(mapped):
            tensor = transform(raw)
            if k and len(mapped) > 1 and tensor.data_ptr() == raw.data_ptr():
                tensor = tensor.clone()  # one checkpoint tensor, two model tensors: no shared storage
            if "#row" in ours:
                point_rows[int(ours.split("#row")[1])] = tensor
                continue
            if ours not in targets:
                raise CheckpointError(f"{name} maps to {ours}, which the model does not have")
            _assign(model, ours, _target(tensor, targets[ours], device))
        del raw
    if point_rows:
        key = "grounding_encoder.prompt_encoder.point_embed.weight"
        stacked = torch.cat([point_rows[i] for i in sorted(point_rows)], dim=0)
        _assign(model, key, _target(stacked, targets[key], device))
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    info = {"format": "sa2va-official", "skipped": skipped,
            "skipped_reason": "SAM-2 video memory modules: unused when every frame has a language prompt"}
    return _finish(model, device), info


def load_native(folder: Path, device: torch.device, dtype: torch.dtype) -> tuple[TerraScopeModel, dict[str, Any]]:
    raw = json.loads((folder / "config.json").read_text())
    config = TerraScopeConfig.from_dict(raw)
    model = build_empty(config, dtype)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    seen = set()
    for name, load, _ in iter_tensors(folder):
        if name not in targets:
            raise CheckpointError(f"{folder}: unexpected tensor {name}")
        _assign(model, name, _target(load(), targets[name], device))
        seen.add(name)
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return _finish(model, device), {"format": NATIVE_FORMAT, "skipped": []}


def load_model(folder: str | Path, device: torch.device, dtype: torch.dtype,
               sam2_override: dict[str, Any] | None = None) -> tuple[TerraScopeModel, dict[str, Any]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    fmt = detect_format(folder)
    if fmt == NATIVE_FORMAT:
        return load_native(folder, device, dtype)
    return load_official(folder, device, dtype, sam2_override)


def save_native(model: TerraScopeModel, folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write our native folder: config.json (with the explicit sam2 block), model.safetensors, tokenizer."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TerraScopeConfig.from_dict(model.config.to_dict())
    cfg.format = NATIVE_FORMAT
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if cfg.llm.tie_word_embeddings and name == "language_model.lm_head.weight":
            continue
        cpu = tensor.detach().to("cpu").contiguous()
        if cpu.data_ptr() in seen:
            cpu = cpu.clone()  # safetensors refuses shared storage
        seen.add(cpu.data_ptr())
        state[name] = cpu
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save(folder / "config.json")
    if tokenizer_dir is not None:
        for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "merges.txt"):
            src = Path(tokenizer_dir) / fname
            if src.is_file() and src.resolve() != (folder / fname).resolve():
                shutil.copyfile(src, folder / fname)
    return folder


# ---- random weights ------------------------------------------------------------------------------------------
@torch.no_grad()
def random_model(config: TerraScopeConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> TerraScopeModel:
    """A model with random weights built directly on ``device`` in ``dtype`` (no float32 staging copy)."""
    device = torch.device(device)
    model = build_empty(config, dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, (nn.LayerNorm,)) or "norm" in type(module).__name__.lower():
                param.fill_(1.0 if pname == "weight" else 0.0)
            elif pname.startswith("lambda_"):
                param.fill_(0.1)
            elif pname == "bias":
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for bname, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and "positional_embedding" in bname:
                buf.normal_(0.0, 1.0, generator=gen)
    if config.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return _finish(model, device)
