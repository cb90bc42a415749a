"""Bench: host-side token selection for one batch of [SEG] masks, the original Python loops vs the vectorised code.

    .venv/bin/python -m bench.selection [--masks 32] [--size 896] [--repeats 5] [--threads 8] [--prepare 4]

The 8B shape: a ``size`` x ``size`` scene is tiled 2x2 (+ thumbnail) with 16x16 tokens per tile, so a mask
selects among 1024 token cells. The masks mix what the model returns: fragmented half-covered masks (random
weights give those), large and small blobs, and near-full masks. Each figure is the median over ``repeats``
of one pass over all masks, printed as ms per mask and ms per batch:

* official (λ=8): ``official_tiled`` (mask to the tiling size, NEAREST to the token grid, tile order, the
  release's spatial sample);
* spatial sample only: the release's ``_spatial_uniform_sample`` on the same token grids;
* native (λ=8 and λ=64): ``cell_coverage`` > 50% (block counts vs matrix products), tile order,
  ``uniform_sample``;
* the official batch through a thread pool, as ``Generator.handle_segs`` runs it.

Both sides must pick the same tokens (checked before timing). Runs on the CPU; no model is needed.

``--prepare N`` adds the other host-side batch cost, on a random terrascope-mini (CPU, float32, one torch
thread): N scenes of ``size`` x ``size`` through ``prepare`` one by one vs ``Generator.prepare_many`` (one ViT
forward), and SAM-2 encoded lazily one image at a time vs ``encode_sam_many`` (one forward). The contexts and
features must be equal (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from model import selection as S
from model.preprocess import TileLayout, closest_aspect_ratio

SIDE = 16
TILE = 448


def make_masks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` masks of ``size`` x ``size``: fragmented, blobs of several sizes, near-full (in turn)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for k in range(n):
        kind = k % 4
        if kind == 0:  # fragmented, about half covered
            low = (rng.random((size // 16, size // 16)) * 255).astype(np.uint8)
            field = np.asarray(Image.fromarray(low).resize((size, size), Image.BILINEAR))
            mask = field > 127
        elif kind in (1, 2):  # one big or a few small blobs
            mask = np.zeros((size, size), bool)
            for _ in range(1 if kind == 1 else 4):
                cy, cx = rng.uniform(0, size, 2)
                ry, rx = rng.uniform(size / 8, size / 2 if kind == 1 else size / 6, 2)
                mask |= (yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 < 1
        else:  # near full
            mask = rng.random((size, size)) < 0.97
        out.append(mask)
    return out


def nearest_reference(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """``_nearest`` as it was: always through PIL, also to the same size."""
    img = Image.fromarray((mask.astype(np.uint8) * 255), mode="L")
    return np.asarray(img.resize((width, height), Image.NEAREST)) > 127


def official_tiled_reference(mask: np.ndarray, lay: TileLayout, lam: int) -> list[int]:
    """``official_tiled`` as it was: PIL twice, the per-tile loop and the release's per-cell comprehension."""
    resized = nearest_reference(mask, lay.tile * lay.cols, lay.tile * lay.rows)
    grid = nearest_reference(resized, SIDE * lay.cols, SIDE * lay.rows)
    selected = S.tile_order_reference(grid, SIDE, lay.cols, lay.rows)
    if len(selected) > lam:
        selected = S.official_spatial_uniform_sample(selected, grid, SIDE, lay.cols, lam)
    return selected or [0]


