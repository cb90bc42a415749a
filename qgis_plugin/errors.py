"""One clear line for every failure a user can meet: no tracebacks in the dock or the message bar."""

from __future__ import annotations

import re

from . import protocol as P
from .client import WorkerError, WorkerUnavailable

_BY_CODE = {
    P.BUSY: "The worker is busy with other questions; try again in a moment.",
    P.CANCELLED: "Cancelled.",
    P.SHUTTING_DOWN: "The worker is shutting down; restart it and ask again.",
    P.TOO_LARGE: "The region is too large to send; pick a smaller region or lower 'largest image side'.",
}
_PREFIX = {
    P.BAD_RASTER: "This raster cannot be used: ",
    P.OOM: "The worker ran out of memory: ",
    P.MODEL_UNAVAILABLE: "The model is not available: ",
    P.BAD_FIELD: "The request was refused: ",
    P.MISSING_FIELD: "The request was refused: ",
    P.BAD_ARRAY: "The raster could not be sent: ",
    P.BAD_VERSION: "The worker speaks another protocol version (update the plugin or the worker): ",
    P.PATH_NOT_ALLOWED: "The worker refused a file path: ",
    P.INTERNAL: "The worker failed on this request (it keeps serving): ",
}
MAX_CHARS = 300
_REQUEST_ID = re.compile(r"\s*(?:during |for )?request [0-9a-f]{16,}")  # ids mean nothing to a user


def one_line(text: str, max_chars: int = MAX_CHARS) -> str:
    """Collapse whitespace and cut long text, so a message fits a status line."""
    text = " ".join(str(text).split())
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"


def describe(exc: BaseException) -> str:
    """A one-line, human message for an exception raised while talking to the worker or reading data."""
    if isinstance(exc, WorkerUnavailable):
        text = _REQUEST_ID.sub("", str(exc)).replace("(no message in", "(silent for")
        return one_line(text[:1].upper() + text[1:] + ". Start or restart the worker, then ask again.")
    if isinstance(exc, WorkerError):
        if exc.code in _BY_CODE:
            return _BY_CODE[exc.code]
        return one_line(_PREFIX.get(exc.code, "") + exc.message)
    if isinstance(exc, MemoryError):
        return "Not enough memory in QGIS to read this region; pick a smaller region."
    name = type(exc).__name__
    message = str(exc) or name
    if isinstance(exc, (ValueError, OSError)):
        return one_line(message[0].upper() + message[1:] if message else name)
    return one_line(f"{name}: {message}")
