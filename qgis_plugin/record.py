"""What one question produced, and its Markdown export.

Kept free of Qt widgets so the dock, the Processing algorithms and the tests share one representation.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from .geometry import Polygon, Transform


@dataclass
class StepRecord:
    """One [SEG] step as received, plus the plugin's own measurement of its polygons."""

    step: int  # 0-based, as the model counts
    label: str
    score: float
    mask: np.ndarray  # bool (rows, cols)
    transform: Transform
    crs_wkt: str
    image_index: int = 0
    region_rule: str | None = None  # what the phrase rule did to the mask ("largest object"), if anything
    worker_area_ha: float | None = None  # the worker's own figure, for the agreement check
    measurements: dict = field(default_factory=dict)  # everything else the worker measured
    polygons: list[Polygon] = field(default_factory=list)

    @property
    def area_ha(self) -> float | None:
        values = [p.area_ha for p in self.polygons]
        if not values:
            return 0.0 if self.crs_wkt else None
        return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]

    @property
    def perimeter_m(self) -> float | None:
        values = [p.perimeter_m for p in self.polygons]
        return None if any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]


@dataclass
class AskRecord:
    """One question of the session: inputs, streamed text, steps, answer, where the results went."""

    question: str
    options: list[str] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))
    reasoning: str = ""  # the worker's reasoning (special tokens removed); the stream until `done`
    stream: str = ""  # the text exactly as streamed, [SEG] markers included (replayed by the dock)
    answer: str = ""
    choice: str | None = None
    text: str = ""
    steps: list[StepRecord] = field(default_factory=list)
    model: str = ""
    device: str = ""
    stopped: str = ""
    timings_ms: dict = field(default_factory=dict)
    error: str = ""  # one-line message when the ask failed or was cancelled
    checks: list[str] = field(default_factory=list)  # the worker's warnings: answer figures no mask measures
    measured_choice: str | None = None  # the option the worker's measurements of the masks support
    measured: str = ""  # why: what the masks measure and which option that supports
    gpkg_path: str = ""
    layer_ids: list[str] = field(default_factory=list)
    group_name: str = ""

    @property
    def finished(self) -> bool:
        return bool(self.answer or self.error)


def _fmt_ha(value: float | None) -> str:
    if value is None:
        return "n/a (no CRS)"
    return f"{value:,.2f} ha" if value >= 0.01 else f"{value * 1e4:,.1f} m²"


def to_markdown(record: AskRecord) -> str:
    """The reasoning, steps and answer as Markdown, for the clipboard or a .md file."""
    lines = [f"# {record.question.strip() or '(no question)'}", ""]
    meta = [f"*Asked {record.created}*"]
    if record.layer_names:
        meta.append("on " + ", ".join(f"`{n}`" for n in record.layer_names))
    if record.model:
        meta.append(f"with model `{record.model}`" + (f" on {record.device}" if record.device else ""))
    lines += [" ".join(meta), ""]
    if record.options:
        lines += ["**Options**", ""] + [f"- {o}" for o in record.options] + [""]
    lines += ["## Answer", "", record.answer.strip() or "(no answer)", ""]
    if record.choice:
        lines += [f"**Choice:** {record.choice}", ""]
    if record.error:
        lines += [f"> **Error:** {record.error}", ""]
    if record.measured_choice:
        lines += [f"**Measured choice:** {record.measured_choice} ({record.measured})", ""]
    lines += [f"> **Check:** {message}" for message in record.checks] + ([""] if record.checks else [])
    if record.reasoning.strip():
        lines += ["## Reasoning", "", record.reasoning.strip(), ""]
    if record.steps:
        lines += ["## Steps", "", "| step | label | area | perimeter | score |", "|---:|---|---:|---:|---:|"]
        for s in record.steps:
            per = "n/a" if s.perimeter_m is None else f"{s.perimeter_m:,.0f} m"
            label = s.label.replace("|", "\\|").replace("\n", " ") + (f" ({s.region_rule})" if s.region_rule else "")
            lines.append(f"| {s.step + 1} | {label} | {_fmt_ha(s.area_ha)} | {per} | {s.score:.2f} |")
        lines.append("")
    if record.gpkg_path:
        lines += [f"Results: `{record.gpkg_path}`", ""]
    return "\n".join(lines)
