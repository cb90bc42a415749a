"""Training configuration (JSON): one file describes the model, the data and every stage.

The same schema drives the embedded mini (trained from scratch, everything trainable) and the 8B
fine-tune (official checkpoint, mask decoder + projector trained, LLM through LoRA, vision frozen):
what is frozen is data, not code, so a research user changes the recipe without touching Python.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from model.training.augment import Sam2Augment

#: Parameter groups a stage may train. Names map onto model submodules in ``training.params``.
GROUPS = ("vision", "projector", "llm", "llm_embed", "sam2_image_encoder", "sam2_prompt_encoder",
          "sam2_mask_decoder", "seg_projector")
RECORD_KINDS = ("res", "l1", "l2", "cap")
#: Pseudo-kind of ``kind_weights``: the numeric multiple-choice records that option redraw applies to.
OPTIONS_BUCKET = "options"


class ConfigError(ValueError):
    """A training config is invalid; the message names the field."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])


@dataclass
class StageConfig:
    """One training stage (stage 1 = RES pretraining, stage 2 = Terra-CoT SFT)."""

    name: str
    kinds: list[str]  # record kinds sampled in this stage
    train: list[str]  # parameter groups trained fully
    lr: float = 1e-4
    lr_overrides: dict[str, float] = field(default_factory=dict)  # group -> lr
    batch_size: int = 8  # per process
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float | None = None  # alternative to max_steps (fraction of the stage's records)
    time_fraction: float | None = None  # share of --time-budget-s given to this stage
    warmup_steps: int = 0
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1  # cosine decay floor
    kind_weights: dict[str, float] = field(default_factory=dict)  # sampling weight per kind
    lora: LoraConfig | None = None  # LLM through LoRA (peft) when set
    seg_loss_weight: float = 0.5  # lambda of Eq. 6
    ground_prob: float = 1.0  # probability that a [SEG] gets its measurement span in the input
    ground_jitter: float = 0.0  # relative noise on the span's numbers (teaches nearest-option choice)
    option_redraw: float = 0.0  # chance a numeric multiple-choice record gets fresh options (training/options.py)
    redraw_jitter: float = 0.0  # relative noise on a redrawn record's span; its letter follows the span
    redraw_marks: bool = False  # the redrawn trace tags each listed option above/below the value
    max_grad_norm: float = 1.0
    cache_frozen: bool = True  # run a frozen ViT / SAM-2 image encoder once per image, not every step
    sam2_dihedral: bool = False  # random flip/rot90 of each SAM-2 input and its mask targets (trained encoder)
    sam2_photometric: float = 0.0  # max relative jitter of brightness, contrast, saturation of SAM-2 inputs
    sam2_crop_min_side: float = 1.0  # random square crops of SAM-2 inputs and masks, side >= this share

    @property
    def sam2_augment(self) -> Sam2Augment:
        return Sam2Augment(self.sam2_dihedral, self.sam2_photometric, self.sam2_crop_min_side)


