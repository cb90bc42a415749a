"""The bench file: JSON Lines, one question per line, paths relative to the file (issue 5 format).

    {"id": str, "task": "CA|AQ|CR|BRD|DM|BCE|COUNT",
     "images": [{"path": str, "role": "optical|sar|pre|post|t0|t1|..."}],
     "question": str, "choices": ["A. ...", ...], "answer": "A",
     "gt_masks": [{"path": str, "label": str}],         # optional
     "sensor": "aerial RGB"}                              # optional: the imagery; other keys are ignored

``sensor`` lets the report split mask IoU by platform (aerial, satellite, synthetic; ``platform``): the issue's
building-mask target is about aerial tiles, and a satellite tile's buildings are a different problem.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("CA", "AQ", "CR", "BRD", "DM", "BCE", "COUNT")
TASK_NAMES = {
    "CA": "coverage percentage", "AQ": "absolute area", "CR": "comparative ranking",
    "BRD": "boundary relationship", "DM": "distance measurement", "BCE": "building change", "COUNT": "counting",
}
_CHOICE = re.compile(r"^[A-D]\. ")


_AERIAL = re.compile(r"\b(aerial|drone|uav|airborne)\b", re.IGNORECASE)


def platform(sensor: str | None) -> str:
    """"aerial" (aircraft, drone), "synthetic", "satellite" (any other named sensor) or "unknown"."""
    if not sensor:
        return "unknown"
    if "synthetic" in sensor.lower():
        return "synthetic"
    return "aerial" if _AERIAL.search(sensor) else "satellite"


class BenchFormatError(ValueError):
    """A bench line is malformed; the message names the file, line and field."""


@dataclass
class BenchImage:
    path: Path  # absolute (resolved against the bench file's folder)
    role: str


@dataclass
class GtMask:
    path: Path
    label: str


@dataclass
class BenchItem:
    id: str
    task: str
    images: list[BenchImage]
    question: str
    choices: list[str]
    answer: str
    gt_masks: list[GtMask] = field(default_factory=list)
    sensor: str | None = None  # the imagery ("aerial RGB", "WorldView-2 pan", ...), when the bench says

    @property
    def platform(self) -> str:
        return platform(self.sensor)

    @property
    def letters(self) -> list[str]:
        return [c[0] for c in self.choices]

    def to_json(self, base: Path) -> dict:
        def rel(p: Path) -> str:  # "../" is fine: a bench inside a dataset folder points at its images
            return Path(os.path.relpath(Path(p).resolve(), base.resolve())).as_posix()

        out = {"id": self.id, "task": self.task, "images": [{"path": rel(i.path), "role": i.role} for i in self.images],
               "question": self.question, "choices": self.choices, "answer": self.answer}
        if self.gt_masks:
            out["gt_masks"] = [{"path": rel(m.path), "label": m.label} for m in self.gt_masks]
        if self.sensor:
            out["sensor"] = self.sensor
        return out


def _need(obj: dict, key: str, typ: type, where: str) -> object:
    if key not in obj:
        raise BenchFormatError(f"{where}: missing '{key}'")
    val = obj[key]
    if not isinstance(val, typ):
        raise BenchFormatError(f"{where}: '{key}' must be {typ.__name__}, got {type(val).__name__}")
    return val


def parse_item(obj: object, base: Path, where: str, check_files: bool = True) -> BenchItem:
    if not isinstance(obj, dict):
        raise BenchFormatError(f"{where}: a line must be a JSON object")
    iid = str(_need(obj, "id", str, where))
    task = str(_need(obj, "task", str, where))
    if task not in TASKS:
        raise BenchFormatError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    images = []
    for i, im in enumerate(_need(obj, "images", list, where)):  # type: ignore[arg-type]
        w = f"{where} images[{i}]"
        if not isinstance(im, dict):
            raise BenchFormatError(f"{w}: must be an object with 'path' and 'role'")
        path = base / str(_need(im, "path", str, w))
        if check_files and not path.is_file():
            raise BenchFormatError(f"{w}: image file {path} not found")
        images.append(BenchImage(path, str(im.get("role", "optical"))))
    if not images:
        raise BenchFormatError(f"{where}: 'images' is empty")
    question = str(_need(obj, "question", str, where))
    choices = [str(c) for c in _need(obj, "choices", list, where)]  # type: ignore[union-attr]
    if not 2 <= len(choices) <= 4 or any(not _CHOICE.match(c) for c in choices):
        raise BenchFormatError(f"{where}: 'choices' must be 2-4 strings like 'A. ...', got {choices}")
    letters = [c[0] for c in choices]
    if letters != list("ABCD"[: len(choices)]):
        raise BenchFormatError(f"{where}: choices must be lettered A, B, ... in order, got {letters}")
    answer = str(_need(obj, "answer", str, where)).strip().upper()
    if answer not in letters:
        raise BenchFormatError(f"{where}: answer {answer!r} is not one of the choices {letters}")
    gts = []
    for i, m in enumerate(obj.get("gt_masks") or []):
        w = f"{where} gt_masks[{i}]"
        if not isinstance(m, dict):
            raise BenchFormatError(f"{w}: must be an object with 'path' and 'label'")
        path = base / str(_need(m, "path", str, w))
        if check_files and not path.is_file():
            raise BenchFormatError(f"{w}: mask file {path} not found")
        gts.append(GtMask(path, str(m.get("label", ""))))
    sensor = obj.get("sensor")
    if sensor is not None and not isinstance(sensor, str):
        raise BenchFormatError(f"{where}: 'sensor' must be a string like \"aerial RGB\", got {sensor!r}")
    return BenchItem(iid, task, images, question, choices, answer, gts, sensor or None)


def read_bench(path: str | Path, check_files: bool = True) -> list[BenchItem]:
    path = Path(path)
    if not path.is_file():
        raise BenchFormatError(f"bench file {path} not found")
    base = path.parent
    items, seen = [], set()
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchFormatError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            item = parse_item(obj, base, f"{path.name}:{n}", check_files)
            if item.id in seen:
                raise BenchFormatError(f"{path.name}:{n}: duplicate id {item.id!r}")
            seen.add(item.id)
            items.append(item)
    if not items:
        raise BenchFormatError(f"bench file {path} has no questions")
    return items


def write_bench(path: str | Path, items: list[BenchItem]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps(it.to_json(path.parent), ensure_ascii=False) + "\n")
