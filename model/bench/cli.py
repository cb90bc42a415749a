"""``terrascope bench FILE.jsonl|FILE.parquet [--model DIR|PRESET] [--device D] [--limit N] [--json] [--out DIR]
[--injection mask|box|random|none] [--ground/--no-ground] [--recorded FILE]``

Without ``--ground``/``--no-ground`` every question runs twice, with and without measurement grounding, and
both accuracies are reported; the headline numbers (and the ``--json`` line) are the grounded run's.
When the grounded run is part of it, a third mode, "measured", scores the option the worker's measurements of
the grounded masks support (``done.measured_choice``). With ``--json`` the last line printed is
``{"macro_accuracy", "per_task", "mean_iou", "n"}``, plus ``"measured": {"macro_accuracy", "per_task",
"resolved", "n"}`` when the grounded run is part of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from model.bench import evaluate as E
from model.bench import report as R
from model.bench.format import BenchFormatError, read_bench


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terrascope bench", description="Run TerraScope-Bench through the worker.")
    p.add_argument("file", type=Path, help="bench JSONL (paths relative to it) or the official parquet")
    p.add_argument("--model", default=None, help="model folder or preset (default: the embedded terrascope-mini)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--limit", type=int, default=None, help="at most N questions, spread over the tasks")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line, last")
    p.add_argument("--out", type=Path, default=None, help="folder for report.md, plot.png, results.json")
    p.add_argument("--injection", choices=E.INJECTIONS, default="mask", help="visual-token injection (Table 2)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--ground", dest="ground", action="store_true", default=None,
                   help="only with measurement grounding")
    g.add_argument("--no-ground", dest="ground", action="store_false", help="only without measurement grounding")
    p.add_argument("--recorded", type=Path, default=None,
                   help="score recorded outputs (JSONL written by --out .../outputs.jsonl) instead of a model")
    p.add_argument("--max-new-tokens", type=int, default=512)
    return p


def _load(args: argparse.Namespace, tmp: Path) -> list:
    if args.file.suffix.lower() == ".parquet":
        from model.bench.official import read_official

        return read_official(args.file, tmp / "images")
    return read_bench(args.file)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = sys.stderr if args.json else sys.stdout
    if args.limit is not None and args.limit < 1:
        print("terrascope bench: error: --limit must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="terrascope-bench-") as tmpdir:
        try:
            items = E.stratified(_load(args, Path(tmpdir)), args.limit)
        except BenchFormatError as exc:
            print(f"terrascope bench: error: {exc}", file=sys.stderr)
            return 2
        modes = [True, False] if args.ground is None else [bool(args.ground)]
        if args.recorded is not None:
            answerer: E.Answerer = E.RecordedAnswerer(args.recorded)
            model_name = f"recorded outputs {args.recorded}"
        else:
            allow = sorted({im.path.resolve().parent for it in items for im in it.images})
            try:
                answerer = E.WorkerAnswerer(args.model or "terrascope-mini", allow, args.device, args.dtype,
                                            args.max_new_tokens)
            except Exception as exc:  # noqa: BLE001 - a model that cannot start is reported in one line
                print(f"terrascope bench: error: cannot start the worker: {exc}", file=sys.stderr)
                return 3
            model_name = getattr(answerer, "model", "?")

        def progress(i: int, n: int, p: E.Prediction) -> None:
            mark = "ok " if p.correct else "err" if p.error else "-- "
            measured = f" measured={p.measured_choice or '-'}" if p.grounding else ""
            print(f"[{i}/{n}] {mark} {p.task:5s} {'grounded' if p.grounding else 'plain   '} {p.id} "
                  f"-> {p.choice[:12]!r} (gt {p.answer}){measured} iou={'-' if p.iou is None else f'{p.iou:.2f}'}",
                  file=log, flush=True)

        try:
            results = E.run(items, answerer, modes, args.injection, progress)
        finally:
            answerer.close()
    preds = [p for p, _ in results]
    runs = {("grounded" if m else "not grounded"): E.summarize([p for p in preds if p.grounding == m]) for m in modes}
    if True in modes:  # the option the grounded masks support, as the worker measured it
        runs["measured"] = E.summarize(E.measured_predictions(preds), measured=True)
    head = runs[next(iter(runs))]
    meta = {"bench": str(args.file), "model": model_name, "questions": len(items), "injection": args.injection,
            "modes": ", ".join(runs)}
    text = R.markdown("TerraScope-Bench report", runs, meta)
    print(text, file=log)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text(text)
        R.plot(args.out / "plot.png", runs, preds, f"{Path(args.file).name} - {model_name}")
        (args.out / "results.json").write_text(json.dumps(
            {"meta": meta, "runs": {k: v.to_dict() for k, v in runs.items()},
             "predictions": [vars(p) for p in preds]}, indent=1))
        if args.recorded is None:
            E.record_outputs(args.out / "outputs.jsonl", results)
        print(f"report: {args.out / 'report.md'}, plot: {args.out / 'plot.png'}", file=log)
    if args.json:
        line = {"macro_accuracy": head.macro_accuracy, "per_task": head.per_task, "mean_iou": head.mean_iou,
                "n": head.n}
        if "measured" in runs:
            m = runs["measured"]
            line["measured"] = {"macro_accuracy": m.macro_accuracy, "per_task": m.per_task, "resolved": m.resolved,
                                "n": m.n}
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
