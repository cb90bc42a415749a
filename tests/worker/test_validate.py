"""Request validation: what an ``ask`` must contain, and the code each mistake gets."""

from __future__ import annotations

import numpy as np
import pytest

from qgis_plugin import protocol as P
from worker.validate import validate_ask

UTM = "EPSG:32633"
GT = [500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0]


def _ask(**over):
    data = np.zeros((3, 8, 8), "u1")
    header, arrays = P.build_ask("What share is water?", [P.RasterPayload(data, GT, UTM)])
    header.update(over)
    return header, arrays


def _code(header, arrays, **kw) -> str:
    with pytest.raises(P.ProtocolError) as e:
        validate_ask(header, arrays, **kw)
    assert e.value.message
    return e.value.code


def test_valid_request() -> None:
    header, arrays = _ask(options=["A. 10%", "B. 50%"], settings={"max_new_tokens": 16, "injection": "box"})
    req = validate_ask(header, arrays)
    assert req.question == "What share is water?"
    assert req.options == ["A. 10%", "B. 50%"]
    assert req.settings.max_new_tokens == 16 and req.settings.injection == "box"
    im = req.images[0]
    assert im.role == "optical" and im.data.shape == (3, 8, 8)
    assert im.georef.to_gdal() == tuple(GT) and im.georef.has_crs


def test_missing_and_bad_fields() -> None:
    header, arrays = _ask()
    for field in ("question", "images", "id"):
        h = dict(header)
        del h[field]
        assert _code(h, arrays) == P.MISSING_FIELD
    assert _code(*_ask(question="")) == P.BAD_FIELD
    assert _code(*_ask(question="   ")) == P.BAD_FIELD
    assert _code(*_ask(question="x" * 20_000)) == P.BAD_FIELD
    assert _code(*_ask(question=5)) == P.BAD_FIELD
    assert _code(*_ask(id="")) == P.BAD_FIELD
    assert _code(*_ask(options=["A. only one"])) == P.BAD_FIELD
    assert _code(*_ask(options=[f"{i}" for i in range(11)])) == P.BAD_FIELD
    assert _code(*_ask(options="A, B")) == P.BAD_FIELD
    assert _code(*_ask(settings={"max_new_tokens": 0})) == P.BAD_FIELD
    assert _code(*_ask(settings={"max_new_tokens": True})) == P.BAD_FIELD
    assert _code(*_ask(settings={"temperature": -1})) == P.BAD_FIELD
    assert _code(*_ask(settings={"beam": 4})) == P.BAD_FIELD
    assert _code(*_ask(settings={"injection": "paint"})) == P.BAD_FIELD
    assert _code(*_ask(measure_grounding="yes")) == P.BAD_FIELD
    assert _code(*_ask(sieve="no")) == P.BAD_FIELD
    assert _code(*_ask(region_rules=1)) == P.BAD_FIELD
    assert _code(*_ask(client_heartbeat_s=0)) == P.BAD_FIELD


def test_georeferencing_checks() -> None:
    header, arrays = _ask()
    img = header["images"][0]
    for bad in ([1, 2, 3], "0,1,0,0,0,-1", [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, "x"]):
        h = dict(header, images=[dict(img, geotransform=bad)])
        assert _code(h, arrays) == P.BAD_FIELD, bad
    h = dict(header, images=[dict(img, crs_wkt="NOT A CRS")])
    assert _code(h, arrays) == P.BAD_FIELD
    h = dict(header, images=[dict(img, geotransform=None)])  # CRS without a transform
    assert _code(h, arrays) == P.BAD_FIELD
    # no georeferencing at all: a pixel grid, measured in pixels later
    req = validate_ask(dict(header, images=[dict(img, geotransform=None, crs_wkt=None)]), arrays)
    assert not req.images[0].georef.has_crs
    # rotated transforms are fine
    req = validate_ask(dict(header, images=[dict(img, geotransform=[0, 7.07, 7.07, 0, 7.07, -7.07])]), arrays)
    assert req.images[0].georef.transform.b == pytest.approx(7.07)


def test_arrays_and_rasters() -> None:
    header, _ = _ask()
    assert _code(header, {"image0": np.zeros((3, 0, 8), "u1")}) == P.BAD_RASTER
    assert _code(header, {"image0": np.zeros((8,), "u1")}) == P.BAD_ARRAY
    assert _code(header, {"image0": np.zeros((100, 8, 8), "u1")}) == P.BAD_ARRAY
    assert _code(header, {}) == P.MISSING_FIELD
    assert _code(header, {"image0": np.zeros((3, 8, 8), "u1"), "extra": np.zeros(1)}) == P.BAD_FIELD
    img = header["images"][0]
    assert _code(dict(header, images=[dict(img, band_names=["a"])]), {"image0": np.zeros((3, 8, 8))}) == P.BAD_FIELD
    # a 13-band float raster with NaN nodata passes validation (preparation decides the bands)
    h = dict(header, images=[dict(img, nodata="nan", band_names=[f"B{i}" for i in range(13)])])
    req = validate_ask(h, {"image0": np.zeros((13, 8, 8), "f4")})
    assert np.isnan(req.images[0].nodata)


def test_roles() -> None:
    data = np.zeros((3, 8, 8), "u1")

    def roles(*names):
        return P.build_ask("q?", [P.RasterPayload(data, role=r) for r in names])

    assert [i.role for i in validate_ask(*roles("optical", "sar")).images] == ["optical", "sar"]
    assert len(validate_ask(*roles("t0", "t1", "t2")).images) == 3
    for bad in (("t1", "t0"), ("t0",), ("t0", "optical"), ("optical", "optical"), ("infrared",), ("t0", "t2")):
        assert _code(*roles(*bad)) == P.BAD_FIELD, bad


def test_paths_need_an_allow_list(tmp_path) -> None:
    header, _ = _ask()
    f = tmp_path / "a.tif"
    f.write_bytes(b"")
    h = dict(header, images=[{"path": str(f), "role": "optical"}])
    assert _code(h, {}) == P.PATH_NOT_ALLOWED
    assert _code(h, {}, allow_paths=[tmp_path / "other"]) == P.PATH_NOT_ALLOWED
    # a path that climbs out of the allowed folder is refused after resolving it
    sneaky = dict(header, images=[{"path": str(tmp_path / "sub" / ".." / ".." / "etc" / "passwd")}])
    assert _code(sneaky, {}, allow_paths=[tmp_path]) == P.PATH_NOT_ALLOWED
    req = validate_ask(h, {}, allow_paths=[tmp_path])
    assert req.images[0].path == f.resolve()
    both = dict(header, images=[{"path": str(f), "array": "image0"}])
    assert _code(both, {"image0": np.zeros((3, 8, 8), "u1")}, allow_paths=[tmp_path]) == P.MISSING_FIELD


def test_phrase_rules_are_on_unless_a_request_turns_them_off() -> None:
    assert validate_ask(*_ask()).settings.region_rules is True
    assert validate_ask(*_ask(region_rules=False)).settings.region_rules is False