@dataclass
class TrainConfig:
    name: str
    model: dict[str, Any]  # {"preset": ..., "overrides": {...}} or {"checkpoint": DIR}
    data: str  # dataset folder built by ``python -m model.data.build`` (relative to the config's cwd)
    stages: list[StageConfig]
    out: str = "out/train"
    save_dir: str | None = None  # where the final native model goes (bf16 safetensors)
    seed: int = 0
    dtype: str = "bf16"  # autocast dtype on CUDA ("bf16" | "fp32"); CPU always runs fp32
    save_dtype: str = "bf16"
    gradient_checkpointing: bool = False
    tokenizer: dict[str, Any] | None = None  # {"vocab_size": 4096} = train ours; None = keep the model's
    max_seq_len: int = 1024
    log_every: int = 10
    ckpt_every_s: float = 120.0  # checkpoint at least this often (wall clock)
    num_workers: int = 2
    val_limit: int = 64  # held-back records scored (teacher-forced loss, GT-prompt IoU) after each stage
    splits: list[str] = field(default_factory=lambda: ["train"])

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_keys(d: dict, cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def _stage(d: Any, i: int) -> StageConfig:
    where = f"stages[{i}]"
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object")
    _check_keys(d, StageConfig, where)
    for req in ("name", "kinds", "train"):
        if req not in d:
            raise ConfigError(f"{where}: missing '{req}'")
    d = dict(d)
    if d.get("lora") is not None:
        if not isinstance(d["lora"], dict):
            raise ConfigError(f"{where}.lora must be an object or null")
        _check_keys(d["lora"], LoraConfig, f"{where}.lora")
        d["lora"] = LoraConfig(**d["lora"])
    st = StageConfig(**d)
    bad = [k for k in st.kinds if k not in RECORD_KINDS]
    if bad or not st.kinds:
        raise ConfigError(f"{where}.kinds: {bad or 'empty'} not in {RECORD_KINDS}")
    bad = [g for g in [*st.train, *st.lr_overrides] if g not in GROUPS]
    if bad:
        raise ConfigError(f"{where}.train: unknown group(s) {bad}; known: {GROUPS}")
    if st.lora is not None and "llm" in st.train:
        raise ConfigError(f"{where}: 'llm' is trained fully and through LoRA at once; pick one")
    if not st.train and st.lora is None:
        raise ConfigError(f"{where}: nothing to train")
    if st.batch_size < 1 or st.grad_accum < 1:
        raise ConfigError(f"{where}: batch_size and grad_accum must be >= 1")
    if st.lr <= 0:
        raise ConfigError(f"{where}.lr must be > 0")
    if st.max_steps is None and st.epochs is None and st.time_fraction is None:
        raise ConfigError(f"{where}: give max_steps, epochs or time_fraction")
    if not 0.0 <= st.ground_prob <= 1.0 or not 0.0 <= st.ground_jitter < 0.5:
        raise ConfigError(f"{where}: ground_prob must be in [0,1] and ground_jitter in [0,0.5)")
    if not 0.0 <= st.option_redraw <= 1.0 or not 0.0 <= st.redraw_jitter < 1.0:
        raise ConfigError(f"{where}: option_redraw must be in [0,1] and redraw_jitter in [0,1)")
    odd = [k for k in st.kind_weights if k not in (*RECORD_KINDS, OPTIONS_BUCKET)]
    if odd:
        raise ConfigError(f"{where}.kind_weights: unknown kind(s) {odd}; known: {(*RECORD_KINDS, OPTIONS_BUCKET)}")
    if st.kind_weights.get(OPTIONS_BUCKET, 0.0) > 0 and st.option_redraw <= 0:
        raise ConfigError(f"{where}.kind_weights: '{OPTIONS_BUCKET}' needs option_redraw > 0")
    if not 0.0 <= st.sam2_photometric < 1.0 or not 0.1 <= st.sam2_crop_min_side <= 1.0:
        raise ConfigError(f"{where}: sam2_photometric must be in [0,1) and sam2_crop_min_side in [0.1,1]")
    if st.sam2_augment.active and "sam2_image_encoder" not in st.train:
        raise ConfigError(f"{where}: SAM-2 input augmentation needs 'sam2_image_encoder' in train (a frozen "
                          "encoder is cached once per image)")
    return st


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a training config; every error names the offending field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    return config_from_dict(raw, str(path))


def config_from_dict(raw: Any, where: str = "config") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be an object")
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}  # "_comment" keys are documentation
    _check_keys(raw, TrainConfig, where)
    for req in ("name", "model", "data", "stages"):
        if req not in raw:
            raise ConfigError(f"{where}: missing '{req}'")
    if not isinstance(raw["stages"], list) or not raw["stages"]:
        raise ConfigError(f"{where}.stages must be a non-empty list")
    model = raw["model"]
    if not isinstance(model, dict) or ("preset" in model) == ("checkpoint" in model):
        raise ConfigError(f"{where}.model needs exactly one of 'preset' or 'checkpoint'")
    cfg = TrainConfig(**{**raw, "stages": [_stage(s, i) for i, s in enumerate(raw["stages"])]})
    if cfg.dtype not in ("bf16", "fp32") or cfg.save_dtype not in ("bf16", "fp32"):
        raise ConfigError(f"{where}: dtype/save_dtype must be 'bf16' or 'fp32'")
    names = cfg.stage_names
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: stage names must be unique, got {names}")
    return cfg
