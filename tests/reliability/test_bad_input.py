"""The bad-input corpus against a real worker process (issue 7, part 1).

Each hostile or awkward input gets an ``error`` event with a stable code and a human message (or,
for awkward but legitimate rasters, an answer), the worker keeps serving, and a valid ``ask`` sent
right after on the same socket is answered with ``done``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from relharness import (
    RawClient,
    WorkerProc,
    ask,
    assert_error,
    assert_served,
    needs_model,
    scene,
    utm_wkt,
)

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerError

pytestmark = needs_model


def _hdr(**fields: Any) -> bytes:
    return json.dumps({"protocol": 1, "id": "bad-1", "op": "ping", **fields}).encode()


def _ask_frames(mutate: Callable[[dict, dict], None] | None = None, data: np.ndarray | None = None) -> list[Any]:
    header, arrays = ask(data, rid="bad-1")
    if mutate is not None:
        mutate(header, arrays)
    return P.encode_message(header, arrays)


def _escaped(frames: list[Any], **fields: Any) -> list[Any]:
    """Frames whose header carries ``fields`` as \\u escapes (lone surrogates cannot be UTF-8 encoded)."""
    header = json.loads(bytes(frames[0]))
    header.update(fields)
    return [json.dumps(header, ensure_ascii=True).encode(), *frames[1:]]


def _set(**fields: Any) -> Callable[[dict, dict], None]:
    def mutate(header: dict, arrays: dict) -> None:
        header.update(fields)

    return mutate


def _image(**fields: Any) -> Callable[[dict, dict], None]:
    def mutate(header: dict, arrays: dict) -> None:
        header["images"][0].update(fields)

    return mutate


def _settings(**fields: Any) -> Callable[[dict, dict], None]:
    def mutate(header: dict, arrays: dict) -> None:
        header["settings"] = {**header.get("settings", {}), **fields}

    return mutate


def _replace_array(arr: np.ndarray) -> Callable[[dict, dict], None]:
    def mutate(header: dict, arrays: dict) -> None:
        arrays["image0"] = arr

    return mutate


def _array_frames(spec: dict, payload: bytes) -> list[Any]:
    return [_hdr(op="echo", arrays=[spec]), payload]


def _nested(depth: int) -> bytes:
    return b'{"protocol":1,"id":"bad-1","op":"ping","x":' + b"[" * depth + b"]" * depth + b"}"


# (case name, frames after the delimiter, expected code, whether the error can name the request id)
PROTOCOL_CASES: list[tuple[str, list[Any], str, bool]] = [
    # malformed frames
    ("only the delimiter", [], P.BAD_FRAME, False),
    ("binary garbage header", [b"\x93NUMPY\x01\x00\xff\xfe garbage"], P.BAD_JSON, False),
    ("header not UTF-8", [b'{"protocol":1,"id":"bad-1","op":"ping","x":"\xff\xfe"}'], P.BAD_JSON, False),
    ("header is a JSON list", [b"[1, 2, 3]"], P.BAD_JSON, False),
    ("header is a JSON string", [b'"ping"'], P.BAD_JSON, False),
    ("NaN literal in JSON", [b'{"protocol":1,"id":"bad-1","op":"ping","x":NaN}'], P.BAD_JSON, False),
    ("truncated JSON", [b'{"protocol":1,"id":"bad-1","op":"pi'], P.BAD_JSON, False),
    ("5000-digit integer", [b'{"protocol":1,"id":"bad-1","x":' + b"7" * 5000 + b"}"], P.BAD_JSON, False),
    ("lone surrogate in the id", [b'{"protocol":1,"id":"\\ud800","op":"nope"}'], P.BAD_JSON, False),
    ("lone surrogate in a question", _escaped(_ask_frames(), question="water \udcff?"), P.BAD_JSON, True),
    ("array declared, frame missing", [_hdr(op="echo", arrays=[{"name": "a", "dtype": "u1", "shape": [4]}])],
     P.BAD_FRAME, True),
    ("undeclared extra frame", [_hdr(), b"\x00" * 16], P.BAD_FRAME, True),
    # protocol version and required fields
    ("protocol version 2", [_hdr(protocol=2)], P.BAD_VERSION, True),
    ("protocol version as a string", [_hdr(protocol="1")], P.BAD_VERSION, True),
    ("protocol version true", [_hdr(protocol=True)], P.BAD_VERSION, True),
    ("protocol version 0", [_hdr(protocol=0)], P.BAD_VERSION, True),
    ("no protocol field", [json.dumps({"id": "bad-1", "op": "ping"}).encode()], P.MISSING_FIELD, True),
    ("no id", [json.dumps({"protocol": 1, "op": "ping"}).encode()], P.MISSING_FIELD, False),
    ("id is a number", [json.dumps({"protocol": 1, "id": 7, "op": "ping"}).encode()], P.BAD_FIELD, False),
    ("id of 10,000 characters", [json.dumps({"protocol": 1, "id": "x" * 10_000, "op": "ping"}).encode()],
     P.BAD_FIELD, False),
    ("no op", [json.dumps({"protocol": 1, "id": "bad-1"}).encode()], P.MISSING_FIELD, True),
    # deeply nested and huge JSON
    ("JSON nested 17 deep", [_nested(16)], P.BAD_JSON, False),
    ("JSON nested 100,000 deep", [_nested(100_000)], P.BAD_JSON, False),
    ("header of 2 MiB", [_hdr(pad="x" * (2 << 20))], P.TOO_LARGE, False),
    ("200,000-element list", [_hdr(pad=[0] * 200_000)], None, True),  # fits the limits: served (pong)
    # arrays whose declared shape/dtype does not match their bytes
    ("shape x dtype > bytes", _array_frames({"name": "a", "dtype": "f4", "shape": [4, 4]}, b"\x00" * 60),
     P.BAD_ARRAY, True),
    ("shape x dtype < bytes", _array_frames({"name": "a", "dtype": "u2", "shape": [3]}, b"\x00" * 7),
     P.BAD_ARRAY, True),
    ("dtype not on the whitelist", _array_frames({"name": "a", "dtype": "O", "shape": [1]}, b"\x00" * 8),
     P.BAD_ARRAY, True),
    ("big-endian dtype string", _array_frames({"name": "a", "dtype": ">f4", "shape": [1]}, b"\x00" * 4),
     P.BAD_ARRAY, True),
    ("negative dimension", _array_frames({"name": "a", "dtype": "u1", "shape": [-4]}, b"\x00" * 4),
     P.BAD_ARRAY, True),
    ("boolean dimension", _array_frames({"name": "a", "dtype": "u1", "shape": [True]}, b"\x00"), P.BAD_ARRAY, True),
    ("5 dimensions", _array_frames({"name": "a", "dtype": "u1", "shape": [1, 1, 1, 1, 1]}, b"\x00"),
     P.BAD_ARRAY, True),
    ("declared 2^78 bytes", _array_frames({"name": "a", "dtype": "u1", "shape": [2**39, 2**39]}, b"\x00" * 16),
     P.BAD_ARRAY, True),
    ("33 arrays", [_hdr(op="echo", arrays=[{"name": f"a{i}", "dtype": "u1", "shape": [1]} for i in range(33)])]
     + [b"\x00"] * 33, P.TOO_LARGE, True),
    ("array name declared twice", [_hdr(op="echo", arrays=[{"name": "a", "dtype": "u1", "shape": [1]}] * 2),
                                   b"\x00", b"\x00"], P.BAD_ARRAY, True),
    ("arrays is an object", [_hdr(arrays={"a": 1})], P.BAD_FIELD, True),
    # unknown ops
    ("unknown op", [_hdr(op="format_disk")], P.UNKNOWN_OP, True),
    ("op is a number", [_hdr(op=42)], P.UNKNOWN_OP, True),
    ("op of 100,000 characters", [_hdr(op="x" * 100_000)], P.UNKNOWN_OP, True),
    ("cancel without a target", [_hdr(op="cancel")], P.MISSING_FIELD, True),
]

ASK_CASES: list[tuple[str, list[Any], str]] = [
    # questions
    ("empty question", _ask_frames(_set(question="")), P.BAD_FIELD),
    ("blank question", _ask_frames(_set(question=" \n\t ")), P.BAD_FIELD),
    ("20,000-character question", _ask_frames(_set(question="Where is the water? " * 1000)), P.BAD_FIELD),
    ("question with a NUL", _ask_frames(_set(question="water\x00?")), P.BAD_FIELD),
    ("question is a list", _ask_frames(_set(question=["water"])), P.BAD_FIELD),
    ("no question", _ask_frames(lambda h, a: h.pop("question")), P.MISSING_FIELD),
    ("no images", _ask_frames(lambda h, a: (h.pop("images"), a.clear())), P.MISSING_FIELD),
    # options out of range
    ("one option", _ask_frames(_set(options=["A. water"])), P.BAD_FIELD),
    ("nine options", _ask_frames(_set(options=[f"option {c}" for c in "ABCDEFGHI"])), P.BAD_FIELD),
    ("empty option", _ask_frames(_set(options=["A. water", ""])), P.BAD_FIELD),
    ("options not a list", _ask_frames(_set(options="A. water")), P.BAD_FIELD),
    ("max_new_tokens 0", _ask_frames(_settings(max_new_tokens=0)), P.BAD_FIELD),
    ("max_new_tokens 10^9", _ask_frames(_settings(max_new_tokens=10**9)), P.BAD_FIELD),
    ("max_new_tokens 1.5", _ask_frames(_settings(max_new_tokens=1.5)), P.BAD_FIELD),
    ("max_new_tokens as text", _ask_frames(_settings(max_new_tokens="8")), P.BAD_FIELD),
    ("temperature -1", _ask_frames(_settings(temperature=-1)), P.BAD_FIELD),
    ("temperature 1e300", _ask_frames(_settings(temperature=1e300)), P.BAD_FIELD),
    ("max_seg 21", _ask_frames(_settings(max_seg=21)), P.BAD_FIELD),
    ("unknown injection", _ask_frames(_settings(injection="everything")), P.BAD_FIELD),
    ("unknown setting", _ask_frames(_settings(rm_rf=True)), P.BAD_FIELD),
    ("settings not an object", _ask_frames(_set(settings=[1, 2])), P.BAD_FIELD),
    ("measure_grounding as text", _ask_frames(_set(measure_grounding="yes")), P.BAD_FIELD),
    ("client heartbeat 0 s", _ask_frames(_set(client_heartbeat_s=0)), P.BAD_FIELD),
    # rasters and georeferencing
    ("0x0 raster", _ask_frames(_replace_array(np.zeros((3, 0, 0), np.uint8))), P.BAD_RASTER),
    ("0xN raster", _ask_frames(_replace_array(np.zeros((0, 64), np.uint8))), P.BAD_RASTER),
    ("1-D raster", _ask_frames(_replace_array(np.zeros(64, np.uint8))), P.BAD_ARRAY),
    ("65 bands", _ask_frames(_replace_array(np.zeros((65, 8, 8), np.uint8))), P.BAD_ARRAY),
    ("unknown role", _ask_frames(_image(role="infrared")), P.BAD_FIELD),
    ("time series of one", _ask_frames(_image(role="t0")), P.BAD_FIELD),
    ("CRS without a geotransform", _ask_frames(_image(geotransform=None)), P.BAD_FIELD),
    ("geotransform of 5 numbers", _ask_frames(_image(geotransform=[0, 1, 0, 0, 0])), P.BAD_FIELD),
    ("degenerate geotransform", _ask_frames(_image(geotransform=[0, 0, 0, 0, 0, 0])), P.BAD_FIELD),
    ("geotransform with text", _ask_frames(_image(geotransform=[0, "1", 0, 0, 0, -1])), P.BAD_FIELD),
    ("unparseable CRS", _ask_frames(_image(crs_wkt="PROJCS[nonsense")), P.BAD_FIELD),
    ("3 band names for 3 bands... given 2", _ask_frames(_image(band_names=["B4", "B3"])), P.BAD_FIELD),
    ("nodata as text", _ask_frames(_image(nodata="zero")), P.BAD_FIELD),
    ("array name not in message", _ask_frames(_image(array="image9")), P.MISSING_FIELD),
    ("both array and path", _ask_frames(_image(path="/tmp/x.tif")), P.MISSING_FIELD),
    ("unreferenced array", _ask_frames(lambda h, a: a.update(extra=np.zeros(4, np.uint8))), P.BAD_FIELD),
    ("remote path /etc/passwd", _ask_frames(lambda h, a: (h["images"][0].update(array=None, path="/etc/passwd"),
                                                            a.clear())), P.PATH_NOT_ALLOWED),
]


def _run_case(raw: RawClient, frames: list[Any], code: str | None, with_id: bool) -> None:
    raw.send(frames)
    ev = raw.reply("bad-1" if with_id else None, skip=("alive",)) if code is None or with_id else _any(raw)
    if code is None:
        assert ev["event"] == "pong", ev
    else:
        assert_error(ev, code)
    assert_served(raw)  # also fails if the bad message got a second reply


def _any(raw: RawClient) -> dict:
    msg = raw.recv(5.0)
    assert msg is not None, "no reply to a malformed message"
    return msg[0]


@pytest.mark.parametrize(("name", "frames", "code", "with_id"), PROTOCOL_CASES, ids=[c[0] for c in PROTOCOL_CASES])
def test_protocol_case(raw: RawClient, name: str, frames: list[Any], code: str, with_id: bool) -> None:
    _run_case(raw, frames, code, with_id)


@pytest.mark.parametrize(("name", "frames", "code"), ASK_CASES, ids=[c[0] for c in ASK_CASES])
def test_ask_validation_case(raw: RawClient, name: str, frames: list[Any], code: str) -> None:
    _run_case(raw, frames, code, True)


def test_header_without_delimiter(worker: WorkerProc) -> None:
    """A peer that skips the empty delimiter frame gets ``bad_frame``, not silence or a crash."""
    with worker.raw() as raw:
        raw.sock.send_multipart([b"garbage without a delimiter", b"more"])
        assert_error(_any(raw), P.BAD_FRAME)
        assert_served(raw)


# --- rasters the model thread prepares ---------------------------------------------------------------
def _f32(fill: float, h: int = 32, w: int = 32) -> np.ndarray:
    return np.full((3, h, w), fill, np.float32)


def _partial_nan() -> np.ndarray:
    a = scene().astype(np.float32)
    a[:, :10] = np.nan
    a[:, 10:14] = np.inf
    a[:, 14:16] = -np.inf
    return a


S2_13 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]
ROTATED_GT = [500000.0, 8.66, -5.0, 5000000.0, -5.0, -8.66]  # 30 degrees, 10 m pixels

RASTER_ERRORS: list[tuple[str, dict, str]] = [
    ("all NaN", {"data": _f32(np.nan)}, "all_nodata"),
    ("all +inf", {"data": _f32(np.inf)}, "all_nodata"),
    ("NaN and -inf only", {"data": np.stack([_f32(np.nan)[0], _f32(-np.inf)[0], _f32(np.nan)[0]])}, "all_nodata"),
    ("all nodata", {"data": np.full((3, 32, 32), 7, np.uint16), "nodata": 7}, "all_nodata"),
    ("all-zero alpha", {"data": np.concatenate([scene(32, 32), np.zeros((1, 32, 32), np.uint8)]),
                        "band_names": ["red", "green", "blue", "alpha"]}, "all_nodata"),
    ("1xN raster", {"data": np.full((3, 1, 500), 100, np.uint8)}, "raster_too_small"),
    ("Nx1 raster", {"data": np.full((1, 500, 1), 100, np.uint8)}, "raster_too_small"),
    ("3x3 raster", {"data": np.full((3, 3, 3), 100, np.uint8)}, "raster_too_small"),
]

RASTERS_SERVED: list[tuple[str, dict]] = [
    ("partial NaN and inf", {"data": _partial_nan()}),
    ("no CRS (pixel grid)", {"data": scene(), "gt": None, "crs": None}),
    ("rotated geotransform", {"data": scene(), "gt": ROTATED_GT}),
    ("EPSG:4326 grid", {"data": scene(), "gt": [10.0, 1e-4, 0.0, 45.0, 0.0, -1e-4], "crs": "EPSG:4326"}),
    ("16-bit 4-band", {"data": (scene(bands=4).astype(np.uint16) * 40), "band_names": ["B2", "B3", "B4", "B8"]}),
    ("float32 reflectance", {"data": scene().astype(np.float32) / 255.0}),
    ("float64", {"data": scene().astype(np.float64) * 1e6}),
    ("float16", {"data": scene().astype(np.float16)}),
    ("int8 signed", {"data": (scene().astype(np.int16) - 128).astype(np.int8)}),
    ("bool mask as image", {"data": scene(bands=1) > 100}),
    ("single band grey", {"data": scene(bands=1)}),
    ("constant image", {"data": np.full((3, 32, 32), 42, np.uint8)}),
    ("13-band Sentinel-2", {"data": (scene(bands=13).astype(np.uint16) * 30), "band_names": S2_13}),
    ("13 unnamed bands", {"data": (scene(bands=13).astype(np.uint16) * 30)}),
    ("complex64 SAR VV/VH", {"data": (scene(bands=2).astype(np.float32) * np.exp(1j)).astype(np.complex64),
                             "role": "sar", "band_names": ["VV", "VH"]}),
    ("complex128 as optical", {"data": scene(bands=1).astype(np.complex128)}),
    ("float SAR in dB", {"data": -(scene(bands=2).astype(np.float32) / 10.0), "role": "sar"}),
    ("16-bit SAR amplitude", {"data": scene(bands=2).astype(np.uint16) * 100, "role": "sar"}),
    ("4-char-wide strip", {"data": scene(4, 400)}),
    ("4,000-character question", {"data": scene(), "question": "Is there water here? " * 190 + "x" * 10}),
    ("non-ASCII question", {"data": scene(), "question": "¿Dónde está el agua? 水はどこ? 🌊"}),
    ("eight options", {"data": scene(), "options": [f"option {c}" for c in "ABCDEFGH"]}),
]


def _payload_ask(spec: dict, rid: str) -> tuple[dict, dict]:
    crs = spec.get("crs", "utm")
    gt = spec.get("gt", [500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0])
    payload = P.RasterPayload(data=spec["data"], geotransform=gt, crs_wkt=utm_wkt() if crs == "utm" else crs,
                              nodata=spec.get("nodata"), band_names=spec.get("band_names"),
                              role=spec.get("role", "optical"))
    return P.build_ask(spec.get("question", "Where is the bright square?"), [payload], spec.get("options"),
                       {"max_new_tokens": 4}, request_id=rid)


@pytest.mark.parametrize(("name", "spec", "reason"), RASTER_ERRORS, ids=[c[0] for c in RASTER_ERRORS])
def test_raster_error_case(raw: RawClient, name: str, spec: dict, reason: str) -> None:
    header, arrays = _payload_ask(spec, "bad-1")
    raw.send_msg(header, arrays)
    events = raw.events("bad-1")
    assert [e["event"] for e, _ in events] == ["accepted", "error"], events
    err = events[-1][0]
    assert_error(err, P.BAD_RASTER)
    assert err["reason"] == reason, err
    assert_served(raw)


@pytest.mark.parametrize(("name", "spec"), RASTERS_SERVED, ids=[c[0] for c in RASTERS_SERVED])
def test_awkward_raster_is_served(raw: RawClient, name: str, spec: dict) -> None:
    header, arrays = _payload_ask(spec, "odd-1")
    raw.send_msg(header, arrays)
    events = raw.events("odd-1")
    names = [e["event"] for e, _ in events]
    assert names[0] == "accepted" and names[-1] == "done", events[-1][0]
    done = events[-1][0]
    assert isinstance(done["text"], str) and done["text"], done
    if spec.get("options"):
        assert done["choice"] is None or done["choice"] in "ABCDEFGH"
    # a mask on a grid without a CRS is measured in pixels and says why there are no hectares
    for ev, arrs in events:
        if ev["event"] == "mask":
            assert arrs["mask"].shape == spec["data"].shape[-2:]
            if spec.get("crs", "utm") is None:
                assert ev["measurements"].get("area_ha") is None and "CRS" in ev["measurements"]["note"]


# --- message size limit ------------------------------------------------------------------------------
def test_over_size_limit_across_frames(raw: RawClient) -> None:
    """Frames that are each under the limit but together over it (16 MiB here) are refused as ``too_large``."""
    chunk = np.zeros(6 << 20, np.uint8)
    header = {"protocol": 1, "id": "bad-1", "op": "echo"}
    raw.send_msg(header, {"a": chunk, "b": chunk, "c": chunk})
    ev = raw.reply("bad-1")  # the (size-limited) header is read first, so the error names the request
    assert_error(ev, P.TOO_LARGE)
    assert "limit" in ev["message"]
    assert_served(raw)


def test_over_size_limit_single_frame_is_never_allocated(worker: WorkerProc) -> None:
    """One 200 MiB frame against a 16 MiB limit: libzmq checks the frame's declared size and drops the
    connection before allocating it, so the worker's peak RSS does not move and it keeps serving."""
    before = worker.peak_rss()
    big = np.zeros(200 << 20, np.uint8)
    with worker.raw() as raw:
        raw.send_msg({"protocol": 1, "id": "bad-1", "op": "echo"}, {"a": big})
        assert raw.sock.poll(1500) == 0, "an over-limit frame should get no reply (its bytes are never read)"
    del big
    assert worker.peak_rss() - before < 64 << 20, "the worker allocated the over-limit frame"
    with worker.raw() as raw:
        assert_served(raw)


def test_client_refuses_to_send_over_the_workers_limit(worker: WorkerProc) -> None:
    """The client learns the limit from ``info`` and refuses locally with the same stable code."""
    with worker.client() as c:
        assert c.info()["limits"]["max_message_bytes"] == 16 << 20
        header, arrays = ask(np.zeros((3, 2600, 2600), np.uint8))
        with pytest.raises(WorkerError) as exc:
            c.ask(header, arrays)
        assert exc.value.code == P.TOO_LARGE
        header, arrays = ask(max_new_tokens=2)
        assert c.ask(header, arrays)["event"] == "done"
