"""``ask`` through a real worker process on the tiny checkpoint: streaming, masks, cancel, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from workerlib import GT10, REPO, UTM33, RawDealer, long_ask, raster, small_ask, start_worker

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError, WorkerUnavailable

QGIS_PY = REPO / ".venv-qgis" / "bin" / "python"
#: Teacher-forced start of the reply: the random-weight fixture never emits [SEG] on its own.
TWO_SEGS = "<think>The bright square [SEG] and the background [SEG] are"


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[dict, dict]] = []

    def __call__(self, ev: dict, arrays: dict) -> None:
        self.events.append((ev, {k: np.array(v) for k, v in arrays.items()}))

    @property
    def names(self) -> list[str]:
        return [e["event"] for e, _ in self.events]

    def of(self, name: str) -> list[tuple[dict, dict]]:
        return [(e, a) for e, a in self.events if e["event"] == name]


def test_long_ask_really_is_long(worker) -> None:
    """The cancel/kill tests below rely on this request not finishing early."""
    header, arrays = long_ask(max_new_tokens=60)
    with worker.client() as c:
        done = c.ask(header, arrays)
    assert done["stopped"] == "max_new_tokens"


def test_info_reports_the_loaded_model(worker) -> None:
    with worker.client() as c:
        info = c.info()
    assert info["state"] == "ready" and info["error"] is None
    assert info["model"]["device"] == "cpu" and info["model"]["params"] > 0
    assert info["limits"]["max_side"] == 256 and info["limits"]["max_queue"] == 2
    assert "torch" in info["versions"]


def test_streaming_order_masks_and_measurements(worker) -> None:
    header, arrays = small_ask(max_new_tokens=120, measure_grounding=True)
    header["forced_prefix"] = TWO_SEGS
    rec = Recorder()
    with worker.client() as c:
        done = c.ask(header, arrays, on_event=rec)
    names = rec.names
    assert names[0] == "accepted" and names[-1] == "done" and names.count("done") == 1
    assert names.index("token") < names.index("mask")
    masks = rec.of("mask")
    assert [m["step"] for m, _ in masks] == [0, 1]
    for ev, arr in masks:
        mask = arr["mask"]
        assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert ev["grid"]["geotransform"] == GT10 and ev["grid"]["shape"] == [32, 32]
        meas = ev["measurements"]
        assert meas["area_px"] == int(mask.sum()) and meas["units"] == "m"
        # independent check: 10 m UTM pixels are 100 m² each, within the projection's scale error
        assert meas["area_ha"] == pytest.approx(mask.sum() * 0.01, rel=2e-3)
        assert meas["coverage_pct"] == pytest.approx(100 * mask.mean(), abs=1e-6)
        assert ev["image"] == 0 and 0.0 <= ev["score"] <= 1.0
        assert ev["grounding_text"]  # measurement grounding was fed back into the trace
    assert "[SEG]" in done["text"]
    assert [m["step"] for m in done["measurements"]] == [0, 1]
    assert done["timings_ms"]["total"] >= done["timings_ms"]["prepare"] >= 0
    assert done["model"]["device"] == "cpu" and done["worker"]["pid"] == worker.proc.pid
    tokens = "".join(e["text"] for e, _ in rec.of("token"))
    assert tokens.startswith("<think>")


def test_grounding_span_carries_the_option_the_masks_support(worker) -> None:
    """With options and measurement grounding, the span after each mask ends with the option its measurement is
    nearest (recomputed here from the sent mask); the same ask without options gets the bare span."""
    options = ["A. 5%", "B. 30%", "C. 60%", "D. 95%"]
    spans = {}
    for opts in (options, None):
        header, arrays = small_ask("What share of the image does the bright square cover?", max_new_tokens=40,
                                   measure_grounding=True, options=opts)
        header["forced_prefix"] = "<think>The bright square [SEG]"
        rec = Recorder()
        with worker.client() as c:
            done = c.ask(header, arrays, on_event=rec)
        (ev, arr), = rec.of("mask")[:1]
        spans[opts is not None] = (ev, arr, done)
    ev, arr, done = spans[True]
    pct = 100 * arr["mask"].mean()
    nearest = "ABCD"[int(np.argmin([abs(pct - v) for v in (5, 30, 60, 95)]))]
    bare = ev["measurements"]["grounding"]
    assert ev["grounding_text"] == f"{bare[:-1]}; measured answer {nearest}]"
    assert done["measured_choice"]["choice"] == nearest
    ev, _, done = spans[False]
    assert ev["grounding_text"] == ev["measurements"]["grounding"] and "measured answer" not in ev["grounding_text"]
    assert done["measured_choice"] is None


def test_masks_are_sieved_on_the_model_grid_unless_asked_not_to(worker) -> None:
    """Default: specks under measure.SIEVE_SHARE of the model grid or SIEVE_RELATIVE of the largest object are
    gone from the mask that is sent and measured; ``"sieve": false`` gives the decoder's raw mask (same model, same forced trace)."""
    from scipy import ndimage

    speckled = np.random.default_rng(0).integers(0, 255, (3, 256, 256), np.uint8)  # noise: a speckled mask
    masks = {}
    for sieve in (True, False):
        header, arrays = P.build_ask("Where is the bright square?",
                                     [P.RasterPayload(speckled, GT10, UTM33)],
                                     settings={"max_new_tokens": 40})
        header["forced_prefix"] = TWO_SEGS
        header["sieve"] = sieve
        rec = Recorder()
        with worker.client() as c:
            c.ask(header, arrays, on_event=rec)
        masks[sieve] = [(ev, arr["mask"].astype(bool)) for ev, arr in rec.of("mask")]
    specks = 0
    for (ev, sieved), (_, raw) in zip(masks[True], masks[False]):
        labels, n = ndimage.label(raw, structure=np.ones((3, 3)))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
        keep = (sizes >= 32) & (sizes >= 0.02 * sizes.max())  # 1/2048 of the 256 x 256 grid, 2 % of the largest
        keep[0] = False
        assert np.array_equal(sieved, keep[labels])
        assert ev["measurements"]["area_px"] == int(sieved.sum())
        specks += int((~keep[1:]).sum())
    assert len(masks[True]) == 2 and specks > 0  # the random-weight model does leave specks to remove


