"""The training loop: stages, optimiser, bf16 autocast, DDP, time budget, checkpoint/resume, log."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.configuration_terrascope import PRESETS, TerraScopeConfig
from model.loading import load_model
from model.modeling_terrascope import TerraScopeModel
from model.prompting import TokenizerWrapper

from .config import OPTIONS_BUCKET, StageConfig, TrainConfig
from .data import Example, ExampleBuilder, load_records
from .export import export
from .params import add_lora, group_of, merge_lora, set_trainable, trainable_summary
from .step import Banks, TrainingForward, collate
from .trainlog import LossLog, plot_log


# ---- process / device ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_dist(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process a GPU (NCCL), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but CUDA is not available")
        dev = torch.device("cuda", local if world > 1 else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master weights outside autocast regions
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- model + tokenizer -------------------------------------------------------------------------------------------
def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_config(cfg: TrainConfig, vocab_size: int | None) -> TerraScopeConfig:
    """The preset with the config's overrides; vocab_size follows the trained tokenizer (rounded to 64)."""
    preset = cfg.model["preset"]
    if preset not in PRESETS:
        raise ValueError(f"model.preset {preset!r} unknown; known: {sorted(PRESETS)}")
    data = _deep_merge(PRESETS[preset], cfg.model.get("overrides") or {})
    if vocab_size is not None:
        data.setdefault("llm", {})["vocab_size"] = int(math.ceil(vocab_size / 64) * 64)
    return TerraScopeConfig.from_dict(data)


def prepare_tokenizer(cfg: TrainConfig, out: Path, d: Dist) -> Path:
    """Train our BPE on the training records (rank 0), or use the checkpoint's tokenizer."""
    if cfg.tokenizer is None:
        if "checkpoint" not in cfg.model:
            raise ValueError("a preset model needs a tokenizer: set \"tokenizer\": {\"vocab_size\": N}")
        return Path(cfg.model["checkpoint"])
    tok_dir = out / "tokenizer"
    if d.main and not (tok_dir / "tokenizer.json").is_file():
        from model.tokenizer_train import corpus_texts, save_tokenizer, train_tokenizer

        files = sorted([*Path(cfg.data).glob("*.jsonl"), *Path(cfg.data).glob("*.jsonl.gz")])
        tok = train_tokenizer(corpus_texts(files), int(cfg.tokenizer.get("vocab_size", 4096)),
                              int(cfg.tokenizer.get("min_frequency", 2)))
        save_tokenizer(tok, tok_dir)
    if d.enabled:
        dist.barrier()
    return tok_dir


def build_model(cfg: TrainConfig, tok: TokenizerWrapper, d: Dist) -> TerraScopeModel:
    if "checkpoint" in cfg.model:
        dtype = torch.bfloat16 if cfg.model.get("load_dtype", "bf16") == "bf16" else torch.float32
        model, _ = load_model(cfg.model["checkpoint"], d.device, dtype)
        return model
    mcfg = model_config(cfg, len(tok))
    seed_all(cfg.seed)
    with torch.device(d.device):
        model = TerraScopeModel(mcfg)  # transformers' own initialisation (from scratch)
    fan_in_init(model.grounding_encoder)
    return model


