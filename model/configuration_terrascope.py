"""TerraScope configuration: one explicit config for InternViT + Qwen2 + SAM-2, plus presets.

The official release config (``Sa2VAChatConfig``) carries no SAM-2 sizes (the research code hard-codes
Hiera-L), so our config always holds an explicit ``sam2`` block. For official checkpoints that block is
inferred from tensor shapes by ``model.loading``; for our own checkpoints it is written to ``config.json``.
Presets are plain data (``PRESETS``) so the training engineer can tune ``terrascope-mini`` without code.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

#: Tokens every TerraScope tokenizer must have (names; ids are resolved from the tokenizer).
SPECIAL_TOKENS = {
    "img_start": "<img>",
    "img_end": "</img>",
    "img_context": "<IMG_CONTEXT>",
    "seg": "[SEG]",
    "region": "<REGION>",
    "think_start": "<think>",
    "think_end": "</think>",
    "answer_start": "<answer>",
    "answer_end": "</answer>",
    "eos": "<|im_end|>",
}

#: ``compat`` modes: "official" reproduces the released inference code bit for bit (PIL-NEAREST token
#: grid, λ=8, [SEG] k routed to image k % n); "native" is the paper's rule (>50% cell coverage,
#: ⌈√λ⌉ grid sampling, ``Image: t_i`` routing).
COMPAT_MODES = ("official", "native")


@dataclass
class VisionSpec:
    """InternViT (maps onto ``transformers.InternVLVisionConfig``)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    norm_type: str = "layer_norm"
    hidden_act: str = "gelu"


@dataclass
class LLMSpec:
    """Qwen2 decoder (maps onto ``transformers.Qwen2Config``)."""

    vocab_size: int = 151674
    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    intermediate_size: int = 18944
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"


@dataclass
class Sam2Spec:
    """SAM-2 image path: Hiera trunk + FPN neck + prompt encoder + mask decoder.

    Memory attention / memory encoder sizes are recorded for completeness only: with a language prompt on
    every frame each frame is an initial conditioning frame, so they never influence a mask (see loading).
    """

    image_size: int = 1024
    hiera_embed_dim: int = 144
    hiera_num_heads: int = 2
    hiera_stages: list[int] = field(default_factory=lambda: [2, 6, 36, 4])
    hiera_global_att_blocks: list[int] = field(default_factory=lambda: [23, 33, 43])
    hiera_window_spec: list[int] = field(default_factory=lambda: [8, 4, 16, 8])
    hiera_window_pos_embed_bkg: list[int] = field(default_factory=lambda: [7, 7])
    hiera_q_pool: int = 3
    hiera_mlp_ratio: float = 4.0
    hidden_dim: int = 256  # FPN d_model = prompt dim = mask decoder dim = text_hidden_fcs output
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_depth: int = 2
    iou_head_hidden_dim: int = 256
    mask_input_channels: int = 16
    mem_dim: int = 64

    @property
    def stage_dims(self) -> list[int]:
        return [self.hiera_embed_dim * 2**i for i in range(len(self.hiera_stages))]

    @property
    def stage_heads(self) -> list[int]:
        return [self.hiera_num_heads * 2**i for i in range(len(self.hiera_stages))]


