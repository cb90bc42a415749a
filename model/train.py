"""``python -m model.train CONFIG`` / ``terrascope train CONFIG``: two-stage TerraScope training.

Stage 1 (RES pretraining) and stage 2 (Terra-CoT SFT) are entries of the config's ``stages`` list; what each
trains (full groups or LoRA on the LLM) is config data. Runs on CPU, one GPU, or several through
``torchrun --nproc_per_node N -m model.train CONFIG`` (DDP). See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.training.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="terrascope train", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="training config JSON (e.g. configs/terrascope-mini.json)")
    ap.add_argument("--data", help="dataset folder (overrides the config)")
    ap.add_argument("--out", help="run folder: tokenizer, checkpoints, log, plot (overrides the config)")
    ap.add_argument("--save-dir", help="where the final native model goes (overrides the config)")
    ap.add_argument("--init-from", help="start from this checkpoint folder (configs with model.checkpoint)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: one GPU per process)")
    ap.add_argument("--time-budget-s", type=float, help="wall-clock budget shared by the stages' time_fraction")
    ap.add_argument("--max-steps", type=int, help="cap every stage at this many optimiser steps")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.pt if present")
    ap.add_argument("--stop-after-steps", type=int,
                    help="checkpoint and stop after N optimiser steps in all (resume later; schedule unchanged)")
    ap.add_argument("--seed", type=int, help="override the config's seed")
    ap.add_argument("--limit-records", type=int, help="use only the first N records (smoke tests)")
    ap.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = load_config(a.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.data:
        cfg.data = a.data
    if a.out:
        cfg.out = a.out
    if a.seed is not None:
        cfg.seed = a.seed
    if a.init_from:
        if "checkpoint" not in cfg.model:
            print("error: --init-from needs a config whose model is a checkpoint, not a preset", file=sys.stderr)
            return 2
        cfg.model["checkpoint"] = a.init_from
    from model.training.data import DataError
    from model.training.loop import RunOptions, run

    opts = RunOptions(out=Path(cfg.out), device=a.device, time_budget_s=a.time_budget_s, max_steps=a.max_steps,
                      resume=a.resume, save_dir=Path(a.save_dir) if a.save_dir else None,
                      progress=not a.no_progress, limit_records=a.limit_records,
                      stop_after_steps=a.stop_after_steps)
    try:
        res = run(cfg, opts)
    except (DataError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.save_dir is None and a.stop_after_steps is not None:
        return 0
    print(f"[train] done: {res.global_step} steps, {res.samples} samples in {res.seconds:.0f}s; "
          f"model: {res.save_dir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