def fan_in_init(module: nn.Module) -> None:
    """PyTorch's default fan-in init for SAM-2's convolutions and linear layers (as the SAM-2 code has).

    transformers initialises every layer with N(0, 0.02); through the norm-free FPN neck and the mask
    decoder's upscaling that leaves mask logits near 1e-6 at the start, and their gradients vanish.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            m.reset_parameters()


# ---- sampling ------------------------------------------------------------------------------------------------------
class StageSampler:
    """Draws examples for a stage: a kind by ``kind_weights`` (else proportional), then uniformly.

    The weight ``"options"`` makes the records that option redraw applies to a bucket of their own.

    Batches are grouped by length: ``group`` batches are drawn at once, sorted by sequence length and
    served in random order, so a batch rarely pads a 300-token question to a 1500-token series.
    """

    def __init__(self, examples: list[Example], stage: StageConfig, seed: int, length=None, group: int = 8):
        self.by_kind: dict[str, list[Example]] = {}
        options_bucket = stage.kind_weights.get(OPTIONS_BUCKET, 0.0) > 0
        for ex in examples:
            if ex.kind in stage.kinds:
                key = OPTIONS_BUCKET if options_bucket and ex.options is not None else ex.kind
                self.by_kind.setdefault(key, []).append(ex)
        if not self.by_kind:
            raise ValueError(f"stage {stage.name}: no training examples of kinds {stage.kinds}")
        kinds = sorted(self.by_kind)
        if stage.kind_weights:
            w = np.array([float(stage.kind_weights.get(k, 0.0)) for k in kinds])
        else:
            w = np.array([float(len(self.by_kind[k])) for k in kinds])
        if w.sum() <= 0:
            raise ValueError(f"stage {stage.name}: kind_weights give no weight to {kinds}")
        self.kinds, self.p = kinds, w / w.sum()
        self.rng = np.random.default_rng(seed)
        self.length = length
        self.group = max(1, group)
        self.by_id = {ex.id: ex for exs in self.by_kind.values() for ex in exs}
        self.queue: list[list[str]] = []

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_kind.values())

    def _draw(self, n: int) -> list[Example]:
        ks = self.rng.choice(len(self.kinds), size=n, p=self.p)
        return [self.by_kind[self.kinds[k]][int(self.rng.integers(len(self.by_kind[self.kinds[k]])))] for k in ks]

    def draw(self, n: int) -> list[Example]:
        if self.length is None or self.group == 1:
            return self._draw(n)
        if not self.queue:
            pool = sorted(self._draw(n * self.group), key=self.length)
            batches = [[ex.id for ex in pool[i:i + n]] for i in range(0, len(pool), n)]
            order = self.rng.permutation(len(batches))
            self.queue = [batches[i] for i in order]
        return [self.by_id[i] for i in self.queue.pop(0)]

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "queue": self.queue}

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.queue = [list(b) for b in state["queue"]]


def lr_factor(stage: StageConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over the stage's progress (steps or time)."""
    if stage.warmup_steps and step < stage.warmup_steps:
        return (step + 1) / stage.warmup_steps
    p = min(1.0, max(0.0, progress))
    return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def make_optimizer(model: TerraScopeModel, stage: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    gid = group_of(model)
    buckets: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = stage.lr if "lora_" in name else stage.lr_overrides.get(gid.get(id(p), ""), stage.lr)
        buckets.setdefault(lr, []).append(p)
    groups = [{"params": ps, "lr": lr, "base_lr": lr} for lr, ps in buckets.items()]
    kw: dict[str, Any] = {"betas": (0.9, 0.95), "weight_decay": stage.weight_decay}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw)


# ---- checkpoints ------------------------------------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: TerraScopeModel, trained: set[str], opt: torch.optim.Optimizer,
                    stage_idx: int, step: int, global_step: int, stage_elapsed: float, sampler: StageSampler,
                    rng: np.random.Generator) -> None:
    """Weights of every parameter trained so far (LoRA included), optimiser, counters and RNG states."""
    # while LoRA is applied, a trained base weight is named "...q_proj.base_layer.weight"
    state = {n: t.detach().cpu() for n, t in model.state_dict().items()
             if n.replace(".base_layer.", ".") in trained or "lora_" in n}
    _atomic_save({"model": state, "optim": opt.state_dict(), "stage": stage_idx, "step": step,
                  "global_step": global_step, "stage_elapsed": stage_elapsed,
                  "sampler": json.dumps(sampler.state()), "rng": json.dumps(rng.bit_generator.state),
                  "torch_rng": torch.get_rng_state()}, path)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- the run ------------------------------------------------------------------------------------------------------------
@dataclass
class RunOptions:
    out: Path
    device: str = "auto"
    time_budget_s: float | None = None
    max_steps: int | None = None  # cap per stage (smoke tests)
    resume: bool = False
    save_dir: Path | None = None
    progress: bool = True
    limit_records: int | None = None
    stop_after_steps: int | None = None  # checkpoint and stop after this many global steps (resume later)