@dataclass
class TerraScopeConfig:
    """Everything needed to build the model and run it the way its checkpoint expects."""

    vision: VisionSpec = field(default_factory=VisionSpec)
    llm: LLMSpec = field(default_factory=LLMSpec)
    sam2: Sam2Spec = field(default_factory=Sam2Spec)
    name: str = "terrascope"
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    template: str = "terrascope"  # "qwen_chat" (official) or "terrascope" (ours, see prompting.py)
    compat: str = "native"  # see COMPAT_MODES
    max_tokens_per_seg: int = 128  # λ
    suppress_no_object: bool = True  # object score <= 0 -> empty mask (official code does not do it)
    extra_stop_tokens: list[str] = field(default_factory=list)
    format: str = "terrascope-native"
    # SAM-2 test-time augmentation: masks averaged over this many dihedral views of the image (1 = off, as
    # the official code; 4 = identity, hflip, vflip, rot180; 8 adds the transposed four). model/sam2_tta.py
    sam2_tta: int = 1

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def tokens_per_tile(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        return int(side * side * self.downsample_ratio**2)

    @property
    def tokens_per_side(self) -> int:
        return round(self.tokens_per_tile**0.5)

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TerraScopeConfig:
        data = copy.deepcopy(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TerraScopeConfig fields: {unknown}")
        sub = {"vision": VisionSpec, "llm": LLMSpec, "sam2": Sam2Spec}
        for key, spec in sub.items():
            if key in data and isinstance(data[key], dict):
                spec_known = {f.name for f in fields(spec)}
                bad = sorted(set(data[key]) - spec_known)
                if bad:
                    raise ValueError(f"unknown {key} fields in TerraScopeConfig: {bad}")
                data[key] = spec(**data[key])
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        if self.template not in ("qwen_chat", "terrascope"):
            raise ValueError(f"template must be 'qwen_chat' or 'terrascope', got {self.template!r}")
        if self.ps_version != "v2":
            raise ValueError("only pixel-shuffle v2 is supported (v1 transposes the token grid)")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision image_size must be a multiple of patch_size")
        if self.max_tokens_per_seg < 1:
            raise ValueError("max_tokens_per_seg (λ) must be >= 1")
        if self.vision.hidden_size % self.vision.num_attention_heads:
            raise ValueError("vision hidden_size must be divisible by num_attention_heads")
        if self.llm.hidden_size % self.llm.num_attention_heads:
            raise ValueError("llm hidden_size must be divisible by num_attention_heads")
        if isinstance(self.sam2_tta, bool) or not isinstance(self.sam2_tta, int) or not 1 <= self.sam2_tta <= 8:
            raise ValueError(f"sam2_tta (SAM-2 dihedral TTA views) must be an int in 1..8, got {self.sam2_tta!r}")
        if len(self.sam2.hiera_stages) != len(self.sam2.hiera_window_spec):
            raise ValueError("sam2 hiera_stages and hiera_window_spec must have the same length")

    # ---- transformers sub-configs ----------------------------------------------------------------------
    def vision_hf(self) -> Any:
        from transformers import InternVLVisionConfig

        v = self.vision
        cfg = InternVLVisionConfig(
            hidden_size=v.hidden_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            intermediate_size=v.intermediate_size,
            attention_bias=v.qkv_bias,
            use_qk_norm=v.qk_normalization,
            norm_type=v.norm_type,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act=v.hidden_act,
            image_size=[v.image_size, v.image_size],
            patch_size=[v.patch_size, v.patch_size],
            use_mean_pooling=True,  # InternViT has no post-norm; mean pooling => Identity layernorm
        )
        cfg._attn_implementation = "sdpa"
        return cfg

    def llm_hf(self) -> Any:
        from transformers import Qwen2Config

        m = self.llm
        cfg = Qwen2Config(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads,
            hidden_act=m.hidden_act,
            max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.rms_norm_eps,
            tie_word_embeddings=m.tie_word_embeddings,
            # The release says rope "dynamic" x2: NTK scaling only kicks in beyond max_position_embeddings,
            # which TerraScope prompts never reach, so the default rope is identical here.
            rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
            use_sliding_window=False,
            use_cache=True,
        )
        cfg._attn_implementation = "sdpa"
        return cfg

    def sam2_hf(self) -> Any:
        from transformers import (
            Sam2Config,
            Sam2HieraDetConfig,
            Sam2MaskDecoderConfig,
            Sam2PromptEncoderConfig,
            Sam2VisionConfig,
        )

        s = self.sam2
        n_stages = len(s.hiera_stages)
        backbone = Sam2HieraDetConfig(
            hidden_size=s.hiera_embed_dim,
            num_attention_heads=s.hiera_num_heads,
            image_size=[s.image_size, s.image_size],
            window_positional_embedding_background_size=list(s.hiera_window_pos_embed_bkg),
            num_query_pool_stages=s.hiera_q_pool,
            blocks_per_stage=list(s.hiera_stages),
            embed_dim_per_stage=s.stage_dims,
            num_attention_heads_per_stage=s.stage_heads,
            window_size_per_stage=list(s.hiera_window_spec),
            global_attention_blocks=list(s.hiera_global_att_blocks),
            mlp_ratio=s.hiera_mlp_ratio,
        )
        stride = 4  # Hiera patch embed stride
        sizes = [[s.image_size // (stride * 2**i)] * 2 for i in range(n_stages - 1)]
        vision = Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=list(reversed(s.stage_dims)),
            backbone_feature_sizes=sizes,
            fpn_hidden_size=s.hidden_dim,
            fpn_top_down_levels=[2, 3],
            num_feature_levels=n_stages - 1,  # scalp=1: the coarsest level is dropped
        )
        prompt = Sam2PromptEncoderConfig(
            hidden_size=s.hidden_dim,
            image_size=s.image_size,
            patch_size=16,
            mask_input_channels=s.mask_input_channels,
        )
        decoder = Sam2MaskDecoderConfig(
            hidden_size=s.hidden_dim,
            mlp_dim=s.decoder_mlp_dim,
            num_hidden_layers=s.decoder_depth,
            num_attention_heads=s.decoder_num_heads,
            iou_head_hidden_dim=s.iou_head_hidden_dim,
        )
        cfg = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
        cfg._attn_implementation = "sdpa"
        return cfg


# ---- presets (data) ----------------------------------------------------------------------------------
#: Official TerraScope-8B shapes (InternVL3-8B: InternViT-300M + Qwen2.5-7B-like LLM; SAM-2 Hiera-L).
#: Runs in "official" compat: the released inference code's template, λ=8 and selection rules.
PRESET_8B: dict[str, Any] = {
    "name": "terrascope-8b",
    "vision": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
               "intermediate_size": 4096},
    "llm": {"vocab_size": 151685, "hidden_size": 3584, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944},
    "sam2": {},  # Hiera-L defaults
    "template": "qwen_chat",
    "compat": "official",
    "max_tokens_per_seg": 8,
    "suppress_no_object": False,
    "format": "sa2va-official",
}

#: Our small model (~12M parameters). The training engineer owns these numbers; only keep them
#: consistent with the tokenizer trained for it (vocab_size) and the 448/14 tiling (256 tokens per tile).
PRESET_MINI: dict[str, Any] = {
    "name": "terrascope-mini",
    "vision": {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3,
               "intermediate_size": 768},
    "llm": {"vocab_size": 4096, "hidden_size": 320, "num_hidden_layers": 5, "num_attention_heads": 5,
            "num_key_value_heads": 1, "intermediate_size": 864, "tie_word_embeddings": True,
            "max_position_embeddings": 8192},
    # SAM-2 at 512 px (not 1024): 4x fewer encoder tokens on a laptop CPU, and the embedded model's
    # tiles are 256-512 px anyway; the budget saved goes into a wider Hiera for building outlines.
    "sam2": {"image_size": 512, "hiera_embed_dim": 32, "hiera_num_heads": 1, "hiera_stages": [1, 2, 4, 1],
             "hiera_global_att_blocks": [6], "hiera_window_spec": [8, 4, 8, 8],
             "hiera_window_pos_embed_bkg": [7, 7], "hidden_dim": 96, "decoder_mlp_dim": 384,
             "decoder_num_heads": 4, "iou_head_hidden_dim": 96, "mem_dim": 16},
    "template": "terrascope",
    "compat": "native",
    "max_tokens_per_seg": 64,
    "suppress_no_object": True,
    "format": "terrascope-native",
}

PRESETS: dict[str, dict[str, Any]] = {"terrascope-8b": PRESET_8B, "terrascope-mini": PRESET_MINI}

#: Where a preset's weights live when they exist (relative to the repository root).
PRESET_WEIGHTS: dict[str, str] = {"terrascope-mini": "resources/models/terrascope-mini"}


def preset_config(name: str, **overrides: Any) -> TerraScopeConfig:
    """Build a config from a preset name; ``overrides`` replace top-level fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    data = copy.deepcopy(PRESETS[name])
    data.update(overrides)
    return TerraScopeConfig.from_dict(data)


def preset_weights_dir(name: str) -> Path | None:
    """The folder holding a preset's weights, if it exists in this checkout."""
    rel = PRESET_WEIGHTS.get(name)
    if rel is None:
        return None
    path = Path(__file__).resolve().parent.parent / rel
    return path if (path / "config.json").is_file() else None
