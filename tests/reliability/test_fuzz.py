"""Property-based fuzzing of the protocol decoder and the ask validator (issue 7, part 2).

Three generators: raw frames (anything), structured headers (plausible JSON with hostile fields
and array tables whose byte counts may lie), and ``ask`` requests built from valid ones and then
mutated field by field. The property: every message is either accepted or refused with a
:class:`ProtocolError` whose code is stable and whose error event can be encoded and sent; never
another exception, never a slow message, never unbounded memory. Accepted rasters also go through
``prepare_array`` (what the model thread does next), which may only refuse with a RasterError.

A last test sends generated messages to a real worker process and checks that each gets exactly
one reply and that the worker still answers a valid request afterwards.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relharness import RawClient, WorkerProc, assert_served, needs_model

from qgis_plugin import protocol as P
from worker import validate as V
from worker.measure import Georef, RasterError
from worker.raster import prepare_array

LIMITS = P.Limits(max_message_bytes=1 << 20, max_header_bytes=64 << 10)
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
STATS: dict[str, Any] = {"messages": 0, "refused": {}, "accepted": 0, "validated": 0, "prepared": 0,
                         "slowest_s": 0.0}
SLOW_S = 2.0  # a single message taking longer than this counts as a hang

# --- strategies -----------------------------------------------------------------------------------
_text = st.text(max_size=12)
_weird_text = st.one_of(
    _text,
    st.sampled_from(["", " ", "\x00", "\ud800", "\udfff", "é", "水", "🌊", "x" * 5000, "../../etc/passwd", "nan"]),
)
_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    _weird_text,
)
json_value = st.recursive(
    _leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_text, kids, max_size=4), max_leaves=8
)
_dtype = st.one_of(st.sampled_from(list(P.DTYPES)), st.sampled_from(["O", ">f4", "V8", "", "f16", "U4"]), json_value)
_shape = st.one_of(
    st.lists(st.integers(0, 6), max_size=4),
    st.lists(st.one_of(st.integers(-3, 2**41), st.booleans(), st.floats(0, 9)), max_size=6),
    json_value,
)
_spec = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["a", "b", "image0"]), json_value),
                               "dtype": _dtype, "shape": _shape})


def _nbytes(spec: dict) -> int | None:
    dt, shape = spec.get("dtype"), spec.get("shape")
    if not isinstance(dt, str) or dt not in P.DTYPES or not isinstance(shape, list):
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 64 for s in shape):
        return None
    return int(np.prod(shape, dtype=np.int64)) * P.DTYPES[dt].itemsize


@st.composite
def raw_frames(draw: st.DrawFn) -> list[bytes]:
    """Anything at all: random byte frames, sometimes starting like JSON."""
    frames = draw(st.lists(st.binary(max_size=80), min_size=0, max_size=4))
    if frames and draw(st.booleans()):
        frames[0] = b'{"protocol":1,' + frames[0]
    return frames


@st.composite
def structured(draw: st.DrawFn) -> list[bytes]:
    """A JSON header with hostile values and an array table whose frames may not match it."""
    header: dict[str, Any] = {}
    for key, values in (
        ("protocol", st.one_of(st.just(1), st.just(1), json_value)),
        ("id", st.one_of(st.just("fz"), _weird_text, json_value)),
        ("op", st.one_of(st.sampled_from([o for o in P.OPS if o != "shutdown"]), _weird_text, json_value)),
    ):
        if draw(st.integers(0, 9)) > 0:
            header[key] = draw(values)
    specs = draw(st.lists(_spec, max_size=3))
    if draw(st.booleans()):
        header["arrays"] = specs
    elif draw(st.booleans()):
        header["arrays"] = draw(json_value)
    header.update(draw(st.dictionaries(st.sampled_from(["target", "active", "question", "pad", "images"]),
                                       json_value, max_size=2)))
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    raw = text.encode("utf-8", "surrogatepass")
    cut = draw(st.integers(0, 20))
    if cut == 1:
        raw = raw[: draw(st.integers(0, len(raw)))]  # truncated
    elif cut == 2:
        i = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]  # one byte flipped
    frames = [raw]
    for spec in specs if isinstance(header.get("arrays"), list) else []:
        n = _nbytes(spec)
        if n is not None and draw(st.integers(0, 3)) > 0:
            frames.append(bytes(draw(st.binary(min_size=n, max_size=n))) if n <= 64 else b"\x00" * n)
        else:
            frames.append(draw(st.binary(max_size=40)))
    if draw(st.integers(0, 9)) == 0:
        frames.append(draw(st.binary(max_size=8)))  # an undeclared frame
    return frames


def _filled(dt: str, shape: tuple[int, ...], fill: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf cast to integer dtypes on purpose
        return np.full(shape, fill).astype(P.DTYPES[dt])


_ARRAY = st.builds(
    _filled,
    st.sampled_from(list(P.DTYPES)),
    st.one_of(st.tuples(st.integers(1, 4), st.integers(4, 12), st.integers(4, 12)),
              st.tuples(st.integers(4, 12), st.integers(4, 12)),
              st.tuples(st.integers(0, 9), st.integers(0, 9)),
              st.tuples(st.integers(0, 14), st.integers(0, 9), st.integers(0, 9)),
              st.tuples(st.integers(1, 3)) | st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),
                                                         st.integers(1, 2))),
    st.one_of(st.integers(0, 255), st.sampled_from([np.nan, np.inf, -np.inf, 0.5, -7.0, 1e30])),
)
_GT = st.one_of(st.none(), st.just([500000.0, 10.0, 0.0, 5000000.0, 0.0, -10.0]),
                st.lists(st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers()), min_size=5,
                         max_size=7), json_value)
_CRS = st.one_of(st.none(), st.sampled_from(["EPSG:32633", "EPSG:4326", "EPSG:3857", "PROJCS[", "", "nonsense"]),
                 json_value)
_FIELDS: dict[str, st.SearchStrategy] = {
    "question": st.one_of(_weird_text, json_value, st.text(min_size=3990, max_size=4010)),
    "options": st.one_of(st.lists(_weird_text, max_size=10), json_value),
    "settings": st.one_of(
        st.dictionaries(st.sampled_from(["max_new_tokens", "max_seg", "temperature", "injection",
                                         "max_tokens_per_seg", "seed", "bogus"]),
                        st.one_of(st.integers(-5, 2**64), st.floats(), _weird_text, st.none()), max_size=4),
        json_value),
    "measure_grounding": json_value,
    "client_heartbeat_s": st.one_of(st.floats(), json_value),
    "images": json_value,
}
_IMAGE_FIELDS: dict[str, st.SearchStrategy] = {
    "role": st.one_of(st.sampled_from(["optical", "sar", "t0", "t1", "t01", "T0", ""]), json_value),
    "geotransform": _GT,
    "crs_wkt": _CRS,
    "nodata": st.one_of(st.none(), st.just("nan"), st.floats(), st.integers(-(2**70), 2**70), json_value),
    "band_names": st.one_of(st.none(), st.lists(_weird_text, max_size=15), json_value),
    "sensor": st.one_of(st.none(), st.sampled_from(["sentinel2", "landsat8", "rgb", "sar", "?"]), json_value),
    "array": st.one_of(st.sampled_from(["image0", "image1", "nope"]), json_value),
    "path": st.one_of(st.none(), st.sampled_from(["/etc/passwd", "../x.tif", "allowed/a.tif", "\x00"]),
                      json_value),
}


@st.composite
def ask_messages(draw: st.DrawFn) -> list[Any]:
    """A valid ask (1-3 rasters of any wire dtype and shape), then a few fields replaced."""
    n = draw(st.integers(1, 3))
    roles = ["optical"] if n == 1 else draw(st.sampled_from([["optical", "sar"], [f"t{i}" for i in range(n)]]))[:n]
    payloads = [P.RasterPayload(data=draw(_ARRAY), geotransform=[0.0, 10.0, 0.0, 0.0, 0.0, -10.0],
                                crs_wkt="EPSG:32633", role=role) for role in roles]
    header, arrays = P.build_ask("Where is the water?", payloads, request_id="fz")
    frames = P.encode_message(header, arrays)
    for key in draw(st.lists(st.sampled_from(sorted(_FIELDS)), max_size=1, unique=True)):
        header[key] = draw(_FIELDS[key])
    for key in draw(st.lists(st.sampled_from(sorted(_IMAGE_FIELDS)), max_size=2, unique=True)):
        images = header.get("images")
        entries = [im for im in images if isinstance(im, dict)] if isinstance(images, list) else []
        if entries:
            entries[draw(st.integers(0, len(entries) - 1))][key] = draw(_IMAGE_FIELDS[key])
    head = json.loads(frames[0])
    head.update({k: v for k, v in header.items() if k != "arrays"})
    frames[0] = json.dumps(head, ensure_ascii=True).encode()  # \\u escapes: lone surrogates survive
    return frames


messages = st.one_of(raw_frames(), structured(), ask_messages())
MUTANTS = 7  # byte-level mutants checked per generated message (cheap; hypothesis generation is not)


_POOL: list[Any] = [None, True, 0, -1, 1, 2, 7, 2**63, 1e308, -0.0, 0.5, "", "x", "t0", "sar", "nan", "\ud800",
                    "EPSG:4326", [], [0] * 6, [1, 2], {}, {"a": 1}, "A" * 4001, [[[[[]]]]]]


def _json_mutant(header: dict, rng: random.Random) -> dict:
    """Replace or delete one value somewhere in the header (the validator's view of a mutation)."""
    node: Any = header
    for _ in range(rng.randint(1, 4)):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = rng.choice(keys)
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < 0.6:
            node = child
            continue
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[key]
        else:
            node[key] = rng.choice(_POOL)
        break
    return header


def mutants(frames: list[Any], seed: int, n: int = MUTANTS) -> Iterator[list[bytes]]:
    """Mutation fuzzing on top of each generated message: half the mutants change one JSON value
    (reaching the validator), half flip, insert, delete and truncate bytes or drop, duplicate or
    swap frames (reaching the decoder)."""
    rng = random.Random(seed)
    base = [bytes(f) if not isinstance(f, np.ndarray) else f.tobytes() for f in frames]
    try:
        header = json.loads(base[0]) if base else None
    except ValueError:
        header = None
    for k in range(n):
        out = list(base)
        if isinstance(header, dict) and k % 2 == 0:
            mutated = _json_mutant(json.loads(base[0]), rng)
            yield [json.dumps(mutated).encode(), *out[1:]]
            continue
        for _ in range(rng.randint(1, 3)):
            if not out:
                out.append(rng.randbytes(rng.randint(0, 16)))
                continue
            i = rng.randrange(len(out))
            f = bytearray(out[i])
            op = rng.randrange(7)
            if op == 0 and f:
                f[rng.randrange(len(f))] = rng.randrange(256)
            elif op == 1:
                f[rng.randint(0, len(f)):0] = rng.choice([b"{", b"}", b"[", b"\\", b'"', b"\\ud800", b"\xff", b"1e999",
                                                          rng.randbytes(4)])
            elif op == 2 and f:
                j = rng.randrange(len(f))
                del f[j : j + rng.randint(1, 8)]
            elif op == 3:
                del f[rng.randint(0, len(f)) :]
            elif op == 4:
                out.pop(i)
                continue
            elif op == 5:
                out.insert(i, out[i])
                continue
            elif op == 6 and len(out) > 1:
                j = rng.randrange(len(out))
                out[i], out[j] = out[j], out[i]
                continue
            out[i] = bytes(f)
        yield out


# --- the property -----------------------------------------------------------------------------------
def _check_refusal(exc: P.ProtocolError) -> None:
    assert exc.code in P.ERROR_CODES, exc.code
    assert isinstance(exc.message, str) and exc.message.strip(), exc
    assert exc.request_id is None or isinstance(exc.request_id, str)
    frames = P.encode_message(P.error_event(exc.request_id, exc.code, exc.message[:500]))
    back, _ = P.decode_message(frames)  # the reply itself must be a valid message
    assert back["code"] == exc.code
    STATS["refused"][exc.code] = STATS["refused"].get(exc.code, 0) + 1


def _prepare_all(req: V.AskRequest) -> None:
    """What the model thread does next with accepted rasters: only RasterError may come out."""
    for im in req.images:
        if im.data is None:
            continue
        try:
            prepare_array(im.data, im.georef or Georef((1, 0, 0, 0, 1, 0), None), nodata=im.nodata,
                          band_names=im.band_names, role="sar" if im.role == "sar" else "optical",
                          sensor=im.sensor, max_side=64)
        except RasterError as exc:
            assert exc.code and exc.message


def check_message(frames: list[Any], allow: list[Path]) -> None:
    STATS["messages"] += 1
    t0 = time.perf_counter()
    try:
        header, arrays = P.decode_message(frames, LIMITS)
        rid = V.request_id(header)
        if header.get("op") == "ask":
            STATS["validated"] += 1
            req = V.validate_ask(header, arrays, LIMITS, allow)
            STATS["prepared"] += 1
            assert req.id == rid and req.images
            _prepare_all(req)
        else:
            P.encode_message(P.event("echo", rid), arrays)  # accepted arrays can be sent back as they are
        STATS["accepted"] += 1
    except P.ProtocolError as exc:
        _check_refusal(exc)
    elapsed = time.perf_counter() - t0
    STATS["slowest_s"] = max(STATS["slowest_s"], elapsed)
    assert elapsed < SLOW_S, f"one message took {elapsed:.2f} s"


@pytest.fixture(scope="module")
def allow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("allowed")
    (d / "allowed").mkdir()
    return d


@pytest.fixture(scope="module", autouse=True)
def memory_bound() -> Iterator[None]:
    """All fuzz tests together may not grow this process by more than 150 MiB (no unbounded memory)."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    yield
    grown = proc.memory_info().rss - before
    print(f"\nfuzz: {STATS['messages']} messages, {STATS['validated']} reached the ask validator, "
          f"{STATS['prepared']} reached prepare_array, {STATS['accepted']} accepted, refused by code "
          f"{dict(sorted(STATS['refused'].items()))}, slowest {STATS['slowest_s'] * 1000:.1f} ms, "
          f"RSS growth {grown / 2**20:.1f} MiB")
    assert grown < 150 << 20, f"RSS grew by {grown / 2**20:.0f} MiB while fuzzing"


@settings(FUZZ, max_examples=1500)
@given(frames=raw_frames())
def test_fuzz_raw_frames(frames: list[bytes], allow_dir: Path) -> None:
    check_message(frames, [allow_dir])


@settings(FUZZ, max_examples=500)
@given(frames=structured(), seed=st.integers(0, 2**32))
def test_fuzz_structured_headers(frames: list[bytes], seed: int, allow_dir: Path) -> None:
    check_message(frames, [allow_dir])
    for mutant in mutants(frames, seed):
        check_message(mutant, [allow_dir])


@settings(FUZZ, max_examples=800)
@given(frames=ask_messages(), seed=st.integers(0, 2**32))
def test_fuzz_ask_validator(frames: list[Any], seed: int, allow_dir: Path) -> None:
    check_message(frames, [allow_dir])
    for mutant in mutants(frames, seed):
        check_message(mutant, [allow_dir])


def test_fuzz_total_messages() -> None:
    """Runs after the three generators (file order): at least 10,000 messages were checked."""
    assert STATS["messages"] >= 10_000, STATS["messages"]


# --- over a real socket ---------------------------------------------------------------------------------
def _sendable(frames: list[Any]) -> bool:
    """Everything except messages that would stop the worker or queue real model work."""
    try:
        header, _ = P.decode_message(frames, LIMITS)
    except P.ProtocolError:
        return True
    return header.get("op") not in ("shutdown", "ask")


@needs_model
def test_fuzz_over_socket(worker: WorkerProc) -> None:
    """Generated messages sent to the worker process: exactly one reply each, then it still serves."""
    sent = [0]
    with worker.raw() as raw:

        @settings(FUZZ, max_examples=600)
        @given(frames=messages)
        def one(frames: list[Any]) -> None:
            if not _sendable(frames):
                return
            raw.send(frames)
            sent[0] += 1
            replies = _replies_before_sentinel(raw, sent[0])
            assert len(replies) == 1, replies

        one()
        assert worker.alive(), worker.stderr()
        assert_served(raw)
    assert sent[0] >= 200
    STATS["socket_messages"] = sent[0]
    print(f"\nfuzz over the socket: {sent[0]} messages, one reply each")


def _replies_before_sentinel(raw: RawClient, n: int) -> list[dict]:
    """Replies to the last message: a ``ping`` sent after it is answered after them (one IO thread,
    in order), so everything received before its ``pong`` belongs to the fuzz message."""
    sentinel = f"sentinel-{n}"
    raw.send_msg(P.request("ping", sentinel))
    out = []
    while True:
        msg = raw.recv(5.0)
        assert msg is not None, "the worker stopped answering"
        ev = msg[0]
        if ev.get("id") == sentinel and ev.get("event") == "pong":
            return out
        if ev.get("event") != "alive":
            out.append(ev)