def test_phrase_rules_shape_the_mask_sent_and_measured_unless_asked_not_to(worker) -> None:
    """Default: "the largest ..." sends and measures the decoder mask's largest 4-connected object and says so
    (``region_rule``); ``"region_rules": false`` sends the decoder's mask. The sieve is off to compare raw masks."""
    from scipy import ndimage

    speckled = np.random.default_rng(0).integers(0, 255, (3, 256, 256), np.uint8)
    got = {}
    for rules in (True, False):
        header, arrays = P.build_ask("How far is the largest building from the others?",
                                     [P.RasterPayload(speckled, GT10, UTM33)], settings={"max_new_tokens": 40})
        header["forced_prefix"] = "<think>I segment the largest building [SEG] and the other buildings [SEG]"
        header["sieve"] = False
        header["region_rules"] = rules
        rec = Recorder()
        with worker.client() as c:
            done = c.ask(header, arrays, on_event=rec)
        got[rules] = ([(ev, arr["mask"].astype(bool)) for ev, arr in rec.of("mask")], done)
    (ruled, done_ruled), (raw, done_raw) = got[True], got[False]
    assert [ev["region_rule"] for ev, _ in ruled] == ["largest object", "objects other than the largest"]
    assert [ev["region_rule"] for ev, _ in raw] == [None, None]
    assert [s["region_rule"] for s in done_raw["measurements"]] == [None, None]
    assert [s["region_rule"] for s in done_ruled["measurements"]] == ["largest object", "objects other than the largest"]
    lab, n = ndimage.label(raw[0][1], structure=ndimage.generate_binary_structure(2, 1))
    assert n > 1, "the random-weight model should draw several objects here"
    biggest = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
    assert np.array_equal(ruled[0][1], biggest)
    assert ruled[0][0]["measurements"]["area_px"] == int(biggest.sum())
    assert ruled[0][0]["measurements"]["count"] == 1


def test_masks_come_back_on_the_request_grid_of_a_60_mb_raster(worker) -> None:
    data = np.zeros((3, 4480, 4480), np.uint8)  # 60 MB; the model sees a 256 px view
    data[:, 1000:3000, 500:2500] = 200
    data[1] = 90
    gt = [600000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5]
    header, arrays = P.build_ask("Where is the bright block?", [P.RasterPayload(data, gt, UTM33)],
                                 settings={"max_new_tokens": 20})
    header["forced_prefix"] = "<think>The block [SEG] is"
    rec = Recorder()
    with worker.client(timeout_s=10) as c:
        c.ask(header, arrays, on_event=rec)
    (ev, arr), = rec.of("mask")
    assert arr["mask"].shape == (4480, 4480)
    assert ev["grid"]["geotransform"] == gt
    assert ev["measurements"]["area_px"] == int(arr["mask"].sum())


