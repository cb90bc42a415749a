"""Time the Triton decode-attention kernel pair under each split plan, on a CUDA GPU.

    python3 -m bench.attention_plans [--out DIR]

Why: the plan (programs per SM, prefix query block, warps) was tuned for one question a step; at 4 images x 8
questions the partials kernel took 15 us a layer against 4 us at batch 1 (docs/PERFORMANCE.md). This prints
us per call for every plan at the 8B shape's decode batches, so a default is chosen from figures, not guesses.
Each figure is a CUDA graph of 28 calls (one per layer) replayed, divided by 28: no launch overhead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from model import decode_attention as da

# (label, G, R): the bench's batch-1 question, 4 images x 8 questions, one image x 8, 32 distinct images
SHAPES = [("1x1", 1, 1), ("4x8", 4, 8), ("1x8", 1, 8), ("32x1", 32, 1)]
KVH, GQ, D, PB, SB, PLEN, POS = 4, 7, 128, 1536, 256, 1460, 140


def time_plan(G: int, R: int, layers: int = 28, replays: int = 20) -> float:
    """us per decode_attention call with the module's current plan knobs."""
    dev = torch.device("cuda")
    kw = {"device": dev, "dtype": torch.bfloat16}
    q = torch.randn(G, KVH, R, GQ, 1, D, **kw)
    k_pre = torch.randn(G, KVH, PB, D, **kw)
    v_pre = torch.randn_like(k_pre)
    k_row = torch.randn(G, KVH, R, SB, D, **kw)
    v_row = torch.randn_like(k_row)
    plen = torch.full((G,), PLEN, device=dev, dtype=torch.long)
    pos = torch.full((G * R,), POS, device=dev, dtype=torch.long)
    ws = da.Workspace.create(G, KVH, R, GQ, D, PB, SB, torch.bfloat16, dev)
    problem = da.self_check(ws, PB, SB, D ** -0.5)
    if problem is not None:
        raise RuntimeError(problem)
    for _ in range(3):
        da.decode_attention(q, k_pre, v_pre, plen, k_row, v_row, pos, D ** -0.5, ws)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            da.decode_attention(q, k_pre, v_pre, plen, k_row, v_row, pos, D ** -0.5, ws)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * layers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.attention_plans", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for attention_plans.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or da.unavailable_reason() is not None:
        print(f"bench.attention_plans: needs CUDA and triton ({da.unavailable_reason() or 'no CUDA'})",
              file=sys.stderr)
        return 2
    defaults = (da.PROGRAMS_PER_SM, da.MAX_QUERY_BLOCK, da.NUM_WARPS)
    rows = []
    print(f"[env] {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for label, G, R in SHAPES:
        best = None
        for per_sm, qmax, warps in itertools.product((1, 2, 4, 8), (16, 32, 64), (4, 8)):
            if qmax > 16 and R * GQ <= 16 and (per_sm, qmax, warps) != defaults:
                continue  # the query block is 16 whatever the cap: same plan as qmax 16
            da.PROGRAMS_PER_SM, da.MAX_QUERY_BLOCK, da.NUM_WARPS = per_sm, qmax, warps
            try:
                us = time_plan(G, R)
            except Exception as exc:  # noqa: BLE001 - a plan that fails to compile is reported, not fatal
                print(f"  {label} per_sm={per_sm} qblock<={qmax} warps={warps}: failed {exc!r}", flush=True)
                continue
            finally:
                da.PROGRAMS_PER_SM, da.MAX_QUERY_BLOCK, da.NUM_WARPS = defaults
            is_default = (per_sm, qmax, warps) == defaults
            rows.append({"shape": label, "programs_per_sm": per_sm, "max_query_block": qmax, "num_warps": warps,
                         "us": us, "default": is_default})
            if best is None or us < best["us"]:
                best = rows[-1]
            print(f"  {label} per_sm={per_sm} qblock<={qmax} warps={warps}: {us:.2f} us"
                  + (" (default)" if is_default else ""), flush=True)
        default = next((r for r in rows if r["shape"] == label and r["default"]), None)
        if best is not None and default is not None:
            print(f"[plan] {label}: default {default['us']:.2f} us, best {best['us']:.2f} us with per_sm="
                  f"{best['programs_per_sm']} qblock<={best['max_query_block']} warps={best['num_warps']}",
                  flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_plans.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
