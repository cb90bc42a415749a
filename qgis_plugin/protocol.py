"""TerraScope wire protocol, version 1 (see docs/PROTOCOL.md).

One module defines the format for both ends: it is imported by QGIS's Python (numpy 1.24,
pyzmq 24) and by the worker venv (numpy 2, pyzmq 27), so it depends on numpy and the standard
library only (pyzmq objects are duck-typed). No pickle: a message is a UTF-8 JSON header frame
followed by one raw little-endian C-contiguous frame per declared array.

Every check in :func:`decode_message` runs on frame *sizes* and the small header before any
array memory is touched, so a hostile message costs at most the bytes ZeroMQ already received.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"

# --- dtypes -----------------------------------------------------------------------------------
#: The only array dtypes accepted on the wire (always little-endian). Key = wire name.
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("|b1"),
    "u1": np.dtype("|u1"),
    "i1": np.dtype("|i1"),
    "u2": np.dtype("<u2"),
    "i2": np.dtype("<i2"),
    "u4": np.dtype("<u4"),
    "i4": np.dtype("<i4"),
    "u8": np.dtype("<u8"),
    "i8": np.dtype("<i8"),
    "f2": np.dtype("<f2"),
    "f4": np.dtype("<f4"),
    "f8": np.dtype("<f8"),
    "c8": np.dtype("<c8"),
    "c16": np.dtype("<c16"),
}
_WIRE_NAME = {dt: name for name, dt in DTYPES.items()}

# --- error codes (stable: clients may switch on them) -----------------------------------------
BAD_FRAME = "bad_frame"  # multipart structure wrong (no delimiter, frame count != declared arrays)
BAD_JSON = "bad_json"  # header not UTF-8 / not JSON / not an object / too deep
BAD_VERSION = "bad_version"  # protocol number is not PROTOCOL_VERSION
MISSING_FIELD = "missing_field"  # a required field is absent
BAD_FIELD = "bad_field"  # a field has the wrong type or an out-of-range value
BAD_ARRAY = "bad_array"  # dtype not allowed, bad shape, or shape x dtype != frame bytes
TOO_LARGE = "too_large"  # message, header or array over the configured limits
UNKNOWN_OP = "unknown_op"
BAD_RASTER = "bad_raster"  # the raster cannot be prepared (empty, all nodata, ...): see "reason"
PATH_NOT_ALLOWED = "path_not_allowed"  # a file path outside the worker's allow-list
BUSY = "busy"  # the bounded job queue is full: retry later
CANCELLED = "cancelled"
OOM = "oom"  # out of (GPU or host) memory while answering; memory was released
MODEL_UNAVAILABLE = "model_unavailable"  # the model failed to load (message says why)
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"  # a bug: the worker logged a traceback and keeps serving
ERROR_CODES = frozenset(
    {
        BAD_FRAME, BAD_JSON, BAD_VERSION, MISSING_FIELD, BAD_FIELD, BAD_ARRAY, TOO_LARGE, UNKNOWN_OP,
        BAD_RASTER, PATH_NOT_ALLOWED, BUSY, CANCELLED, OOM, MODEL_UNAVAILABLE, SHUTTING_DOWN, INTERNAL,
    }
)

# --- ops and events ---------------------------------------------------------------------------
OPS = ("ping", "info", "ask", "cancel", "shutdown", "echo")  # echo: arrays sent back (diagnostics, bench)
#: Worker -> client event names. ``alive`` is the per-job heartbeat (every ~1 s while queued/running).
EVENTS = ("pong", "info", "accepted", "alive", "token", "mask", "done", "error", "ack", "bye", "echo")
ROLES_FIXED = ("optical", "sar")
INJECTIONS = ("mask", "box", "random", "none")


@dataclass(frozen=True)
class Limits:
    """Size limits both ends enforce. The worker advertises its own in ``info``."""

    max_message_bytes: int = 1 << 30  # all frames of one message together
    max_header_bytes: int = 1 << 20  # the JSON header frame
    max_json_depth: int = 16
    max_arrays: int = 32
    max_ndim: int = 4
    max_question_chars: int = 4000
    min_options: int = 2
    max_options: int = 8  # the model labels options A-H (model/prompting.py OPTION_LETTERS)
    max_option_chars: int = 1000
    max_images: int = 16

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ProtocolError(Exception):
    """A message that breaks the protocol. ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


# --- encoding ---------------------------------------------------------------------------------
def new_id() -> str:
    return uuid.uuid4().hex


