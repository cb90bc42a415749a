"""Sliding-window mode: windows planned, answered one by one, masks stitched and measured once.

A real worker process on the tiny checkpoint (model view 32 px), windows of 48 px with 16 px overlap on
80x80 rasters (2x2 windows), real sockets, a generated GeoTIFF. The random-weight fixture never emits
[SEG] on its own, so every window's reply is teacher-forced to start with one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from scipy import ndimage
from workerlib import GT10, REPO, UTM33, start_worker

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerError
from worker.measure import Georef, measure_mask
from worker.raster import sliding_windows
from worker.validate import validate_ask
from worker.windows import (
    WindowDefaults,
    WindowSettings,
    WindowStep,
    group_steps,
    plan_windows,
    stitch_step,
    windowed_answer,
)

SEG = "<think>The block [SEG] is"
SIDE, TILE, OVERLAP = 80, 48, 16  # -> windows at rows/cols 0 and 32: 2x2 windows, overlap rows/cols 32..47


def scene(side: int = SIDE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(20, 90, size=(3, side, side), dtype=np.uint8)
    img[:, 20:60, 10:30] = 220  # a block across the row seam
    return img


@pytest.fixture(scope="module")
def geotiff_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rasters")
    with rasterio.open(folder / "scene.tif", "w", driver="GTiff", width=SIDE, height=SIDE, count=3, dtype="uint8",
                       crs=UTM33, transform=Affine.from_gdal(*GT10)) as ds:
        ds.write(scene())
    return folder


@pytest.fixture(scope="module")
def wworker(tmp_path_factory, geotiff_dir) -> Iterator:
    wp = start_worker(tmp_path_factory.mktemp("wworker"), "--max-side", "32", "--window-threshold", "64",
                      "--window-size", str(TILE), "--window-overlap", str(OVERLAP), "--allow-path", str(geotiff_dir))
    yield wp
    wp.stop()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[dict, dict]] = []

    def __call__(self, ev: dict, arrays: dict) -> None:
        self.events.append((ev, {k: np.array(v) for k, v in arrays.items()}))

    def of(self, name: str) -> list[tuple[dict, dict]]:
        return [(e, a) for e, a in self.events if e["event"] == name]


def _array_ask(img: np.ndarray, windows: dict | str | None = None, tokens: int = 10,
               prefix: str | None = SEG) -> tuple[dict, dict]:
    settings: dict = {"max_new_tokens": tokens}
    if windows is not None:
        settings["windows"] = windows
    header, arrays = P.build_ask("Where is the block?", [P.RasterPayload(img, GT10, UTM33)], settings=settings)
    if prefix:
        header["forced_prefix"] = prefix
    return header, arrays


def _labels8(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


# ------------------------------------------------------------------------------------------- stitching
def _part(window: int, win, truth: np.ndarray, step: int = 0, label: str = "block") -> WindowStep:
    m = truth[win.slices]
    return WindowStep(window, step, 0, label, 0.9, np.packbits(m), m.shape, int(m.sum()), _labels8(m))


def test_objects_cut_by_window_seams_are_counted_once() -> None:
    """Each window sees its part of the truth; stitched, the parts are the truth again: 2 objects, not 6."""
    windows = sliding_windows((SIDE, SIDE), TILE, OVERLAP)
    assert len(windows) == 4
    truth = np.zeros((SIDE, SIDE), bool)
    truth[20:60, 10:30] = True  # crosses the row seam: windows 0 and 2 each see a part
    truth[36:44, 36:44] = True  # inside the overlap of all four windows: each sees all of it
    parts = [_part(i, w, truth) for i, w in enumerate(windows) if truth[w.slices].any()]
    assert sum(p.count for p in parts) == 6 and sum(p.area_px for p in parts) > truth.sum()  # naive sums
    (group,) = group_steps(parts)
    stitched = stitch_step((SIDE, SIDE), windows, group)
    assert np.array_equal(stitched, truth)
    m = measure_mask(stitched, Georef.from_gdal(GT10, UTM33))
    assert m.count == 2 and m.area_px == int(truth.sum())
    assert m.area_ha == pytest.approx(truth.sum() * 0.01, rel=2e-3)


def test_step_rule_groups_by_step_index_and_image_and_stitch_keeps_seams() -> None:
    windows = sliding_windows((SIDE, SIDE), TILE, OVERLAP)
    truth = np.zeros((SIDE, SIDE), bool)
    truth[:, 40:50] = True  # a road along the column seam
    parts = [_part(i, w, truth, step=0, label="the road" if i else "a road") for i, w in enumerate(windows)]
    parts += [_part(3, windows[3], truth, step=1, label="the field")]  # only window 3 has a second [SEG]
    steps = group_steps(parts)
    assert [(g.step, g.window_step, [p.window for p in g.parts]) for g in steps] == [(0, 0, [0, 1, 2, 3]),
                                                                                        (1, 1, [3])]
    assert steps[0].label == "the road" and steps[0].labels == ["a road", "the road"]
    assert np.array_equal(stitch_step((SIDE, SIDE), windows, steps[0]), truth)
    only3 = stitch_step((SIDE, SIDE), windows, steps[1])  # nothing outside window 3
    assert only3[32:, 32:].sum() == truth[32:, 32:].sum() and only3.sum() == truth[32:, 32:].sum()


def test_plan_follows_mode_threshold_and_limits() -> None:
    d = WindowDefaults(threshold=64, tile=48, overlap=16, max_windows=10)

    def plan(side: int, ws: WindowSettings, h: int | None = None):
        header, arrays = _array_ask(np.zeros((3, h or side, side), np.uint8) + 50)
        req = validate_ask(header, arrays)
        req.windows = ws
        return plan_windows(req, d)

    assert plan(64, WindowSettings("auto")) is None  # not above the threshold
    assert len(plan(65, WindowSettings("auto")).windows) == 4
    assert plan(200, WindowSettings("off")) is None
    assert plan(40, WindowSettings("on")) is None  # fits one tile: that view is the whole raster
    p = plan(60, WindowSettings("on", tile=32))
    assert (p.tile, p.overlap, len(p.windows)) == (32, 4, 4)  # a tile without an overlap gets 1/8 of it
    with pytest.raises(P.ProtocolError, match="at most 10") as e:
        plan(200, WindowSettings("on"))
    assert e.value.code == P.BAD_FIELD
    with pytest.raises(P.ProtocolError, match="smaller than the tile"):
        plan(200, WindowSettings("on", overlap=48))


def test_windowed_answer_text_says_what_was_done() -> None:
    d = WindowDefaults(threshold=64, tile=48, overlap=16)
    header, arrays = _array_ask(scene())
    req = validate_ask(header, arrays)
    plan = plan_windows(req, d)
    meas = [{"step": 0, "label": "water", "windows": [0, 1], "units": "m", "area_ha": 12.345, "area_m2": 123450.0,
             "coverage_pct": 4.21, "count": 3}]
    text = windowed_answer(plan, meas, 4, 0, options=True)
    assert "4 overlapping windows of up to 48 px (16 px overlap)" in text and "80x80" in text
    assert "12.35 ha, 4.2% of valid area, 3 objects" in text and "No option is chosen" in text
    assert "nothing was measured" in windowed_answer(plan, [], 3, 1, options=False)


# --------------------------------------------------------------------------------------------- worker
def test_windowed_ask_of_a_geotiff_streams_windows_then_stitched_masks(wworker, geotiff_dir) -> None:
    header = P.request("ask", question="Is there a block?", options=["A. yes", "B. no"],
                       images=[{"path": str(geotiff_dir / "scene.tif"), "role": "optical"}],
                       settings={"max_new_tokens": 10, "windows": {"mode": "on"}}, measure_grounding=True)
    header["forced_prefix"] = SEG
    rec = Recorder()
    with wworker.client(timeout_s=10) as c:
        done = c.ask(header, {}, on_event=rec)
    names = [e["event"] for e, _ in rec.events]
    progress = [e for e, _ in rec.of("progress")]
    assert [(e["stage"], e.get("index"), e.get("state")) for e in progress] == (
        [("window", i, s) for i in range(4) for s in ("started", "finished")] + [("stitch", None, None)])
    assert all(e["count"] == 4 for e in progress)
    assert names.index("mask") > max(i for i, n in enumerate(names) if n == "token")  # stitched after all windows
    windows_of_tokens = [e["window"] for e, _ in rec.of("token")]
    assert windows_of_tokens == sorted(windows_of_tokens) and set(windows_of_tokens) == {0, 1, 2, 3}

    (ev, arr), = rec.of("mask")  # one stitched step, not one per window
    mask = arr["mask"].astype(bool)
    assert mask.shape == (SIDE, SIDE) and ev["grid"]["geotransform"] == GT10 and ev["grid"]["shape"] == [SIDE, SIDE]
    assert ev["step"] == 0 and ev["window_step"] == 0 and ev["windows"] == [0, 1, 2, 3]
    meas = ev["measurements"]
    # measured once, on the stitched mask: independent recomputation from the mask that came back
    assert meas["area_px"] == int(mask.sum()) and meas["count"] == _labels8(mask)
    assert meas["area_ha"] == pytest.approx(mask.sum() * 0.01, rel=2e-3)
    assert meas["coverage_pct"] == pytest.approx(100 * mask.mean(), abs=1e-6) and meas["valid_px"] == SIDE * SIDE
    per_window = [s for w in done["windows"] for s in w["steps"]]
    assert len(per_window) == 4 and meas["area_px"] <= sum(s["area_px"] for s in per_window)  # overlaps once

    assert done["windowed"] | {"step_rule": None} == {"mode": "on", "tile": TILE, "overlap": OVERLAP,
                                                      "grid": [SIDE, SIDE], "count": 4, "answered": 4,
                                                      "skipped": 0, "step_rule": None}
    assert [w["window"]["row_off"] for w in done["windows"]] == [0, 0, 32, 32]
    assert all(w["state"] == "answered" and "[SEG]" in w["text"] for w in done["windows"])
    assert all("% of valid area" in w["reasoning"] for w in done["windows"])  # grounding measured per window
    assert done["choice"] is None and "Windowed run" in done["answer"] and "No option is chosen" in done["answer"]
    assert f"{meas['area_ha']:.2f} ha" in done["answer"]
    assert done["answer"] != done["windows"][0]["answer"]
    (dm,) = done["measurements"]
    assert dm["area_px"] == meas["area_px"] and dm["windows"] == [0, 1, 2, 3]
    # no window's letter is used, but the stitched mask, measured once, supports an option
    mc = done["measured_choice"]
    assert mc["quantity"] == "existence" and mc["steps"] == [0]
    assert mc["choice"] == ("A" if mask.any() else "B")
    assert done["text"].count("[window ") == 4 and done["timings_ms"]["total"] >= done["timings_ms"]["model"]


def test_auto_mode_windows_only_above_the_worker_threshold(wworker) -> None:
    rec = Recorder()
    with wworker.client(timeout_s=10) as c:
        small = c.ask(*_array_ask(scene(side=60)), on_event=rec)
        assert "windows" not in small and not rec.of("progress")
        assert rec.of("mask")[0][1]["mask"].shape == (60, 60)
        big = c.ask(*_array_ask(scene()))
        info = c.info()
    assert big["windowed"]["mode"] == "auto" and big["windowed"]["count"] == 4
    assert info["limits"]["window_threshold"] == 64 and info["limits"]["window_tile"] == TILE


def test_window_settings_errors_name_the_problem(wworker) -> None:
    img = scene()
    bad = [({"mode": "sometimes"}, "mode"), ({"tile": 8}, "tile"), ({"tile": 32, "overlap": 32}, "overlap"),
           ({"size": 32}, "unknown"), ("maybe", "mode"), ({"mode": "on", "tile": 16, "overlap": 15}, "at most")]
    with wworker.client(timeout_s=10) as c:
        for windows, word in bad:
            with pytest.raises(WorkerError) as e:
                c.ask(*_array_ask(img, windows=windows))
            assert e.value.code == P.BAD_FIELD and word in e.value.message, (windows, e.value.message)
        two = P.build_ask("What changed?", [P.RasterPayload(img, GT10, UTM33, role="t0"),
                                            P.RasterPayload(scene(side=72), GT10, UTM33, role="t1")],
                          settings={"max_new_tokens": 4, "windows": {"mode": "on"}})
        with pytest.raises(WorkerError) as e:
            c.ask(*two)
        assert e.value.code == P.BAD_FIELD and "one grid" in e.value.message
        assert c.ask(*_array_ask(img, tokens=4, windows={"mode": "off"}))["event"] == "done"


def test_nodata_windows_are_skipped_and_the_rest_measured(wworker) -> None:
    img = scene()
    img[:, :, 32:] = 0  # windows 1 and 3 (cols 32..79) are all nodata
    header, arrays = P.build_ask("Where is the block?", [P.RasterPayload(img, GT10, UTM33, nodata=0)],
                                 settings={"max_new_tokens": 10, "windows": {"mode": "on"}})
    header["forced_prefix"] = SEG
    with wworker.client(timeout_s=10) as c:
        done = c.ask(header, arrays)
    assert [w["state"] for w in done["windows"]] == ["answered", "skipped", "answered", "skipped"]
    assert done["windowed"]["skipped"] == 2 and "2 window(s) had no valid pixels" in done["answer"]
    (m,) = done["measurements"]
    assert m["windows"] == [0, 2] and m["valid_px"] == SIDE * 32  # coverage over valid pixels only


def test_cancel_stops_between_windows_and_inside_a_window(wworker) -> None:
    img = scene()
    with wworker.client(timeout_s=10) as c:
        rec = Recorder()

        def after_first_window() -> bool:
            return any(e.get("state") == "finished" for e, _ in rec.of("progress"))

        header, arrays = _array_ask(img, windows={"mode": "on"}, tokens=10)
        with pytest.raises(WorkerError) as e:
            c.ask(header, arrays, on_event=rec, should_cancel=after_first_window)
        assert e.value.code == P.CANCELLED
        started = [ev["index"] for ev, _ in rec.of("progress") if ev.get("state") == "started"]
        assert started and max(started) <= 1 and not rec.of("mask")  # at most the next window had begun

        rec2 = Recorder()
        noise = np.random.default_rng(0).integers(0, 255, size=(3, SIDE, SIDE), dtype=np.uint8)
        header, arrays = _array_ask(noise, windows={"mode": "on"}, tokens=3000, prefix=None)
        header["settings"]["max_seg"] = 0  # a long [SEG]-free ramble in window 0
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as e:
            c.ask(header, arrays, on_event=rec2, should_cancel=lambda: len(rec2.of("token")) >= 3)
        assert e.value.code == P.CANCELLED and time.monotonic() - t0 < 60
        assert {ev["window"] for ev, _ in rec2.of("token")} == {0}
        assert not [ev for ev, _ in rec2.of("progress") if ev.get("state") == "finished"]
        assert c.ask(*_array_ask(img, tokens=4, windows={"mode": "off"}))["event"] == "done"
        assert c.ping()["running"] == 0


def test_cli_auto_sends_the_full_grid_and_writes_stitched_results(wworker, geotiff_dir, tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "ask", str(geotiff_dir / "scene.tif"), "-q", "Where is the block?",
         "--endpoint", wworker.endpoint, "--max-side", "40", "--window-size", "48",
         "--window-overlap", "16", "--max-new-tokens", "10", "--forced-prefix", SEG, "--json", "--out", str(out),
         "--timeout", "10"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    # mode auto: the file (80 px) exceeds --max-side (40) and the worker's threshold (64, from info), so the
    # CLI sent it on its full grid and the worker answered it in windows
    assert obj["windowed"]["mode"] == "auto" and obj["windowed"]["count"] == 4 and len(obj["windows"]) == 4
    assert obj["choice"] is None
    (row,) = obj["masks"]
    with rasterio.open(row["geotiff"]) as ds:  # the full 80x80 grid came back, though --max-side is 40
        assert (ds.height, ds.width) == (SIDE, SIDE) and ds.transform.to_gdal() == tuple(GT10)
        assert int((ds.read(1) > 0).sum()) == obj["measurements"][0]["area_px"]