def test_cancel_mid_generation_then_next_request_succeeds(worker) -> None:
    header, arrays = long_ask()
    rec = Recorder()
    cancel_at: list[int] = []

    def should_cancel() -> bool:
        n = len(rec.of("token"))
        if n >= 3 and not cancel_at:
            cancel_at.append(n)
        return bool(cancel_at)

    with worker.client() as c:
        t0 = time.monotonic()
        with pytest.raises(WorkerError) as e:
            c.ask(header, arrays, on_event=rec, should_cancel=should_cancel)
        elapsed = time.monotonic() - t0
        assert e.value.code == P.CANCELLED
        after = len(rec.of("token")) - cancel_at[0]
        assert after < 100, f"{after} tokens after the cancel"
        assert elapsed < 60
        header2, arrays2 = small_ask(max_new_tokens=4)
        assert c.ask(header2, arrays2)["event"] == "done"
        assert c.ping()["running"] == 0


def test_bad_raster_is_an_error_event_and_service_continues(worker) -> None:
    data = np.full((3, 16, 16), 7, np.uint16)
    header, arrays = P.build_ask("q?", [P.RasterPayload(data, GT10, UTM33, nodata=7)])
    with worker.client() as c:
        with pytest.raises(WorkerError) as e:
            c.ask(header, arrays)
        assert e.value.code == P.BAD_RASTER and e.value.event.get("reason")
        header2, arrays2 = small_ask(max_new_tokens=4)
        assert c.ask(header2, arrays2)["event"] == "done"


def test_time_series_and_sar_pairs(worker) -> None:
    t0, t1 = raster(seed=1), raster(seed=2)
    header, arrays = P.build_ask("What changed?", [P.RasterPayload(t0, GT10, UTM33, role="t0"),
                                                   P.RasterPayload(t1, GT10, UTM33, role="t1")],
                                 settings={"max_new_tokens": 120})
    header["forced_prefix"] = TWO_SEGS
    rec = Recorder()
    with worker.client() as c:
        c.ask(header, arrays, on_event=rec)
        assert {e["image"] for e, _ in rec.of("mask")} <= {0, 1}
        rng = np.random.default_rng(3)
        sar = (rng.normal(size=(2, 32, 32)) + 1j * rng.normal(size=(2, 32, 32))).astype(np.complex64)
        header, arrays = P.build_ask("Is there water?", [P.RasterPayload(raster(), GT10, UTM33, role="optical"),
                                                         P.RasterPayload(sar, GT10, UTM33, role="sar",
                                                                         band_names=["VV", "VH"])],
                                     settings={"max_new_tokens": 6})
        assert c.ask(header, arrays)["event"] == "done"


def test_full_queue_answers_busy(worker) -> None:
    raw = RawDealer(worker.endpoint)
    ids = [f"busy-{i}" for i in range(5)]
    try:
        for rid in ids:
            header, arrays = long_ask()
            header["id"] = rid
            raw.send([b""] + P.encode_message(header, arrays))
        first: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while len(first) < len(ids) and time.monotonic() < deadline:
            got = raw.recv(1.0)
            if got and got[0]["id"] in ids and got[0]["event"] in ("accepted", "error"):
                first.setdefault(got[0]["id"], got[0].get("code") or got[0]["event"])
        # one running + 2 queue slots; the rest are refused at once (a race may let 1 or 2 through)
        assert sorted(first) == sorted(ids)
        busy = [r for r in first.values() if r == P.BUSY]
        assert 2 <= len(busy) <= 3 and all(r in ("accepted", P.BUSY) for r in first.values())
        for rid in ids:
            raw.send([b""] + P.encode_message(P.request("cancel", target=rid)))
        # every accepted job ends exactly once with "cancelled"
        ended: list[str] = []
        deadline = time.monotonic() + 20
        accepted = [rid for rid, r in first.items() if r == "accepted"]
        while len(ended) < len(accepted) and time.monotonic() < deadline:
            got = raw.recv(1.0)
            if got and got[0]["event"] == "error" and got[0]["id"] in accepted:
                assert got[0]["code"] == P.CANCELLED
                ended.append(got[0]["id"])
        assert sorted(ended) == sorted(accepted)
    finally:
        raw.close()


def test_client_that_vanishes_gets_its_job_cancelled(worker) -> None:
    def running() -> int:
        with worker.client() as c:
            return c.ping()["running"]

    # (1) the client stops pinging but stays connected: the job ends after ~3 s
    raw = RawDealer(worker.endpoint)
    header, arrays = long_ask()
    header["client_heartbeat_s"] = 0.5
    raw.send([b""] + P.encode_message(header, arrays))
    try:
        deadline = time.monotonic() + 15
        while running() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running() == 1
        t0 = time.monotonic()
        while running() and time.monotonic() < t0 + 10:
            time.sleep(0.2)
        assert running() == 0
        assert time.monotonic() - t0 > 1.0  # it was the missing pings, not the end of the answer
    finally:
        raw.close()
    # (2) the client's socket closes mid-stream: the next send fails (ROUTER_MANDATORY) and cancels
    raw = RawDealer(worker.endpoint)
    header["id"] = "vanish-2"
    header.pop("client_heartbeat_s")
    raw.send([b""] + P.encode_message(header, arrays))
    while raw.recv(5.0)[0]["event"] != "token":
        pass
    raw.close()
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0