def native_reference(mask: np.ndarray, lay: TileLayout, lam: int) -> list[int]:
    cov = S.cell_coverage_reference(mask, SIDE * lay.rows, SIDE * lay.cols)
    return S.uniform_sample_reference(S.tile_order_reference(cov > 0.5, SIDE, lay.cols, lay.rows), SIDE,
                                      lay.cols, lam)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, n: int, before: float, after: float, unit: str = "mask",
           sides: tuple[str, str] = ("python", "vectorised")) -> None:
    print(f"[{name}] {n} {unit}s: {sides[0]} {before * 1e3 / n:8.3f} ms/{unit} ({before * 1e3:8.1f} ms/batch)  "
          f"{sides[1]} {after * 1e3 / n:7.3f} ms/{unit} ({after * 1e3:7.1f} ms/batch)  x{before / after:.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.selection", description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", type=int, default=32)
    p.add_argument("--size", type=int, default=896)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=8, help="thread pool size for the handle_segs-style pass")
    p.add_argument("--prepare", type=int, default=0, metavar="N", help="also time prepare vs prepare_many")
    args = p.parse_args(argv)

    cols, rows = closest_aspect_ratio(args.size, args.size, 1, 12, TILE)
    lay = TileLayout(cols, rows, TILE, cols * rows > 1, (args.size, args.size))
    masks = make_masks(args.masks, args.size)
    grids = [S._nearest(S._nearest(m, TILE * cols, TILE * rows), SIDE * cols, SIDE * rows) for m in masks]
    selected = [S._tile_order(g, SIDE, cols, rows) for g in grids]
    print(f"layout {cols}x{rows} tiles (+thumbnail={lay.thumbnail}), {SIDE * SIDE * cols * rows} token cells; "
          f"selected cells per mask: min {min(map(len, selected))}, median {int(np.median(list(map(len, selected))))}, "
          f"max {max(map(len, selected))}")
    n = len(masks)

    # same picks first
    for m, g, sel in zip(masks, grids, selected):
        assert S.official_tiled(m, lay, SIDE, 8) == official_tiled_reference(m, lay, 8)
        assert S.spatial_uniform_sample(sel, g, SIDE, cols, 8) == S.official_spatial_uniform_sample(
            sel, g, SIDE, cols, 8)
        for lam in (8, 64):
            assert S.native_tiled(m, lay, SIDE, lam) == native_reference(m, lay, lam)

    report("official lambda=8", n, timed(lambda: [official_tiled_reference(m, lay, 8) for m in masks], args.repeats),
           timed(lambda: [S.official_tiled(m, lay, SIDE, 8) for m in masks], args.repeats))
    report("spatial sample only", n,
           timed(lambda: [S.official_spatial_uniform_sample(s, g, SIDE, cols, 8) for s, g in zip(selected, grids)],
                 args.repeats),
           timed(lambda: [S.spatial_uniform_sample(s, g, SIDE, cols, 8) for s, g in zip(selected, grids)],
                 args.repeats))
    for lam in (8, 64):
        report(f"native lambda={lam}", n,
               timed(lambda lam=lam: [native_reference(m, lay, lam) for m in masks], args.repeats),
               timed(lambda lam=lam: [S.native_tiled(m, lay, SIDE, lam) for m in masks], args.repeats))
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        report(f"official lambda=8, {args.threads} threads", n,
               timed(lambda: list(pool.map(lambda m: official_tiled_reference(m, lay, 8), masks)), args.repeats),
               timed(lambda: list(pool.map(lambda m: S.official_tiled(m, lay, SIDE, 8), masks)), args.repeats))
    if args.prepare:
        bench_prepare(args.prepare, args.size, args.repeats)


def bench_prepare(n: int, size: int, repeats: int) -> None:
    import torch

    from bench.gpu import TOKENIZER, scene
    from model.api import TerraScope
    from model.types import ImageInput

    torch.set_num_threads(1)
    ts = TerraScope.random("terrascope-mini", TOKENIZER, device="cpu")
    gen = ts.generator
    reqs = [[ImageInput(scene(size, size, 100 + i))] for i in range(n)]
    one = [ts.prepare(r) for r in reqs]
    many = gen.prepare_many(reqs)
    assert all(torch.equal(a.vit_flat, b.vit_flat) for a, b in zip(one, many))
    report("prepare, mini, 1 torch thread", n, timed(lambda: [ts.prepare(r) for r in reqs], repeats),
           timed(lambda: gen.prepare_many(reqs), repeats), "scene", ("one by one", "prepare_many"))

    def lazy() -> None:
        for ctx in one:
            ctx.sam_cache.clear()
            gen.sam_features(ctx, 0)

    def batched() -> None:
        for ctx in many:
            ctx.sam_cache.clear()
        gen.encode_sam_many(many)

    lazy()
    batched()
    for a, b in zip(one, many):
        assert all(torch.equal(x, y) for x, y in zip(a.sam_cache[0].image_embeddings, b.sam_cache[0].image_embeddings))
    report("SAM-2 encode, mini, 1 torch thread", n, timed(lazy, repeats), timed(batched, repeats), "scene",
           ("lazy one by one", "encode_sam_many"))


if __name__ == "__main__":
    main()
