"""Validation of ``ask`` requests, before any job is queued or any raster memory is allocated.

The protocol decoder (qgis_plugin/protocol.py) has already checked frames, JSON and array byte
counts. Here the *meaning* is checked: question, options, roles, georeferencing, settings and
file paths. Every failure is a ProtocolError whose code and message go back to the client as an
``error`` event; nothing here raises anything else on hostile input.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.types import GenerationSettings
from qgis_plugin import protocol as P
from worker.measure import Georef, RasterError
from worker.windows import MAX_TILE, MIN_TILE, WINDOW_MODES, WindowSettings

_TIME_ROLE = re.compile(r"^t(0|[1-9][0-9]?)$")
_SETTINGS_KEYS = {"max_new_tokens", "max_seg", "temperature", "injection", "max_tokens_per_seg", "seed", "windows"}
_WINDOW_KEYS = {"mode", "tile", "overlap"}
MAX_NEW_TOKENS = 8192
MAX_CRS_CHARS = 64_000
MAX_BANDS = 64


@dataclass
class RasterRequest:
    """One raster of a validated request: in-memory ``data`` or a local ``path`` to read."""

    role: str
    data: np.ndarray | None = None
    path: Path | None = None
    georef: Georef | None = None  # None with ``path``: taken from the file
    nodata: float | None = None
    band_names: list[str] | None = None
    sensor: str | None = None


@dataclass
class AskRequest:
    id: str
    question: str
    images: list[RasterRequest]
    options: list[str] | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    measure_grounding: bool = False
    sieve: bool = True  # drop predicted specks (measure.sieve, on the model grid) before measuring
    client_heartbeat_s: float | None = None
    forced_prefix: str | None = None  # teacher-forced start of the reply (tests, demos)
    windows: WindowSettings = field(default_factory=WindowSettings)  # sliding-window mode (settings.windows)


def _err(code: str, message: str, rid: str | None) -> P.ProtocolError:
    return P.ProtocolError(code, message, rid)


def request_id(header: Mapping[str, Any]) -> str:
    """The request id (required by every op): a non-empty string of <= 128 chars."""
    rid = header.get("id")
    if "id" not in header:
        raise _err(P.MISSING_FIELD, "request has no 'id'", None)
    if not isinstance(rid, str) or not rid or len(rid) > 128:
        raise _err(P.BAD_FIELD, "'id' must be a non-empty string of <= 128 characters", None)
    return rid


def _text(value: Any, name: str, rid: str, max_chars: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _err(P.BAD_FIELD, f"'{name}' must be a string, not {type(value).__name__}", rid)
    if not allow_empty and not value.strip():
        raise _err(P.BAD_FIELD, f"'{name}' is empty", rid)
    if len(value) > max_chars:
        raise _err(P.BAD_FIELD, f"'{name}' has {len(value)} characters; the limit is {max_chars}", rid)
    if "\x00" in value:
        raise _err(P.BAD_FIELD, f"'{name}' contains a NUL character", rid)
    return value


def _number(value: Any, name: str, rid: str, lo: float, hi: float, integer: bool = False) -> float:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise _err(P.BAD_FIELD, f"'{name}' must be {kind}", rid)
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        raise _err(P.BAD_FIELD, f"'{name}' = {value} is out of range [{lo:g}, {hi:g}]", rid)
    return value


def _settings(raw: Any, rid: str) -> GenerationSettings:
    if raw is None:
        return GenerationSettings()
    if not isinstance(raw, dict):
        raise _err(P.BAD_FIELD, "'settings' must be an object", rid)
    unknown = set(raw) - _SETTINGS_KEYS
    if unknown:
        raise _err(P.BAD_FIELD, f"unknown settings: {', '.join(sorted(unknown))}", rid)
    s = GenerationSettings()
    if "max_new_tokens" in raw:
        s.max_new_tokens = int(_number(raw["max_new_tokens"], "settings.max_new_tokens", rid, 1, MAX_NEW_TOKENS, True))
    if "max_seg" in raw:
        s.max_seg = int(_number(raw["max_seg"], "settings.max_seg", rid, 0, 20, True))
    if "temperature" in raw:
        s.temperature = float(_number(raw["temperature"], "settings.temperature", rid, 0.0, 5.0))
    if "injection" in raw:
        if raw["injection"] not in P.INJECTIONS:
            raise _err(P.BAD_FIELD, f"'settings.injection' must be one of {', '.join(P.INJECTIONS)}", rid)
        s.injection = raw["injection"]
    if raw.get("max_tokens_per_seg") is not None:
        s.max_tokens_per_seg = int(_number(raw["max_tokens_per_seg"], "settings.max_tokens_per_seg", rid, 1, 4096, True))
    if "seed" in raw:
        s.seed = int(_number(raw["seed"], "settings.seed", rid, 0, 2**63 - 1, True))
    return s


def _windows(raw: Any, rid: str) -> WindowSettings:
    """``settings.windows``: {"mode": auto|on|off, "tile": px, "overlap": px}, every key optional."""
    if raw is None:
        return WindowSettings()
    if isinstance(raw, str):  # shorthand: "windows": "on"
        raw = {"mode": raw}
    if not isinstance(raw, dict):
        raise _err(P.BAD_FIELD, "'settings.windows' must be an object like {\"mode\": \"auto\"}", rid)
    unknown = set(raw) - _WINDOW_KEYS
    if unknown:
        raise _err(P.BAD_FIELD, f"unknown settings.windows keys: {', '.join(sorted(map(str, unknown)))}", rid)
    mode = raw.get("mode", "auto")
    if mode not in WINDOW_MODES:
        raise _err(P.BAD_FIELD, f"'settings.windows.mode' must be one of {', '.join(WINDOW_MODES)}", rid)
    tile = raw.get("tile")
    if tile is not None:
        tile = int(_number(tile, "settings.windows.tile", rid, MIN_TILE, MAX_TILE, True))
    overlap = raw.get("overlap")
    if overlap is not None:
        overlap = int(_number(overlap, "settings.windows.overlap", rid, 0, MAX_TILE - 1, True))
        if tile is not None and overlap >= tile:
            raise _err(P.BAD_FIELD, f"'settings.windows.overlap' ({overlap}) must be smaller than the tile ({tile})",
                       rid)
    return WindowSettings(mode, tile, overlap)


def _options(raw: Any, rid: str, limits: P.Limits) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _err(P.BAD_FIELD, "'options' must be a list of strings", rid)
    if not limits.min_options <= len(raw) <= limits.max_options:
        raise _err(
            P.BAD_FIELD, f"{len(raw)} options given; between {limits.min_options} and {limits.max_options} are allowed",
            rid,
        )
    return [_text(o, f"options[{i}]", rid, limits.max_option_chars) for i, o in enumerate(raw)]


def _check_roles(roles: Sequence[str], rid: str) -> None:
    timed = [r for r in roles if _TIME_ROLE.match(r)]
    if timed and len(timed) != len(roles):
        raise _err(P.BAD_FIELD, "time-series roles (t0, t1, ...) cannot be mixed with optical/sar", rid)
    if timed:
        if len(timed) < 2:
            raise _err(P.BAD_FIELD, "a time series needs at least two images (t0, t1)", rid)
        if list(roles) != [f"t{i}" for i in range(len(roles))]:
            raise _err(P.BAD_FIELD, f"a time series lists its images in order t0..t{len(roles) - 1}; got {list(roles)}", rid)
        return
    for r in roles:
        if r not in P.ROLES_FIXED:
            raise _err(P.BAD_FIELD, f"unknown role {r!r}: use optical, sar, or t0, t1, ...", rid)
    if roles.count("optical") > 1 or roles.count("sar") > 1:
        raise _err(P.BAD_FIELD, "at most one optical and one sar image (use t0, t1, ... for a series)", rid)


def _allowed(path: Path, allow: Sequence[Path]) -> bool:
    return any(path == a or a in path.parents for a in allow)


def _georef(entry: Mapping[str, Any], where: str, rid: str) -> Georef:
    gt = entry.get("geotransform")
    wkt = entry.get("crs_wkt")
    if wkt is not None:
        wkt = _text(wkt, f"{where}.crs_wkt", rid, MAX_CRS_CHARS)
    if gt is None:
        if wkt is not None:
            raise _err(P.BAD_FIELD, f"{where} has a CRS but no geotransform", rid)
        return Georef((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), None)  # plain pixel grid
    if not isinstance(gt, list) or len(gt) != 6:
        raise _err(P.BAD_FIELD, f"{where}.geotransform must be 6 numbers in GDAL order", rid)
    for i, v in enumerate(gt):
        _number(v, f"{where}.geotransform[{i}]", rid, -1e308, 1e308)
    try:
        return Georef.from_gdal([float(v) for v in gt], wkt)
    except RasterError as exc:
        raise _err(P.BAD_FIELD, f"{where}: {exc.message}", rid) from None


def _image(
    entry: Any, i: int, arrays: Mapping[str, np.ndarray], used: set[str], rid: str, allow_paths: Sequence[Path]
) -> RasterRequest:
    where = f"images[{i}]"
    if not isinstance(entry, dict):
        raise _err(P.BAD_FIELD, f"{where} must be an object", rid)
    role = entry.get("role", "optical")
    if not isinstance(role, str):
        raise _err(P.BAD_FIELD, f"{where}.role must be a string", rid)
    nodata = entry.get("nodata")
    if nodata == "nan":
        nodata = float("nan")
    elif nodata is not None:
        nodata = float(_number(nodata, f"{where}.nodata", rid, -1e308, 1e308))
    names = entry.get("band_names")
    if names is not None:
        if not isinstance(names, list) or len(names) > MAX_BANDS:
            raise _err(P.BAD_FIELD, f"{where}.band_names must be a list of <= {MAX_BANDS} strings", rid)
        names = [_text(n, f"{where}.band_names[{j}]", rid, 200, allow_empty=True) for j, n in enumerate(names)]
    sensor = entry.get("sensor")
    if sensor is not None:
        sensor = _text(sensor, f"{where}.sensor", rid, 100)
    has_array, has_path = entry.get("array") is not None, entry.get("path") is not None
    if has_array == has_path:
        raise _err(P.MISSING_FIELD, f"{where} needs exactly one of 'array' (a frame name) or 'path'", rid)
    if has_path:
        raw = _text(entry["path"], f"{where}.path", rid, 4096)
        path = Path(os.path.realpath(raw))
        if not allow_paths or not _allowed(path, allow_paths):
            raise _err(
                P.PATH_NOT_ALLOWED,
                f"{where}.path: this worker opens no file sent by a client unless it is under an --allow-path "
                "folder; send the pixels as an array instead",
                rid,
            )
        return RasterRequest(role, path=path, nodata=nodata, band_names=names, sensor=sensor)
    name = entry["array"]
    if not isinstance(name, str) or name not in arrays:
        raise _err(P.MISSING_FIELD, f"{where}.array names {name!r}, which is not among the message's arrays", rid)
    if name in used:
        raise _err(P.BAD_FIELD, f"array {name!r} is used by two images", rid)
    used.add(name)
    data = arrays[name]
    if data.ndim not in (2, 3):
        raise _err(P.BAD_ARRAY, f"{where}: raster array must be (bands, H, W) or (H, W); got shape {data.shape}", rid)
    if data.ndim == 3 and not 1 <= data.shape[0] <= MAX_BANDS:
        raise _err(P.BAD_ARRAY, f"{where}: {data.shape[0]} bands; between 1 and {MAX_BANDS} are allowed", rid)
    h, w = data.shape[-2:]
    if h == 0 or w == 0:
        raise P.ProtocolError(P.BAD_RASTER, f"{where}: the raster is empty ({h}x{w} pixels)", rid)
    if names is not None and len(names) != (data.shape[0] if data.ndim == 3 else 1):
        raise _err(P.BAD_FIELD, f"{where}: {len(names)} band names for {data.shape[0]} bands", rid)
    georef = _georef(entry, where, rid)
    return RasterRequest(role, data=data, georef=georef, nodata=nodata, band_names=names, sensor=sensor)


def validate_ask(
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    limits: P.Limits | None = None,
    allow_paths: Sequence[Path] = (),
) -> AskRequest:
    """An AskRequest, or ProtocolError naming the first problem found."""
    limits = limits or P.Limits()
    rid = request_id(header)
    if "question" not in header:
        raise _err(P.MISSING_FIELD, "ask has no 'question'", rid)
    question = _text(header["question"], "question", rid, limits.max_question_chars)
    options = _options(header.get("options"), rid, limits)
    images_raw = header.get("images")
    if images_raw is None:
        raise _err(P.MISSING_FIELD, "ask has no 'images'", rid)
    if not isinstance(images_raw, list) or not 1 <= len(images_raw) <= limits.max_images:
        raise _err(P.BAD_FIELD, f"'images' must be a list of 1..{limits.max_images} rasters", rid)
    allow = [Path(os.path.realpath(p)) for p in allow_paths]
    used: set[str] = set()
    images = [_image(e, i, arrays, used, rid, allow) for i, e in enumerate(images_raw)]
    unused = set(arrays) - used
    if unused:
        raise _err(P.BAD_FIELD, f"arrays not referenced by any image: {', '.join(sorted(unused))}", rid)
    _check_roles([im.role for im in images], rid)
    grounding = header.get("measure_grounding", False)
    if not isinstance(grounding, bool):
        raise _err(P.BAD_FIELD, "'measure_grounding' must be true or false", rid)
    sieve = header.get("sieve", True)
    if not isinstance(sieve, bool):
        raise _err(P.BAD_FIELD, "'sieve' must be true or false", rid)
    region_rules = header.get("region_rules", True)
    if not isinstance(region_rules, bool):
        raise _err(P.BAD_FIELD, "'region_rules' must be true or false", rid)
    settings = _settings(header.get("settings"), rid)
    settings.region_rules = region_rules
    hb = header.get("client_heartbeat_s")
    if hb is not None:
        hb = float(_number(hb, "client_heartbeat_s", rid, 0.05, 60.0))
    forced = header.get("forced_prefix")
    if forced is not None:
        forced = _text(forced, "forced_prefix", rid, limits.max_question_chars)
    return AskRequest(
        id=rid,
        forced_prefix=forced,
        question=question,
        images=images,
        options=options,
        settings=settings,
        windows=_windows(header["settings"].get("windows") if isinstance(header.get("settings"), dict) else None,
                         rid),
        measure_grounding=grounding,
        sieve=sieve,
        client_heartbeat_s=hb,
    )
