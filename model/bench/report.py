"""Markdown report and PNG plot of a bench run (accuracy per task; IoU of correct vs incorrect, paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.bench.evaluate import Prediction, Summary
from model.bench.format import TASK_NAMES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(title: str, runs: dict[str, Summary], meta: dict) -> str:
    """``runs``: label ("grounded", "not grounded", "measured") -> summary of that mode."""
    lines = [f"# {title}", ""]
    for k, v in meta.items():
        lines.append(f"- **{k}**: {v}")
    lines.append("")
    labels = list(runs)
    tasks: list[str] = []
    for s in runs.values():
        tasks += [t for t in s.per_task if t not in tasks]
    head = "| task | n | " + " | ".join(f"accuracy % ({lab})" for lab in labels) + " | mean IoU |"
    lines += [head, "|" + "---|" * (3 + len(labels))]
    first = runs[labels[0]]
    for t in tasks:
        row = [f"{t} ({TASK_NAMES.get(t, t)})", str(first.counts.get(t, 0))]
        row += [_pct(runs[lab].per_task.get(t)) for lab in labels]
        row.append(_f(first.per_task_iou.get(t)))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("| **macro average** | " + str(first.n) + " | "
                 + " | ".join(f"**{_pct(runs[lab].macro_accuracy)}**" for lab in labels)
                 + f" | **{_f(first.mean_iou)}** |")
    lines.append("")
    for lab, s in runs.items():
        resolved = f", {s.resolved} of {s.n} resolved" if s.resolved is not None else ""
        lines.append(f"- {lab}: macro {_pct(s.macro_accuracy)} %, micro {_pct(s.micro_accuracy)} %, mean IoU "
                     f"{_f(s.mean_iou)} (correct answers {_f(s.iou_correct)}, incorrect {_f(s.iou_incorrect)}), "
                     f"{s.errors} errors, {s.mean_seconds:.2f} s per question{resolved}")
    lines.append("")
    if first.per_label_iou:
        lines += [(f"Mask IoU per ground-truth label ({labels[0]} run; the best IoU of any [SEG] mask with each "
                   "ground-truth mask, averaged over the masks of that label):"), "",
                  "| ground-truth label | masks | mean IoU |", "|---|---|---|"]
        lines += [f"| {k} | {first.label_counts.get(k, 0)} | {_f(v)} |" for k, v in first.per_label_iou.items()]
        lines.append("")
    split = {k: v for k, v in first.platform_label_iou.items() if len(v) > 1}
    if split:
        platforms = sorted({pf for v in split.values() for pf in v})
        lines += ["The same, by the imagery's platform (the bench's `sensor` key), for labels seen on several:", "",
                  "| ground-truth label | " + " | ".join(f"{pf}: masks, IoU" for pf in platforms) + " |",
                  "|---|" + "---|" * len(platforms)]
        for k, v in split.items():
            cells = [f"{v[pf][1]}, {_f(v[pf][0])}" if pf in v else "–" for pf in platforms]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
    if "measured" in runs:
        lines.append("*measured*: the option that the worker's own measurements of the grounded run's masks support "
                     "(`done.measured_choice`, worker/resolve.py: coverage, area, count, distance, adjacency, change "
                     "or the larger region, nearest option); a question without a measured choice counts as wrong. "
                     "\"grounded\" and \"not grounded\" are the model's own letters.")
        lines.append("")
    lines.append("Option extraction follows the official evaluation (leading A-D in `<answer>`, else the first "
                 "stand-alone A-D inside `<answer>`, else the whole response). IoU: per question, the mean over "
                 "ground-truth masks of the best IoU with any predicted `[SEG]` mask.")
    return "\n".join(lines) + "\n"


def plot(path: Path, runs: dict[str, Summary], preds: list[Prediction], title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(runs)
    tasks: list[str] = []
    for s in runs.values():
        tasks += [t for t in s.per_task if t not in tasks]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(labels), 1)
    x = np.arange(len(tasks) + 1)
    for i, lab in enumerate(labels):
        vals = [100 * runs[lab].per_task.get(t, 0.0) for t in tasks] + [100 * runs[lab].macro_accuracy]
        ax1.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=lab)
    ax1.set_xticks(x, [*tasks, "macro"])
    ax1.set_ylim(0, 100)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("Accuracy per task")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    main = preds_of(preds, labels[0])
    corr = [p.iou for p in main if p.iou is not None and p.correct]
    inc = [p.iou for p in main if p.iou is not None and not p.correct]
    bins = np.linspace(0, 1, 11)
    if corr or inc:
        ax2.hist([corr, inc], bins=bins, label=[f"correct (mean {np.mean(corr) if corr else 0:.2f})",
                                                f"incorrect (mean {np.mean(inc) if inc else 0:.2f})"],
                 color=["tab:green", "tab:red"])
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no ground-truth masks", ha="center", va="center")
    ax2.set_xlabel("IoU of [SEG] masks with ground truth")
    ax2.set_ylabel("questions")
    ax2.set_title(f"IoU for correct vs incorrect answers ({labels[0]})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preds_of(preds: list[Prediction], label: str) -> list[Prediction]:
    grounding = label.startswith("grounded")
    return [p for p in preds if p.grounding == grounding]