def wire_dtype(dtype: Any) -> str:
    """Wire name of a numpy dtype (byte order normalised), or ProtocolError(bad_array)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    name = _WIRE_NAME.get(dt) or _WIRE_NAME.get(dt.newbyteorder("<"))
    if name is None:
        raise ProtocolError(BAD_ARRAY, f"dtype {dt} is not allowed on the wire (allowed: {', '.join(DTYPES)})")
    return name


def _wire_array(arr: np.ndarray) -> np.ndarray:
    """Little-endian, C-contiguous view or copy (a copy only when the input is not already so)."""
    arr = np.asarray(arr)
    wire = DTYPES[wire_dtype(arr.dtype)]
    if arr.dtype != wire:
        arr = arr.astype(wire)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None and numpy scalars by Python ones, recursively."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    return value


def dumps(obj: Any) -> bytes:
    safe = json_safe(obj)
    try:
        return json.dumps(safe, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in some text: \u-escape everything instead
        return json.dumps(safe, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def encode_message(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list[Any]:
    """Frames for one message: JSON header, then each array's buffer (send with ``copy=False``).

    ``header`` gets ``protocol`` and the ``arrays`` table filled in; array frames are the arrays
    themselves (C-contiguous little-endian), so pyzmq sends them without copying.
    """
    head = dict(header)
    head.setdefault("protocol", PROTOCOL_VERSION)
    frames: list[Any] = [b""]
    table = []
    for name, arr in (arrays or {}).items():
        wire = _wire_array(arr)
        table.append({"name": str(name), "dtype": wire_dtype(wire.dtype), "shape": list(wire.shape)})
        frames.append(wire.reshape(-1) if wire.nbytes else b"")  # flat view: same bytes, no copy
    head["arrays"] = table
    frames[0] = dumps(head)
    return frames


def message_nbytes(frames: Sequence[Any]) -> int:
    return sum(_frame_len(f) for f in frames)


# --- decoding ---------------------------------------------------------------------------------
def _frame_len(frame: Any) -> int:
    if isinstance(frame, np.ndarray):
        return int(frame.nbytes)
    buf = getattr(frame, "buffer", None)  # zmq.Frame: size without copying
    if buf is not None:
        return len(buf)
    return memoryview(frame).nbytes


def _frame_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)
    return memoryview(buf if buf is not None else frame).cast("B")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, iteratively (no recursion on hostile input)."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            children = node.values() if isinstance(node, dict) else node
            stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def decode_header(raw: Any, limits: Limits = Limits()) -> dict[str, Any]:
    """The JSON header as a dict, checked for size, encoding, depth and protocol version."""
    size = _frame_len(raw)
    if size > limits.max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"header is {size} bytes; the limit is {limits.max_header_bytes}")
    try:
        text = bytes(_frame_buffer(raw)).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        header = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError(BAD_JSON, f"header JSON is nested deeper than {limits.max_json_depth}") from None
    except ValueError as exc:
        raise ProtocolError(BAD_JSON, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_JSON, f"header must be a JSON object, not {type(header).__name__}")
    if _depth(header, limits.max_json_depth) > limits.max_json_depth:
        raise ProtocolError(BAD_JSON, f"header JSON is nested deeper than {limits.max_json_depth}")
    rid = header.get("id")
    rid = rid if isinstance(rid, str) and len(rid) <= 128 else None
    if "\\ud" in text or "\\uD" in text:  # JSON escapes can smuggle in lone surrogates: refuse them
        try:
            json.dumps(header, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            try:
                if rid is not None:
                    rid.encode("utf-8")
            except UnicodeEncodeError:
                rid = None  # an id that is itself not valid text is not echoed back
            raise ProtocolError(
                BAD_JSON, "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800)", rid
            ) from None
    if "protocol" not in header:
        raise ProtocolError(MISSING_FIELD, "header has no 'protocol' field", rid)
    version = header["protocol"]
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(
            BAD_VERSION, f"protocol version {version!r} is not supported (this end speaks {PROTOCOL_VERSION})", rid
        )
    return header


def _array_table(header: dict[str, Any], n_frames: int, limits: Limits, rid: str | None) -> list[tuple]:
    table = header.get("arrays", [])
    if not isinstance(table, list):
        raise ProtocolError(BAD_FIELD, "'arrays' must be a list", rid)
    if len(table) > limits.max_arrays:
        raise ProtocolError(TOO_LARGE, f"{len(table)} arrays; the limit is {limits.max_arrays}", rid)
    if len(table) != n_frames:
        raise ProtocolError(
            BAD_FRAME, f"header declares {len(table)} array(s) but {n_frames} data frame(s) follow", rid
        )
    out = []
    seen = set()
    for i, spec in enumerate(table):
        if not isinstance(spec, dict):
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] must be an object", rid)
        name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}].name must be a non-empty string of <= 64 chars", rid)
        if name in seen:
            raise ProtocolError(BAD_ARRAY, f"array name {name!r} is declared twice", rid)
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(
                BAD_ARRAY, f"array {name!r}: dtype {dtype!r} is not allowed (allowed: {', '.join(DTYPES)})", rid
            )
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_ndim
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape)
        ):
            raise ProtocolError(
                BAD_ARRAY, f"array {name!r}: shape must be a list of <= {limits.max_ndim} non-negative ints", rid
            )
        out.append((name, DTYPES[dtype], tuple(shape)))
    return out


def decode_message(
    frames: Sequence[Any], limits: Limits = Limits()
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(header, arrays) from the frames after the routing envelope. Arrays are read-only zero-copy views.

    Raises ProtocolError with a stable code; the order of checks is: header (size-limited, so the
    error can name the request), total size, array table, byte counts, and only then are numpy
    views created.
    """
    if not frames:
        raise ProtocolError(BAD_FRAME, "empty message (no header frame)")
    header = decode_header(frames[0], limits)
    rid = header.get("id") if isinstance(header.get("id"), str) else None
    total = message_nbytes(frames)
    if total > limits.max_message_bytes:
        raise ProtocolError(
            TOO_LARGE, f"message is {total} bytes; the limit is {limits.max_message_bytes}", rid
        )
    table = _array_table(header, len(frames) - 1, limits, rid)
    for (name, dtype, shape), frame in zip(table, frames[1:]):
        expected = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
        got = _frame_len(frame)
        if expected != got:
            raise ProtocolError(
                BAD_ARRAY,
                f"array {name!r}: shape {list(shape)} x {_WIRE_NAME[dtype]} needs {expected} bytes, "
                f"the frame has {got}",
                rid,
            )
    arrays = {}
    for (name, dtype, shape), frame in zip(table, frames[1:]):
        if _frame_len(frame) == 0:
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.frombuffer(_frame_buffer(frame), dtype=dtype).reshape(shape)
    return header, arrays


