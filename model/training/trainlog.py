"""Loss log (JSONL + CSV, append-only so a resumed run continues the same files) and its plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = ("stage", "step", "global_step", "time_s", "samples", "loss", "lm_loss", "seg_loss", "mask_iou",
           "lr", "samples_per_s")


class LossLog:
    """Appends one row per logged step to ``train_log.jsonl`` and ``train_log.csv`` in ``folder``."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.jsonl = self.folder / "train_log.jsonl"
        self.csv = self.folder / "train_log.csv"
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, global_step: int) -> None:
        """Drop rows past ``global_step`` (a resume from an older checkpoint must not keep them)."""
        if not self.enabled or not self.jsonl.exists():
            return
        rows = [r for r in read_log(self.jsonl) if int(r.get("global_step", 0)) <= global_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        with self.csv.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        with self.jsonl.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        new = not self.csv.exists()
        with self.csv.open("a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def plot_log(log_path: str | Path, png_path: str | Path, title: str = "training") -> Path:
    """Loss curves (total, LM, seg) and the running mask IoU against the global step, stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        raise ValueError(f"{log_path}: no rows to plot")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["global_step"] for r in rows]
    for key, style in (("loss", "-"), ("lm_loss", "--"), ("seg_loss", ":")):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    pts = [(s, r["mask_iou"]) for s, r in zip(steps, rows) if r.get("mask_iou") is not None]
    if pts:
        ax2.plot(*zip(*pts), label="train mask IoU (GT-prompted)")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("IoU")
    # shade stages
    bounds: dict[str, list[int]] = {}
    for r in rows:
        bounds.setdefault(r["stage"], []).append(r["global_step"])
    for i, (name, ss) in enumerate(bounds.items()):
        for a in (ax, ax2):
            a.axvspan(min(ss), max(ss), alpha=0.08 * (i % 2 + 1), color="grey")
        top = ax.get_ylim()[1]
        ax.text(min(ss), top / (3.0 ** (i % 3)), name, va="top", fontsize=8)  # staggered: short stages
    ax.legend()
    ax2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
