"""Run a bench through an answerer and score it: per-task accuracy, macro average, [SEG] mask IoU.

Answerers:
* ``WorkerAnswerer`` sends every question through an in-process worker service on a private endpoint -
  the same request validation, raster reading, preparation, measurement grounding and model call that
  ``terrascope ask`` and the QGIS plugin use;
* ``RecordedAnswerer`` replays recorded outputs (text + mask files), to re-score a run or to test the
  scorer with fixed outputs.
Scoring uses the official option extraction (``extract.extract_choice``). A question's IoU is the mean,
over its ground-truth masks, of the best IoU with any predicted mask (0 when the model drew none).

The *measured* mode scores, for the grounded run, the option the worker's own measurements of the masks support
(``done.measured_choice``, worker/resolve.py) instead of the model's letter; a question the worker could not
resolve counts as wrong. It is read from the worker's ``done`` event (or a recording), never recomputed here.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from model.bench.extract import extract_choice
from model.bench.format import TASKS, BenchItem
from model.data.numbers import option_text

#: Bench roles -> worker roles (the worker speaks optical, sar and t0..tn).
_ROLE = {"pre": "t0", "post": "t1", "before": "t0", "after": "t1"}
INJECTIONS = ("mask", "box", "random", "none")


@dataclass
class RawAnswer:
    text: str
    masks: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (image index, bool mask)
    seconds: float = 0.0
    error: str | None = None
    measured: dict | None = None  # the worker's done.measured_choice (None: no rule applied, or not recorded)


class Answerer(Protocol):
    name: str

    def answer(self, item: BenchItem, grounding: bool, injection: str) -> RawAnswer: ...


@dataclass
class Prediction:
    id: str
    task: str
    grounding: bool
    injection: str
    answer: str
    choice: str
    correct: bool
    iou: float | None
    n_masks: int
    seconds: float
    text: str
    error: str | None = None
    measured_choice: str | None = None  # option letter the masks support (worker/resolve.py), if any
    measured_quantity: str | None = None
    gt_ious: list[tuple[str, float]] = field(default_factory=list)  # (ground-truth label, best IoU) per gt mask
    platform: str = "unknown"  # the item's imagery: aerial, satellite, synthetic (format.platform)


def worker_roles(roles: list[str]) -> list[str]:
    return [_ROLE.get(r, r) for r in roles]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        b = resize_nearest(b, a.shape)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    h, w = shape[:2]
    rows = np.minimum((np.arange(h) * mask.shape[0]) // h, mask.shape[0] - 1)
    cols = np.minimum((np.arange(w) * mask.shape[1]) // w, mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def gt_ious(item: BenchItem, masks: list[tuple[int, np.ndarray]]) -> list[tuple[str, float]]:
    """(label, best IoU with any predicted mask) for each ground-truth mask of the item."""
    from model.data.store import load_mask

    preds = [m for _, m in masks]
    return [(gt.label, max((iou(load_mask(gt.path), p) for p in preds), default=0.0)) for gt in item.gt_masks]


def score(item: BenchItem, raw: RawAnswer, grounding: bool, injection: str) -> Prediction:
    choice = extract_choice(raw.text)
    measured = raw.measured if isinstance(raw.measured, dict) else {}
    letter = measured.get("choice")
    per_gt = gt_ious(item, raw.masks)
    return Prediction(item.id, item.task, grounding, injection, item.answer, choice,
                      bool(item.answer) and choice == item.answer.upper(),
                      float(np.mean([s for _, s in per_gt])) if per_gt else None, len(raw.masks),
                      raw.seconds, raw.text, raw.error, str(letter).upper() if letter else None,
                      measured.get("quantity"), per_gt, item.platform)


def measured_predictions(preds: list[Prediction]) -> list[Prediction]:
    """The grounded predictions re-scored with the measured choice; unresolved questions count as wrong."""
    out = []
    for p in preds:
        if not p.grounding:
            continue
        letter = p.measured_choice or ""
        out.append(replace(p, choice=letter, correct=bool(p.answer) and letter == p.answer.upper()))
    return out


# -------------------------------------------------------------------------------------- answerers
class WorkerAnswerer:
    """Questions go through a real worker service (ZeroMQ ROUTER, job queue, model) in this process."""

    name = "worker"

    def __init__(self, model: str, allow: list[Path], device: str = "auto", dtype: str | None = None,
                 max_new_tokens: int = 512, timeout_s: float = 600.0):
        from qgis_plugin.client import WorkerClient
        from worker.cli import model_loader, private_endpoint, resolve_model
        from worker.service import ServiceConfig, WorkerService

        self.model = resolve_model(model)
        endpoint, self._tmp = private_endpoint()
        config = ServiceConfig(endpoint=endpoint, allow_paths=[p.resolve() for p in allow], model_label=self.model,
                               max_queue=1)
        self.service = WorkerService(config, model_loader(self.model, device, dtype))
        self.endpoint = self.service.start()
        self.client = WorkerClient(self.endpoint, timeout_s=timeout_s)
        self.max_new_tokens = max_new_tokens
        self.info: dict = {}

    def answer(self, item: BenchItem, grounding: bool, injection: str) -> RawAnswer:
        from qgis_plugin import protocol as P
        from qgis_plugin.client import WorkerError

        roles = worker_roles([im.role for im in item.images])
        images = [{"path": str(im.path.resolve()), "role": r} for im, r in zip(item.images, roles)]
        header = P.request("ask", question=item.question, images=images, measure_grounding=bool(grounding),
                           options=[option_text(c) for c in item.choices],
                           settings={"injection": injection, "max_new_tokens": self.max_new_tokens})
        masks: list[tuple[int, np.ndarray]] = []

        def on_event(ev: dict, arrays: dict) -> None:
            if ev.get("event") == "mask" and "mask" in arrays:
                masks.append((int(ev.get("image", 0)), np.asarray(arrays["mask"]).astype(bool)))

        t0 = time.monotonic()
        try:
            done = self.client.ask(header, {}, on_event=on_event)
        except WorkerError as exc:
            return RawAnswer("", masks, time.monotonic() - t0, f"{exc.code}: {exc.message}")
        if not self.info and done.get("model"):
            self.info = {"model": done.get("model")}
        measured = done.get("measured_choice")
        return RawAnswer(str(done.get("text") or ""), masks, time.monotonic() - t0,
                         measured=measured if isinstance(measured, dict) else None)

    def close(self) -> None:
        import shutil

        self.client.close()
        self.service.stop()
        self.service.wait(15)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


class RecordedAnswerer:
    """Replays outputs recorded as JSONL: {"id", "grounding", "injection", "text", "masks": [{"path","image"}]},
    optionally "measured_choice" (the worker's ``done.measured_choice``, an object with at least "choice").

    Mask paths are relative to the recording file. A question with no recording for the requested mode
    is answered with an empty text (scored wrong), so a partial recording is visible in the report.
    """

    name = "recorded"

    def __init__(self, path: str | Path):
        from model.data.store import read_jsonl

        self.path = Path(path)
        self.rows: dict[tuple[str, bool, str], dict] = {}
        for row in read_jsonl(self.path):
            key = (str(row["id"]), bool(row.get("grounding", True)), str(row.get("injection", "mask")))
            self.rows[key] = row

    def answer(self, item: BenchItem, grounding: bool, injection: str) -> RawAnswer:
        from model.data.store import load_mask

        row = self.rows.get((item.id, grounding, injection))
        if row is None:
            return RawAnswer("", [], 0.0, "no recorded output")
        masks = [(int(m.get("image", 0)), load_mask(self.path.parent / m["path"])) for m in row.get("masks", [])]
        measured = row.get("measured_choice")
        return RawAnswer(str(row.get("text", "")), masks, float(row.get("seconds", 0.0)),
                         measured=measured if isinstance(measured, dict) else None)

    def close(self) -> None:
        return None


def record_outputs(path: str | Path, preds: list[tuple[Prediction, RawAnswer]]) -> None:
    """Write predictions in the format ``RecordedAnswerer`` reads (masks as PNG beside the file)."""
    from model.data.store import write_mask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for k, (p, raw) in enumerate(preds):
            masks = []
            for j, (img, m) in enumerate(raw.masks):
                rel = f"pred_masks/{k:05d}_{j}.png"
                write_mask(path.parent / rel, m)
                masks.append({"path": rel, "image": img})
            fh.write(json.dumps({"id": p.id, "grounding": p.grounding, "injection": p.injection, "text": raw.text,
                                 "masks": masks, "seconds": raw.seconds, "measured_choice": raw.measured}) + "\n")


# ---------------------------------------------------------------------------------------- running
def stratified(items: list[BenchItem], limit: int | None) -> list[BenchItem]:
    """At most ``limit`` items, taken round-robin over tasks so every task stays represented."""
    if limit is None or limit >= len(items):
        return list(items)
    by_task: dict[str, list[BenchItem]] = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    out: list[BenchItem] = []
    queues = [by_task[t] for t in sorted(by_task)]
    i = 0
    while len(out) < limit:
        for q in queues:
            if i < len(q) and len(out) < limit:
                out.append(q[i])
        i += 1
    return out


def run(items: list[BenchItem], answerer: Answerer, modes: list[bool], injection: str = "mask",
        progress: Callable[[int, int, Prediction], None] | None = None) -> list[tuple[Prediction, RawAnswer]]:
    if injection not in INJECTIONS:
        raise ValueError(f"injection must be one of {', '.join(INJECTIONS)}, got {injection!r}")
    out = []
    total = len(items) * len(modes)
    for grounding in modes:
        for it in items:
            raw = answerer.answer(it, grounding, injection)
            pred = score(it, raw, grounding, injection)
            out.append((pred, raw))
            if progress:
                progress(len(out), total, pred)
    return out


@dataclass
class Summary:
    n: int
    per_task: dict[str, float]
    macro_accuracy: float
    micro_accuracy: float
    mean_iou: float
    iou_correct: float | None
    iou_incorrect: float | None
    per_task_iou: dict[str, float]
    counts: dict[str, int]
    errors: int
    mean_seconds: float
    resolved: int | None = None  # measured mode: questions the worker resolved (the others count as wrong)
    per_label_iou: dict[str, float] = field(default_factory=dict)  # ground-truth mask label -> mean best IoU
    label_counts: dict[str, int] = field(default_factory=dict)
    # label -> platform -> (mean best IoU, masks), for benches that name their imagery ("sensor")
    platform_label_iou: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(preds: list[Prediction], measured: bool = False) -> Summary:
    """Per-task and macro accuracy, IoU figures; ``measured`` also counts the resolved questions."""
    by_task: dict[str, list[Prediction]] = defaultdict(list)
    for p in preds:
        by_task[p.task].append(p)
    order = [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS)
    per_task = {t: float(np.mean([p.correct for p in by_task[t]])) for t in order}
    ious = [p.iou for p in preds if p.iou is not None]
    per_task_iou = {t: float(np.mean([p.iou for p in by_task[t] if p.iou is not None]))
                    for t in order if any(p.iou is not None for p in by_task[t])}
    corr = [p.iou for p in preds if p.iou is not None and p.correct]
    inc = [p.iou for p in preds if p.iou is not None and not p.correct]
    by_label: dict[str, list[float]] = defaultdict(list)
    by_platform: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in preds:
        for label, value in p.gt_ious:
            by_label[label].append(value)
            by_platform[label][p.platform].append(value)
    labels = sorted(by_label, key=lambda k: (-len(by_label[k]), k))
    return Summary(
        n=len(preds), per_task=per_task, macro_accuracy=float(np.mean(list(per_task.values()))) if per_task else 0.0,
        micro_accuracy=float(np.mean([p.correct for p in preds])) if preds else 0.0,
        mean_iou=float(np.mean(ious)) if ious else 0.0,
        iou_correct=float(np.mean(corr)) if corr else None, iou_incorrect=float(np.mean(inc)) if inc else None,
        per_task_iou=per_task_iou, counts={t: len(by_task[t]) for t in order},
        errors=sum(p.error is not None for p in preds),
        mean_seconds=float(np.mean([p.seconds for p in preds])) if preds else 0.0,
        resolved=sum(bool(p.choice) for p in preds) if measured else None,
        per_label_iou={k: float(np.mean(by_label[k])) for k in labels},
        label_counts={k: len(by_label[k]) for k in labels},
        platform_label_iou={k: {pf: (float(np.mean(v)), len(v)) for pf, v in sorted(by_platform[k].items())}
                            for k in labels},
    )