# --- helpers for building messages ------------------------------------------------------------
def request(op: str, request_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"protocol": PROTOCOL_VERSION, "id": request_id or new_id(), "op": op, **fields}


def event(name: str, request_id: str | None, **fields: Any) -> dict[str, Any]:
    return {"protocol": PROTOCOL_VERSION, "id": request_id, "event": name, **fields}


def error_event(request_id: str | None, code: str, message: str, **fields: Any) -> dict[str, Any]:
    return event("error", request_id, code=code, message=message, **fields)


@dataclass
class RasterPayload:
    """One raster of an ``ask`` request.

    ``data`` is (bands, H, W) or (H, W), any allowed dtype. ``geotransform`` is in GDAL order:
    (x0, pixel_width, row_rotation, y0, column_rotation, pixel_height), i.e.
    x = x0 + col*pw + row*rr,  y = y0 + col*cr + row*ph.  ``None`` means a pixel grid without a
    map position (then ``crs_wkt`` must be None too).
    """

    data: np.ndarray
    geotransform: Sequence[float] | None = None
    crs_wkt: str | None = None
    nodata: float | None = None
    band_names: list[str] | None = None
    role: str = "optical"
    sensor: str | None = None

    def entry(self, array_name: str) -> dict[str, Any]:
        nodata = self.nodata
        if nodata is not None and isinstance(nodata, float) and math.isnan(nodata):
            nodata = "nan"
        return {
            "array": array_name,
            "role": self.role,
            "geotransform": None if self.geotransform is None else [float(v) for v in self.geotransform],
            "crs_wkt": self.crs_wkt,
            "nodata": nodata,
            "band_names": self.band_names,
            "sensor": self.sensor,
        }


def build_ask(
    question: str,
    rasters: Sequence[RasterPayload],
    options: Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    measure_grounding: bool = False,
    request_id: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header and arrays of an ``ask`` request (the client adds ``client_heartbeat_s``)."""
    arrays: dict[str, np.ndarray] = {}
    images = []
    for i, raster in enumerate(rasters):
        name = f"image{i}"
        arrays[name] = raster.data
        images.append(raster.entry(name))
    header = request("ask", request_id, question=question, images=images, measure_grounding=bool(measure_grounding))
    if options:
        header["options"] = list(options)
    if settings:
        header["settings"] = dict(settings)
    return header, arrays
