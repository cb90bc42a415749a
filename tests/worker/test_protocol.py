"""The wire format on its own: encode/decode round trips, every rejection code, both numpy stacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qgis_plugin import protocol as P

REPO = Path(__file__).resolve().parents[2]
QGIS_PY = REPO / ".venv-qgis" / "bin" / "python"


def _bytes_frames(frames: list) -> list[bytes]:
    return [f if isinstance(f, bytes) else memoryview(f).cast("B").tobytes() for f in frames]


@pytest.mark.parametrize("name", sorted(P.DTYPES))
def test_round_trip_every_allowed_dtype(name: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.random((2, 3, 5)) * 100).astype(P.DTYPES[name])
    header, arrays = P.decode_message(_bytes_frames(P.encode_message({"id": "a", "op": "x"}, {"v": arr})))
    assert header["arrays"] == [{"name": "v", "dtype": name, "shape": [2, 3, 5]}]
    np.testing.assert_array_equal(arrays["v"], arr)
    assert not arrays["v"].flags.writeable  # zero-copy views onto the frame


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    arr = np.arange(24, dtype=">i4").reshape(4, 6)[:, ::2]
    _, arrays = P.decode_message(_bytes_frames(P.encode_message({"id": "a"}, {"v": arr})))
    assert arrays["v"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(arrays["v"], arr)


def test_empty_and_scalar_arrays() -> None:
    frames = P.encode_message({"id": "a"}, {"e": np.zeros((0, 4), "u1"), "s": np.array(3.5, "f8")})
    _, arrays = P.decode_message(_bytes_frames(frames))
    assert arrays["e"].shape == (0, 4)
    assert float(arrays["s"]) == 3.5


def test_disallowed_dtypes_are_refused_on_encode() -> None:
    for bad in (np.array(["x"]), np.array([object()]), np.zeros(2, "datetime64[s]")):
        with pytest.raises(P.ProtocolError) as e:
            P.encode_message({"id": "a"}, {"v": bad})
        assert e.value.code == P.BAD_ARRAY


def _head(**fields) -> bytes:
    return json.dumps({"protocol": 1, "id": "r1", "op": "ping", **fields}).encode()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([], P.BAD_FRAME),
        ([b"\xff\xfe\x00"], P.BAD_JSON),
        ([b"not json"], P.BAD_JSON),
        ([b"[1, 2]"], P.BAD_JSON),
        ([b'{"protocol": 1, "x": NaN}'], P.BAD_JSON),
        ([b"[" * 50_000 + b"]" * 50_000], P.BAD_JSON),
        ([json.dumps({"protocol": 1, "a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}).encode()], P.BAD_JSON),
        ([b'{"id": "x"}'], P.MISSING_FIELD),
        ([_head(protocol=2)], P.BAD_VERSION),
        ([_head(protocol="1")], P.BAD_VERSION),
        ([_head(protocol=True)], P.BAD_VERSION),
        ([_head(arrays=[{"name": "a", "dtype": "u1", "shape": [2]}])], P.BAD_FRAME),
        ([_head(), b"\x00"], P.BAD_FRAME),
        ([_head(arrays=[{"name": "a", "dtype": "u1", "shape": [3]}]), b"\x00\x00"], P.BAD_ARRAY),
        ([_head(arrays=[{"name": "a", "dtype": "f4", "shape": [2]}]), b"\x00" * 4], P.BAD_ARRAY),
        ([_head(arrays=[{"name": "a", "dtype": "O", "shape": [1]}]), b"\x00"], P.BAD_ARRAY),
        ([_head(arrays=[{"name": "a", "dtype": "u1", "shape": [-1]}]), b"\x00"], P.BAD_ARRAY),
        ([_head(arrays=[{"name": "a", "dtype": "u1", "shape": [1, 1, 1, 1, 1]}]), b"\x00"], P.BAD_ARRAY),
        ([_head(arrays=[{"name": "a", "dtype": "u1", "shape": [1]}] * 2), b"\x00", b"\x00"], P.BAD_ARRAY),
        ([_head(arrays="x")], P.BAD_FIELD),
        ([_head(pad="x" * (2 << 20))], P.TOO_LARGE),
    ],
)
def test_malformed_messages_get_stable_codes(frames: list[bytes], code: str) -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode_message(frames)
    assert e.value.code == code
    assert e.value.message  # a human sentence, not just the code


def test_total_size_is_checked_before_any_array_is_touched() -> None:
    limits = P.Limits(max_message_bytes=1000)
    frames = [_head(arrays=[{"name": "a", "dtype": "u1", "shape": [2000]}]), b"\x00" * 2000]
    with pytest.raises(P.ProtocolError) as e:
        P.decode_message(frames, limits)
    assert e.value.code == P.TOO_LARGE


def test_errors_carry_the_request_id_when_known() -> None:
    with pytest.raises(P.ProtocolError) as e:
        P.decode_message([_head(protocol=9)])
    assert e.value.request_id == "r1"


def test_json_safe_replaces_non_finite_and_numpy_scalars() -> None:
    out = P.json_safe({"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(2), np.inf], "d": np.bool_(True)})
    assert out == {"a": None, "b": 1.5, "c": [2, None], "d": True}
    json.dumps(out, allow_nan=False)


def test_build_ask_uses_gdal_order_and_names_arrays() -> None:
    data = np.zeros((3, 4, 5), "u2")
    header, arrays = P.build_ask(
        "how much water?",
        [P.RasterPayload(data, (500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0), "EPSG:32633", float("nan"), None, "t0"),
         P.RasterPayload(data, role="t1")],
        options=["A. yes", "B. no"],
        settings={"max_new_tokens": 8},
    )
    assert header["op"] == "ask" and header["protocol"] == P.PROTOCOL_VERSION
    assert header["images"][0]["geotransform"] == [500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0]
    assert header["images"][0]["nodata"] == "nan"
    assert [i["array"] for i in header["images"]] == list(arrays) == ["image0", "image1"]


QGIS_SCRIPT = r"""
import json, sys
import numpy as np, zmq
from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable
arr = np.arange(60, dtype="<f4").reshape(3, 4, 5)
frames = P.encode_message({"id": "q"}, {"a": arr})
frames = [f if isinstance(f, bytes) else memoryview(f).tobytes() for f in frames]
h, a = P.decode_message(frames)
assert (a["a"] == arr).all()
# frames written here are decoded by the worker-side numpy 2 in the parent test
sys.stdout.write(json.dumps({"numpy": np.__version__, "pyzmq": zmq.__version__,
                             "frames": [f.hex() for f in frames]}))
"""


@pytest.mark.skipif(not QGIS_PY.exists(), reason="QGIS venv (.venv-qgis) not created: run `make deps`")
def test_same_module_works_under_qgis_python_numpy_1_24() -> None:
    proc = subprocess.run([str(QGIS_PY), "-c", QGIS_SCRIPT], check=False, capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["numpy"].startswith("1.") and np.__version__.startswith("2.")
    _, arrays = P.decode_message([bytes.fromhex(f) for f in out["frames"]])
    np.testing.assert_array_equal(arrays["a"], np.arange(60, dtype="f4").reshape(3, 4, 5))


def test_protocol_module_is_torch_and_qgis_free() -> None:
    code = "import sys, qgis_plugin.protocol, qgis_plugin.client; " \
           "bad = [m for m in ('torch', 'qgis', 'rasterio', 'worker', 'model') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
