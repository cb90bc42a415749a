"""Protocol figures: tcp loopback round trip of a 1024x1024x3 uint8 tile, and preparing + sending a
request for a 10,000 x 10,000 3-band GeoTIFF (windowed/decimated read, extra peak RSS).

    .venv/bin/python -m bench.protocol_roundtrip [--repeat 50] [--side 10000]

The worker is a real ``terrascope worker`` process on tcp://127.0.0.1 (the tiny test checkpoint
as its model; ``echo`` does not touch the model). The floor is a bare DEALER/ROUTER echo in
this process, so the cost of our framing, checks and the worker's IO thread is visible.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from qgis_plugin import protocol as P
from qgis_plugin.client import WorkerClient, WorkerUnavailable

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(ms: list[float]) -> str:
    ms = sorted(ms)
    return f"median {statistics.median(ms):.2f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.2f} ms, min {ms[0]:.2f} ms"


ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
router = ctx.socket(zmq.ROUTER)
port = router.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
while True:
    frames = router.recv_multipart(copy=False)
    if len(frames) == 2:
        break
    router.send_multipart(frames, copy=False)
"""


def bare_zmq_floor(tile: np.ndarray, repeat: int) -> list[float]:
    """Raw DEALER -> ROUTER -> DEALER of the same bytes, zero-copy, echo server in another process."""
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline())
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    out = []
    for _ in range(repeat + 3):
        t0 = time.perf_counter()
        dealer.send_multipart([b"", tile], copy=False)
        frames = dealer.recv_multipart(copy=False)
        np.frombuffer(frames[1].buffer, np.uint8)
        out.append((time.perf_counter() - t0) * 1000)
    dealer.send(b"stop")
    server.wait(10)
    dealer.close(0)
    ctx.term()
    return out[3:]


def start_worker(endpoint: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker", "--endpoint", endpoint, "--model",
                             str(TINY), "--device", "cpu"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with WorkerClient(endpoint, timeout_s=1.0) as c:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if c.ping()["state"] != "loading":  # the model thread is idle from here on
                    return proc
            except WorkerUnavailable:
                pass
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("worker did not start")


def worker_round_trip(client: WorkerClient, tile: np.ndarray, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat + 3):
        t0 = time.perf_counter()
        _, arrays = client.echo({"tile": tile})
        assert arrays["tile"].shape == tile.shape
        out.append((time.perf_counter() - t0) * 1000)
    return out[3:]


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


VARIANTS = {
    "plain": "tiled 512, uncompressed, no overviews",
    "deflate": "tiled 512, deflate, no overviews (every block must be decompressed)",
    "overviews": "tiled 512, deflate, with overviews (what gdaladdo or QGIS 'build pyramids' leave)",
}


def make_big_geotiff(path: Path, side: int, variant: str) -> None:
    """Written by a child process so its memory does not count in our peak."""
    compress = "" if variant == "plain" else 'compress="deflate", predictor=2,'
    overviews = "ds.build_overviews([2, 4, 8, 16], Resampling.average)" if variant == "overviews" else ""
    code = f"""
import numpy as np, rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window
from rasterio.enums import Resampling
side = {side}
prof = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633",
            transform=from_origin(500000, 4700000, 1.0, 1.0), tiled=True, blockxsize=512, blockysize=512,
            {compress})
rng = np.random.default_rng(0)
with rasterio.open({str(path)!r}, "w", **prof) as ds:
    for r in range(0, side, 1024):
        h = min(1024, side - r)
        base = rng.integers(40, 90, size=(3, h, side), dtype=np.uint8)
        base[:, :, (side // 3):(side // 2)] = 200
        ds.write(base, window=Window(0, r, side, h))
    {overviews}
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def big_request(client: WorkerClient, side: int, variant: str) -> None:
    from worker.raster import read_raster

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.tif"
        make_big_geotiff(path, side, variant)
        print(f"{side}x{side}x3 GeoTIFF, {VARIANTS[variant]}, {path.stat().st_size / 1e6:.0f} MB on disk:")
        hwm0 = vm_hwm_bytes()
        t0 = time.perf_counter()
        data, georef, nodata, names = read_raster(str(path), max_side=2048)
        t_read = time.perf_counter() - t0
        header, arrays = P.build_ask("What share is bright?", [P.RasterPayload(
            data, list(georef.to_gdal()), georef.crs_wkt, nodata, names)])
        frames = P.encode_message(header, arrays)
        t_build = time.perf_counter() - t0 - t_read
        _, back = client.echo(arrays)  # send it to the worker (and back: a round trip)
        t_total = time.perf_counter() - t0
        extra = vm_hwm_bytes() - hwm0
        print(f"  read (decimated to {data.shape[1]}x{data.shape[2]}) "
              f"{t_read:.2f} s + build {t_build * 1000:.1f} ms + send/echo {(t_total - t_read - t_build):.2f} s "
              f"= {t_total:.2f} s total (target < 5 s); extra peak RSS {extra / 2**20:.0f} MiB (target < 1536 MiB); "
              f"{P.message_nbytes(frames) / 1e6:.1f} MB on the wire")
        assert back["image0"].shape == data.shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--side", type=int, default=10_000)
    ap.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    args = ap.parse_args(argv)
    tile = np.random.default_rng(0).integers(0, 255, size=(1024, 1024, 3), dtype=np.uint8)
    print(f"tile 1024x1024x3 uint8 ({tile.nbytes / 2**20:.1f} MiB), {args.repeat} round trips, "
          f"{os.cpu_count()} CPUs, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    print(f"bare pyzmq DEALER/ROUTER echo (floor):      {_stats(bare_zmq_floor(tile, args.repeat))}")
    endpoint = f"tcp://127.0.0.1:{_port()}"
    proc = start_worker(endpoint)
    try:
        with WorkerClient(endpoint, timeout_s=30) as client:
            ms = worker_round_trip(client, tile, args.repeat)
            print(f"protocol round trip via the worker (tcp):   {_stats(ms)}  (target < 5 ms)")
            for variant in VARIANTS if args.variant == "all" else [args.variant]:
                big_request(client, args.side, variant)
            client.shutdown()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