@dataclass
class RunResult:
    global_step: int
    samples: int
    seconds: float
    last: dict[str, float]
    save_dir: Path | None
    stage_summaries: list[dict[str, Any]]


def _param_names_in(model: TerraScopeModel, pred) -> set[str]:
    return {n for n, p in model.named_parameters() if pred(p)}


def run(cfg: TrainConfig, opts: RunOptions) -> RunResult:
    d = init_dist(opts.device)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"
    t_run = time.time()

    tok_dir = prepare_tokenizer(cfg, out, d)
    tok = TokenizerWrapper(tok_dir)
    model = build_model(cfg, tok, d)
    if cfg.gradient_checkpointing:
        for sub in (model.vision_model, model.language_model):
            # transformers >= 5.2x renamed it; 5.17 (the GPU box) only has the old name
            kwargs = {"use_reentrant": False}
            if hasattr(sub, "activation_checkpointing_enable"):
                sub.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                sub.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    mcfg = model.config
    builder = ExampleBuilder(mcfg, tok, cfg.max_seq_len)
    kinds = sorted({k for s in cfg.stages for k in s.kinds})
    records = load_records(cfg.data, cfg.splits, kinds)
    if opts.limit_records:
        records = records[: opts.limit_records]
    t0 = time.time()
    examples, errors = builder.build_all(records, workers=min(16, os.cpu_count() or 1))
    if d.main:
        print(f"[train] {len(examples)} examples from {len(records)} records in {time.time() - t0:.1f}s "
              f"({len(errors)} skipped)", flush=True)
        for e in errors[:5]:
            print(f"[train]   skipped {e}", flush=True)
    if not examples:
        raise ValueError(f"{cfg.data}: no usable training records ({len(errors)} errors, first: "
                         f"{errors[0] if errors else 'none'})")
    val_records = load_records(cfg.data, ("val",), kinds)[: cfg.val_limit] if cfg.val_limit else []
    val_examples, _ = builder.build_all(val_records, workers=min(16, os.cpu_count() or 1))
    banks = Banks(examples + val_examples, d.device)
    lengths = {ex.id: builder.max_len(ex) for ex in examples}
    if d.main:
        print(f"[train] image banks on {d.device}: {banks.nbytes() / 2**20:.0f} MiB; model "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params", flush=True)
    fwd = TrainingForward(model, banks)
    log = LossLog(out, enabled=d.main)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" and cfg.dtype == "bf16"
                else contextlib.nullcontext())

    resume = load_checkpoint(ckpt_path) if opts.resume and ckpt_path.is_file() else None
    start_stage = resume["stage"] if resume else 0
    global_step = resume["global_step"] if resume else 0
    if resume:
        log.truncate_after(global_step)
    trained: set[str] = set()
    samples_total = 0
    last: dict[str, float] = {}
    summaries: list[dict[str, Any]] = []
    pad_id = tok.token_id("<|endoftext|>") if tok.tok.token_to_id("<|endoftext|>") is not None else 0
    budget = opts.time_budget_s

    for si, stage in enumerate(cfg.stages):
        set_trainable(model, stage.train)
        peft_model = add_lora(model, stage.lora) if stage.lora is not None else None
        if si < start_stage:
            # stages already finished before the checkpoint: only their structure matters (LoRA merged)
            trained |= _param_names_in(model, lambda p: p.requires_grad)
            if peft_model is not None:
                merge_lora(model, peft_model)
            continue
        trained |= {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # master weights of trained parameters in fp32
        opt = make_optimizer(model, stage, d.device)
        sampler = StageSampler(examples, stage, cfg.seed * 1000 + si * 17 + d.rank, length=lambda ex: lengths[ex.id])
        rng = np.random.default_rng(cfg.seed * 7919 + si * 31 + d.rank)
        fwd.seg_weight = stage.seg_loss_weight
        fwd.sam2_augment = stage.sam2_augment
        cache_vit = not ({"vision"} & set(stage.train)) and stage.cache_frozen
        cache_sam = "sam2_image_encoder" not in stage.train and stage.cache_frozen
        step, elapsed_before = 0, 0.0
        if resume is not None and si == start_stage:
            missing = model.load_state_dict(resume["model"], strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"checkpoint has unexpected tensors {missing.unexpected_keys[:5]}")
            opt.load_state_dict(resume["optim"])
            step, elapsed_before = resume["step"], resume["stage_elapsed"]
            sampler.set_state(json.loads(resume["sampler"]))
            rng.bit_generator.state = json.loads(resume["rng"])
            torch.set_rng_state(resume["torch_rng"])
            if d.main:
                print(f"[train] resumed stage {stage.name} at step {step} (global {global_step})", flush=True)
        banks.drop_caches()
        if cache_vit or cache_sam:
            t0 = time.time()
            cdtype = torch.bfloat16 if (d.device.type == "cuda" and cfg.dtype == "bf16") else torch.float32
            model.eval()
            banks.build_caches(model, cache_vit, cache_sam, cdtype, autocast)
            if d.main:
                print(f"[train] stage {stage.name}: cached frozen encoders (vit={cache_vit}, sam={cache_sam}) in "
                      f"{time.time() - t0:.1f}s, banks {banks.nbytes() / 2**20:.0f} MiB", flush=True)
        ddp: nn.Module = fwd
        if d.enabled:
            ddp = nn.parallel.DistributedDataParallel(
                fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=True)
        max_steps = stage.max_steps
        if stage.epochs is not None:
            per_step = stage.batch_size * stage.grad_accum * d.world
            max_steps = max(1, math.ceil(stage.epochs * len(sampler) / per_step))
        if opts.max_steps is not None:
            max_steps = min(max_steps or opts.max_steps, opts.max_steps)
        stage_time = (stage.time_fraction * budget) if (budget and stage.time_fraction) else None
        if max_steps is None and stage_time is None:
            raise ValueError(f"stage {stage.name}: time_fraction needs --time-budget-s (or give max_steps/epochs)")
        if d.main:
            print(f"[train] stage {stage.name}: {len(sampler)} examples, kinds {sampler.kinds}, trains "
                  f"{trainable_summary(model)}, steps {max_steps}, time {stage_time}", flush=True)
        bar = None
        if d.main and opts.progress:
            from tqdm import tqdm

            bar = tqdm(total=max_steps, initial=step, desc=stage.name, mininterval=5.0, dynamic_ncols=True)
        model.train()
        t_stage = time.time() - elapsed_before
        t_ckpt = time.time()
        t_log, samples_log = time.time(), 0
        acc: dict[str, list[float]] = {}
        while True:
            elapsed = time.time() - t_stage
            done = (max_steps is not None and step >= max_steps) or (stage_time is not None and elapsed >= stage_time)
            if d.enabled:
                flag = torch.tensor([1.0 if done else 0.0], device=d.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                done = bool(flag.item())
            if done:
                break
            progress = max(step / max_steps if max_steps else 0.0, elapsed / stage_time if stage_time else 0.0)
            f = lr_factor(stage, step, progress)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            for micro in range(stage.grad_accum):
                exs = sampler.draw(stage.batch_size)
                ground = [bool(rng.random() < stage.ground_prob) for _ in exs]
                batch = collate(exs, banks, builder, ground, stage.ground_jitter, rng, pad_id,
                                (stage.option_redraw, stage.redraw_jitter, stage.redraw_marks))
                sync = contextlib.nullcontext()
                if d.enabled and micro < stage.grad_accum - 1:
                    sync = ddp.no_sync()
                with sync:
                    with autocast:
                        res = ddp(batch)
                    (res["loss"] / stage.grad_accum).backward()
                for k in ("loss", "lm_loss", "seg_loss", "aux_loss", "mask_iou"):
                    acc.setdefault(k, []).append(res[k].detach().float())  # read at log time: no sync here
                samples_log += batch.n_samples * d.world
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], stage.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            global_step += 1
            samples_total += stage.batch_size * stage.grad_accum * d.world
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == max_steps:
                now = time.time()
                last = {k: float(torch.stack(v).nanmean()) for k, v in acc.items()}
                if not math.isfinite(last.get("loss", 0.0)):
                    raise FloatingPointError(f"stage {stage.name} step {step}: loss is {last.get('loss')}")
                row = {"stage": stage.name, "step": step, "global_step": global_step,
                       "time_s": round(now - t_run, 2), "samples": samples_total,
                       "lr": opt.param_groups[0]["lr"], "samples_per_s": samples_log / max(1e-9, now - t_log),
                       **{k: last.get(k) for k in ("loss", "lm_loss", "seg_loss", "mask_iou")}}
                log.write(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}",
                                    iou=f"{last.get('mask_iou', float('nan')):.2f}")
                if d.main and not opts.progress:
                    print(f"[train] {stage.name} step {step} loss {last.get('loss', float('nan')):.4f} "
                          f"lm {last.get('lm_loss', float('nan')):.4f} seg {last.get('seg_loss', float('nan')):.4f}"
                          f" iou {last.get('mask_iou', float('nan')):.3f} {row['samples_per_s']:.1f} samples/s",
                          flush=True)
                acc, t_log, samples_log = {}, now, 0
            stop_now = opts.stop_after_steps is not None and global_step >= opts.stop_after_steps
            if d.main and (stop_now or time.time() - t_ckpt >= cfg.ckpt_every_s):
                save_checkpoint(ckpt_path, model, trained, opt, si, step, global_step, time.time() - t_stage,
                                sampler, rng)
                t_ckpt = time.time()
            if stop_now:
                if bar is not None:
                    bar.close()
                if d.enabled:
                    dist.barrier()
                    dist.destroy_process_group()
                if d.main:
                    print(f"[train] stopped after {global_step} steps; continue with --resume", flush=True)
                return RunResult(global_step, samples_total, time.time() - t_run, last, None, summaries)
        if bar is not None:
            bar.close()
        summary = {"stage": stage.name, "steps": step, "seconds": round(time.time() - t_stage, 1), **last}
        if val_examples:
            summary.update({f"val_{k}": v for k, v in evaluate(fwd, val_examples, builder, banks, stage,
                                                               pad_id, autocast).items()})
        summaries.append(summary)
        if d.main:
            print(f"[train] stage {stage.name} done: {json.dumps(summary)}", flush=True)
        if peft_model is not None:
            merge_lora(model, peft_model)
            fwd.model = model
        if d.main:
            save_checkpoint(ckpt_path, model, trained, opt, si + 1, 0, global_step, 0.0, sampler, rng)
    if d.enabled:
        dist.barrier()
    save_dir = opts.save_dir or (Path(cfg.save_dir) if cfg.save_dir else None)
    if d.main:
        if save_dir is not None:
            export(model, save_dir, tok_dir, cfg.save_dtype)
            print(f"[train] saved {save_dir}", flush=True)
        if log.jsonl.exists():
            try:
                plot_log(log.jsonl, out / "train_loss.png", title=f"{cfg.name}: training loss")
            except Exception as exc:  # noqa: BLE001 - a missing plot must not lose a finished run
                print(f"[train] plot failed: {type(exc).__name__}: {exc}", flush=True)
        (out / "summary.json").write_text(json.dumps({"stages": summaries, "global_step": global_step,
                                                      "seconds": round(time.time() - t_run, 1),
                                                      "world_size": d.world}, indent=2) + "\n")
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return RunResult(global_step, samples_total, time.time() - t_run, last, save_dir, summaries)


@torch.no_grad()
def evaluate(fwd: TrainingForward, examples: list[Example], builder: ExampleBuilder, banks: Banks,
             stage: StageConfig, pad_id: int, autocast, batch_size: int = 16) -> dict[str, float]:
    """Teacher-forced loss and GT-prompt mask IoU on held-back examples (grounding spans on, no jitter)."""
    was = fwd.training
    fwd.eval()
    rng = np.random.default_rng(0)
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(examples), batch_size):
        exs = examples[i:i + batch_size]
        batch = collate(exs, banks, builder, [True] * len(exs), 0.0, rng, pad_id)
        with autocast:
            res = fwd(batch)
        for k in ("loss", "lm_loss", "seg_loss", "mask_iou"):
            v = float(res[k])
            if not math.isnan(v):
                sums[k] = sums.get(k, 0.0) + v * len(exs)
        n += len(exs)
    fwd.train(was)
    return {k: v / n for k, v in sums.items()}
