"""Training throughput on 1 GPU vs N GPUs (DDP through torchrun) with the terrascope-mini shapes.

The data is the synthetic record set the training tests use (`tests/train/conftest.write_dataset`): real record
format, generated on the spot, so the script needs nothing but the repository and runs on any CUDA box:

    python3 -m bench.train_ddp --gpus 2 --seconds 60

It prints global samples/s for each run (from the runs' own `summary.json`/`train_log.jsonl`) and the ratio.
`--device cpu --tiny` checks the script itself on a CPU machine in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_config(path: Path, data: Path, out: Path, tiny: bool, batch_size: int) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from conftest import TINY_MODEL  # the training tests' tiny shapes

    model: dict = {"preset": "terrascope-mini"}
    if tiny:
        model["overrides"] = TINY_MODEL
    stage = {"name": "sft", "kinds": ["res", "l1", "l2", "cap"], "batch_size": batch_size, "lr": 3e-4,
             "train": ["vision", "projector", "llm", "llm_embed", "sam2_image_encoder", "sam2_prompt_encoder",
                       "sam2_mask_decoder", "seg_projector"], "ground_prob": 0.8, "ground_jitter": 0.1}
    stage.update({"max_steps": 2} if tiny else {"time_fraction": 1.0})
    cfg = {"name": "ddp-bench", "model": model, "tokenizer": {"vocab_size": 400, "min_frequency": 1},
           "data": str(data), "out": str(out), "stages": [stage], "seed": 0, "log_every": 5, "max_seq_len": 1024,
           "val_limit": 0, "dtype": "bf16" if not tiny else "fp32"}
    path.write_text(json.dumps(cfg))
    return path


def run(cfg: Path, out: Path, nproc: int, seconds: float, device: str) -> float:
    args = ["-m", "model.train", str(cfg), "--out", str(out), "--save-dir", str(out / "model"),
            "--time-budget-s", str(seconds), "--no-progress", "--device", device]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    else:
        cmd = [sys.executable, *args]
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # the first window holds warm-up
    if not rates:
        rates = [r["samples_per_s"] for r in rows if "samples_per_s" in r]
    return sum(rates) / max(1, len(rates))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0, help="training time budget of each run")
    ap.add_argument("--batch-size", type=int, default=16, help="per process")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (check the script on a CPU)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from conftest import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_dataset(root / "data", n_scenes=a.scenes)
        cfg = make_config(root / "cfg.json", data, root / "unused", a.tiny, a.batch_size)
        one = run(cfg, root / "run1", 1, a.seconds, a.device)
        many = run(cfg, root / f"run{a.gpus}", a.gpus, a.seconds, a.device)
    print(f"\ntraining throughput, terrascope-mini{' (tiny shapes)' if a.tiny else ''}, batch {a.batch_size}/process")
    print(f"  1 process : {one:8.1f} samples/s")
    print(f"  {a.gpus} processes: {many:8.1f} samples/s  ({many / max(one, 1e-9):.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
