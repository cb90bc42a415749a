"""Bench: prepare a 10,000 x 10,000 3-band GeoTIFF for the model (target < 5 s, < 1.5 GB extra memory).

Usage: python -m bench.raster_prep [--size 10000] [--max-side 2048] [--layouts tiled-deflate,striped-raw]

Each layout is measured in a fresh child process: extra memory = peak RSS (VmHWM) minus the RSS after
imports, so GDAL's own buffers count, not only numpy's. The file is generated first in a temp dir (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    "tiled-deflate": {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"},
    "striped-raw": {"tiled": False},
    "tiled-deflate+overviews": {"tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate"},
}


def make_geotiff(path: Path, size: int, layout: str) -> None:
    """A smooth, compressible 3-band uint8 scene (gradients + texture), written in strips."""
    import numpy as np
    import rasterio
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": Affine(0.5, 0, 500_000, 0, -0.5, 5_000_000),
               **LAYOUTS[layout]}
    rng = np.random.default_rng(0)
    strip = 1024 if profile.get("tiled") else 500
    with rasterio.open(path, "w", **profile) as dst:
        cols = np.arange(size, dtype=np.float32)
        for r0 in range(0, size, strip):
            h = min(strip, size - r0)
            rows = np.arange(r0, r0 + h, dtype=np.float32)[:, None]
            base = 0.5 + 0.25 * np.sin(rows / 700.0) * np.cos(cols / 900.0)
            block = np.empty((3, h, size), np.uint8)
            for b in range(3):
                noise = rng.integers(0, 24, (h, size), dtype=np.uint8)
                block[b] = (base * (180 + 20 * b)).astype(np.uint8) + noise
            dst.write(block, window=Window(0, r0, size, h))
        if layout.endswith("+overviews"):
            dst.build_overviews([2, 4, 8, 16], Resampling.average)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure_child(path: str, max_side: int) -> dict:
    """Runs in a fresh process: read (decimated) + prepare, timing and peak memory."""
    import numpy as np
    import rasterio  # noqa: F401 - the worker has GDAL loaded already; count data, not libraries

    from worker.measure import measure_mask
    from worker.raster import mask_to_request_grid, prepare_array, read_raster

    base_kb = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    data, georef, nodata, names = read_raster(path, max_side=max_side)
    t_read = time.perf_counter() - t0
    prep = prepare_array(data, georef, nodata, names, max_side=max_side)
    t_prep = time.perf_counter() - t0
    prep_peak_kb = _rss_kb("VmHWM")
    # a fragmented mask (tens of thousands of objects): the worst case for measuring a [SEG] step
    mask_view = prep.pixels[..., 0] > np.percentile(prep.pixels[..., 0], 60)
    full = mask_to_request_grid(mask_view, prep)
    t1 = time.perf_counter()
    m = measure_mask(full, prep.georef, mask_to_request_grid(prep.valid, prep))
    t_measure = time.perf_counter() - t1
    peak_kb = _rss_kb("VmHWM")
    return {"read_s": t_read, "prepare_total_s": t_prep, "measure_s": t_measure, "objects": m.count,
            "request_grid": list(prep.shape), "view": list(prep.view_shape),
            "extra_peak_mb": (prep_peak_kb - base_kb) / 1024.0, "extra_peak_with_measure_mb": (peak_kb - base_kb) / 1024.0,
            "baseline_rss_mb": base_kb / 1024.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--max-side", type=int, default=2048)
    ap.add_argument("--layouts", default="tiled-deflate,striped-raw,tiled-deflate+overviews")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure_child(args.child, args.max_side)))
        return 0
    print(f"raster_prep: {args.size} x {args.size} x 3 uint8 GeoTIFF -> model view <= {args.max_side} px "
          f"(targets: < 5 s, < 1536 MB extra peak RSS)")
    ok = True
    with tempfile.TemporaryDirectory(prefix="terrascope-bench-") as tmp:
        for layout in args.layouts.split(","):
            path = Path(tmp) / f"{layout}.tif"
            t0 = time.perf_counter()
            make_geotiff(path, args.size, layout)
            gen = time.perf_counter() - t0
            out = subprocess.run([sys.executable, "-m", "bench.raster_prep", "--child", str(path),
                                  "--max-side", str(args.max_side)], capture_output=True, text=True,
                                 cwd=Path(__file__).resolve().parents[1], env={**os.environ}, check=False)
            if out.returncode != 0:
                print(f"  {layout}: FAILED\n{out.stderr}")
                ok = False
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            verdict = "OK" if r["prepare_total_s"] < 5 and r["extra_peak_mb"] < 1536 else "OVER TARGET"
            ok &= verdict == "OK"
            print(f"  {layout:<24} file {path.stat().st_size / 2**20:7.1f} MB (made in {gen:5.1f} s) | "
                  f"read {r['read_s']:.2f} s, read+prepare {r['prepare_total_s']:.2f} s, "
                  f"extra peak RSS {r['extra_peak_mb']:.0f} MB | view {r['view'][0]}x{r['view'][1]} | "
                  f"measure_mask on request grid {r['measure_s']:.2f} s ({r['objects']} objects, peak "
                  f"{r['extra_peak_with_measure_mb']:.0f} MB) | {verdict}")
            path.unlink()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
