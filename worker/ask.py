"""``terrascope ask``: one question about one or more rasters, streamed, with result files.

With ``--endpoint`` the CLI reads the rasters itself (decimated reads) and sends arrays to that
worker. Without it, a worker runs in this process on a private ipc endpoint - the same service
code path - and the CLI hands it the file paths (only those folders are allow-listed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError
from worker.cli import EXIT_USAGE, CliError, _client, model_loader, private_endpoint, resolve_model

#: Worker error codes caused by the input (exit 2 like other usage errors), not by the worker.
INPUT_ERRORS = {P.BAD_RASTER, P.BAD_FIELD, P.MISSING_FIELD, P.BAD_ARRAY, P.TOO_LARGE, P.PATH_NOT_ALLOWED}


def _roles(args: argparse.Namespace) -> list[tuple[Path, str]]:
    paths = [Path(p) for p in args.images]
    if args.sar and len(paths) > 1:
        raise CliError("--sar pairs with one optical IMAGE; several IMAGEs form a time series")
    items = [(p, f"t{i}" if len(paths) > 1 else "optical") for i, p in enumerate(paths)]
    if args.sar:
        items.append((Path(args.sar), "sar"))
    for p, _ in items:
        if not p.is_file():
            raise CliError(f"{p}: no such file")
    return items


def _windows(args: argparse.Namespace) -> dict | None:
    """``settings.windows`` from the flags, or None (the worker's default: auto)."""
    if args.windows is None and args.window_size is None and args.window_overlap is None:
        return None
    out: dict[str, Any] = {"mode": args.windows or "auto"}
    if args.window_size is not None:
        out["tile"] = args.window_size
    if args.window_overlap is not None:
        out["overlap"] = args.window_overlap
    return out


def _full_grid(items: list[tuple[Path, str]], args: argparse.Namespace, client: WorkerClient) -> bool:
    """Whether to send rasters on their own full grid (windowed mode) rather than decimated to --max-side.

    ``on``: always. ``auto``: when the largest raster exceeds --max-side and the worker's window threshold
    (from ``info``), i.e. exactly when the worker will answer it in windows.
    """
    mode = (_windows(args) or {}).get("mode", "auto")
    if mode == "off":
        return False
    if mode == "on":
        return True
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        longest = 0
        for path, _ in items:
            with rasterio.open(path) as ds:
                longest = max(longest, ds.width, ds.height)
    except RasterioIOError as exc:
        raise CliError(f"cannot open raster: {exc}") from None
    if longest <= args.max_side:
        return False
    threshold = (client.info().get("limits") or {}).get("window_threshold")
    return isinstance(threshold, int) and longest > threshold


def _remote_payloads(items: list[tuple[Path, str]], max_side: int | None) -> list[P.RasterPayload]:
    """Rasters read here and sent as arrays: decimated to ``max_side``, or on their full grid with None."""
    from worker.measure import RasterError
    from worker.raster import read_raster

    out = []
    for path, role in items:
        try:
            data, georef, nodata, names = read_raster(str(path), max_side=max_side or 1 << 30)
        except RasterError as exc:
            raise CliError(f"{path}: {exc.message}") from None
        out.append(P.RasterPayload(data=data, geotransform=list(georef.to_gdal()), crs_wkt=georef.crs_wkt,
                                   nodata=nodata, band_names=names, role=role))
    return out


class _Printer:
    """Streams tokens and mask lines to a terminal stream; collects mask events for the files."""

    def __init__(self, stream: Any | None):
        self.stream = stream
        self.masks: list[tuple[dict, np.ndarray]] = []

    def __call__(self, ev: dict, arrays: dict) -> None:
        name = ev.get("event")
        if name == "progress" and self.stream is not None:
            self._progress(ev)
        elif name == "token" and self.stream is not None:
            self.stream.write(ev.get("text", "").replace("<REGION>", ""))  # injected region tokens: noise here
            self.stream.flush()
        elif name == "mask":
            self.masks.append((ev, arrays["mask"]))
            if self.stream is not None:
                m = ev.get("measurements") or {}
                self.stream.write(f" «mask {ev['step'] + 1}: {ev.get('label') or '?'} — {_fmt(m)}» ")
                self.stream.flush()


    def _progress(self, ev: dict) -> None:
        """Sliding-window mode: a header before each window's reasoning, a line when stitching starts."""
        if ev.get("stage") == "window" and ev.get("state") in ("started", "skipped"):
            w = ev.get("window") or {}
            where = (f"rows {w.get('row_off')}-{w.get('row_off', 0) + w.get('height', 0) - 1}, "
                     f"cols {w.get('col_off')}-{w.get('col_off', 0) + w.get('width', 0) - 1}")
            tail = f" skipped: {ev.get('reason')}" if ev.get("state") == "skipped" else ""
            self.stream.write(f"\n[window {ev.get('index', 0) + 1}/{ev.get('count')}: {where}]{tail}\n")
        elif ev.get("stage") == "stitch":
            self.stream.write(f"\n[stitching {ev.get('steps', 0)} mask step(s) over the whole raster]\n")
        self.stream.flush()


def _fmt(m: dict) -> str:
    if m.get("area_ha") is not None:
        return f"{m['area_ha']:.2f} ha, {m.get('coverage_pct', 0):.1f}% of valid area, {m.get('count', 0)} objects"
    if "area_px" in m:
        return f"{m['area_px']} px, {m.get('coverage_pct', 0):.1f}%, {m.get('count', 0)} objects (no CRS)"
    return m.get("note", "no measurement")


def _write(out: str, question: str, done: dict, masks: list[tuple[dict, np.ndarray]]) -> dict:
    from worker.measure import Georef
    from worker.output import write_results

    steps = []
    for ev, mask in masks:
        grid = ev["grid"]
        georef = Georef.from_gdal(grid["geotransform"], grid.get("crs_wkt"))
        steps.append((mask, georef, ev.get("label") or "", float(ev.get("score") or 0.0), int(ev.get("image", 0)),
                      ev.get("measurements")))
    return write_results(out, question, done, steps)


def _text_arg(name: str, value: str) -> str:
    """Bytes that are not UTF-8 reach Python as lone surrogates; say so here, before any request is built."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise CliError(f"the {name} is not valid Unicode text (check the terminal's encoding)", EXIT_USAGE) from None
    return value


def run_ask(args: argparse.Namespace) -> int:
    args.question = _text_arg("question", args.question)
    args.option = [_text_arg("option", o) for o in args.option or []]
    items = _roles(args)
    settings: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    windows = _windows(args)
    if windows is not None:
        settings["windows"] = windows
    service, tmp = None, None
    if args.endpoint:
        client = _client(args)
        full = _full_grid(items, args, client)
        header, arrays = P.build_ask(args.question, _remote_payloads(items, None if full else args.max_side),
                                     args.option or None, settings, measure_grounding=args.ground)
        if args.forced_prefix:
            header["forced_prefix"] = args.forced_prefix
    else:
        from worker.service import ServiceConfig, WorkerService

        model = resolve_model(args.model)
        endpoint, tmp = private_endpoint()
        folders = sorted({str(p.resolve().parent) for p, _ in items})
        config = ServiceConfig(endpoint=endpoint, allow_paths=[Path(f) for f in folders], max_side=args.max_side,
                               model_label=model, max_queue=1)
        service = WorkerService(config, model_loader(model, args.device, args.dtype))
        endpoint = service.start()
        images = [{"path": str(p.resolve()), "role": role} for p, role in items]
        header = P.request("ask", question=args.question, images=images, settings=settings,
                           measure_grounding=bool(args.ground))
        if args.option:
            header["options"] = list(args.option)
        if args.forced_prefix:
            header["forced_prefix"] = args.forced_prefix
        arrays = {}
        client = WorkerClient(endpoint, timeout_s=max(args.timeout, 5.0))
    stream = None if args.json else sys.stdout
    if args.json and sys.stderr.isatty():
        stream = sys.stderr
    printer = _Printer(stream)
    try:
        with client:
            try:
                done = client.ask(header, arrays, on_event=printer)
            except WorkerError as exc:
                if exc.code in INPUT_ERRORS:
                    raise CliError(f"{exc.message} [{exc.code}]", EXIT_USAGE) from None
                raise
    finally:
        if service is not None:
            service.stop()
            service.wait(15)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    files = _write(args.out, args.question, done, printer.masks) if args.out else None
    _report(args, done, printer.masks, files)
    return 0


def _report(args: argparse.Namespace, done: dict, masks: list[tuple[dict, np.ndarray]], files: dict | None) -> None:
    rows = []
    for i, (ev, _) in enumerate(masks):
        m = ev.get("measurements") or {}
        rows.append({
            "step": ev["step"], "label": ev.get("label"), "image": ev.get("image"),
            "area_ha": m.get("area_ha"), "coverage_pct": m.get("coverage_pct"), "count": m.get("count"),
            "score": ev.get("score"), "region_rule": ev.get("region_rule"),
            "geotiff": files["geotiffs"][i] if files else None,
            "layer": files["layers"][i] if files else None,
        })
    if args.json:
        obj = {
            "question": args.question, "answer": done.get("answer"), "choice": done.get("choice"),
            "reasoning": done.get("reasoning"), "text": done.get("text"), "masks": rows,
            "measurements": done.get("measurements"), "measured_choice": done.get("measured_choice"),
            "checks": done.get("checks") or [],
            "timings_ms": done.get("timings_ms"), "model": done.get("model"),
            "gpkg": files["gpkg"] if files else None,
            # sliding-window mode only (null otherwise): each window's own answer, and how it was tiled
            "windows": done.get("windows"), "windowed": done.get("windowed"),
        }
        print(json.dumps(P.json_safe(obj), ensure_ascii=False))
        return
    out = sys.stdout
    out.write("\n\n")
    out.write(f"Answer: {done.get('answer')}" + (f"  (option {done['choice']})" if done.get("choice") else "") + "\n")
    for w in done.get("windows") or []:
        if w.get("state") == "answered":
            out.write(f"  window {w['index'] + 1}: {w.get('answer') or '(no answer text)'}"
                      + (f"  (option {w['choice']})" if w.get("choice") else "") + "\n")
    for (ev, _), r in zip(masks, rows):
        rule = f" ({r['region_rule']})" if r["region_rule"] else ""  # model/regions.py shaped the mask
        out.write(f"  mask {r['step'] + 1} [{r['label']}]{rule}: {_fmt(ev.get('measurements') or {})}\n")
    measured = done.get("measured_choice")
    if measured:  # the option the masks themselves support (worker/resolve.py)
        out.write(f"  measured: option {measured['choice']} ({measured['quantity']} {measured['value_text']}): "
                  f"{measured['message']}\n")
    for check in done.get("checks") or []:
        out.write(f"  check: {check['message']}\n")
    if files:
        out.write(f"Results: {files['gpkg']} ({len(files['layers'])} layer(s)); masks: "
                  f"{', '.join(files['geotiffs']) or 'none'}\n")
    total = (done.get("timings_ms") or {}).get("total")
    if total is not None:
        out.write(f"({total / 1000:.1f} s)\n")
    out.flush()