@pytest.fixture(scope="module")
def doomed_worker(tmp_path_factory):
    """A worker of its own for the two fault tests: first frozen (SIGSTOP), then killed."""
    wp = start_worker(tmp_path_factory.mktemp("doomed"))
    yield wp
    if wp.proc.poll() is None:
        os.kill(wp.proc.pid, signal.SIGCONT)
    wp.stop()


def test_hung_worker_mid_answer_is_detected_within_5_s(doomed_worker) -> None:
    wp = doomed_worker
    header, arrays = long_ask()
    stopped_at: list[float] = []

    def on_event(ev, _):
        if ev["event"] == "token" and not stopped_at:
            os.kill(wp.proc.pid, signal.SIGSTOP)  # alive but silent: only the heartbeat can tell
            stopped_at.append(time.monotonic())

    try:
        with WorkerClient(wp.endpoint) as c, pytest.raises(WorkerUnavailable):
            c.ask(header, arrays, on_event=on_event)
        assert time.monotonic() - stopped_at[0] < 5.0
    finally:
        os.kill(wp.proc.pid, signal.SIGCONT)
    with WorkerClient(wp.endpoint) as c:  # thawed, it serves again (its old job was abandoned: cancelled)
        deadline = time.monotonic() + 10
        while c.ping()["running"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.ping()["running"] == 0


def test_killed_worker_is_detected_within_5_s(doomed_worker) -> None:
    wp = doomed_worker
    header, arrays = long_ask()
    killed_at: list[float] = []

    def on_event(ev, _):
        if ev["event"] == "token" and not killed_at:
            os.kill(wp.proc.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    with WorkerClient(wp.endpoint) as c, pytest.raises(WorkerUnavailable) as e:
        c.ask(header, arrays, on_event=on_event)
    detected = time.monotonic() - killed_at[0]
    assert detected < 5.0, detected
    assert "crash" in str(e.value) or "stopped" in str(e.value)


QGIS_CLIENT = r"""
import json, sys
import numpy as np
from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerError
endpoint, prefix = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
img = rng.integers(0, 255, size=(3, 40, 40), dtype=np.uint8)
header, arrays = P.build_ask("Where is it?", [P.RasterPayload(img, [500000.0, 10.0, 0.0, 4649000.0, 0.0, -10.0],
                                                              "EPSG:32633")], settings={"max_new_tokens": 60})
header["forced_prefix"] = prefix
events, masks = [], []
def on_event(ev, arr):
    events.append(ev["event"])
    if ev["event"] == "mask":
        masks.append([list(arr["mask"].shape), str(arr["mask"].dtype), ev["measurements"]["area_ha"]])
with WorkerClient(endpoint) as c:
    pong = c.ping()
    done = c.ask(header, arrays, on_event=on_event)
    try:
        c.ask(dict(header, question=""), arrays)
    except WorkerError as e:
        code = e.code
print(json.dumps({"numpy": np.__version__, "events": events, "masks": masks, "code": code,
                  "answer": done["answer"], "pid": pong["pid"]}))
"""


@pytest.mark.skipif(not QGIS_PY.exists(), reason="QGIS venv (.venv-qgis) not created: run `make deps`")
def test_qgis_python_client_talks_to_the_worker(worker) -> None:
    """The plugin's side (QGIS's Python: numpy 1.24, pyzmq 24) against the worker (numpy 2, pyzmq 27)."""
    proc = subprocess.run([str(QGIS_PY), "-c", QGIS_CLIENT, worker.endpoint, "<think>It [SEG] is"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["numpy"].startswith("1.") and out["pid"] == worker.proc.pid
    assert out["events"][0] == "accepted" and out["events"][-1] == "done" and "mask" in out["events"]
    assert out["masks"][0][:2] == [[40, 40], "uint8"] and out["masks"][0][2] >= 0
    assert out["code"] == P.BAD_FIELD


def test_an_answer_figure_no_mask_measures_is_flagged(worker) -> None:
    """150% can't be any mask's coverage: the `done` event must carry a check naming the measured figure."""
    header, arrays = small_ask(max_new_tokens=60)
    header["forced_prefix"] = "<think>The bright square [SEG] covers it.</think><answer>150%</answer>"
    with worker.client() as c:
        done = c.ask(header, arrays, on_event=Recorder())
    assert done["answer"].strip() == "150%"
    (check,) = done["checks"]
    measured = done["measurements"][0]["coverage_pct"]
    assert check["kind"] == "percent" and check["stated"] == 150.0
    assert check["measured"] == pytest.approx(measured, abs=1e-3) and check["step"] == 0
