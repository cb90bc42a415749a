"""``make bench-gpu``: the 8B-shape TerraScope path on one GPU, fast path vs the naive official-style loop.

    python3 -m bench.gpu                                   # CUDA, terrascope-8b (random bf16 weights)
    python3 -m bench.gpu --device cpu --preset terrascope-mini   # the CPU variant (one 512x512 question)
    python3 -m bench.gpu --shape tiny --device cpu         # seconds: checks the script itself

The model is built with random weights directly on the device in its dtype (``model.loading.random_model``:
meta-device modules, ``to_empty``, in-place init; no float32 copy). Every workload uses a FORCED trace (the
same ids every run: 128 tokens carrying two ``[SEG]`` at fixed positions, each with a SAM-2 mask, token
selection and injection), so each run does the same work whatever the random weights predict.

Figures: prefill ms, decode ms/token, SAM-2 encode ms, ms per [SEG], end-to-end s/question, peak GPU memory,
questions/s at batch 1, 8, 32 for shared and distinct images, and the same question through the naive loop
(``Generator.run`` with the fast path off, SAM-2 re-encoded at each [SEG], like the released code) with the
ratio. The bare decode step is timed for every (elementwise kernels, decode attention) pair: eager/compiled x
bmm/Triton split-K (``model/decode_attention.py``); the fastest pair runs the rest and is printed. A short
table is printed last; ``--out DIR`` gets the full JSON and log.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import fast_decode
from model.api import TerraScope
from model.configuration_terrascope import TerraScopeConfig, preset_config
from model.types import GenerationSettings, ImageInput

ROOT = Path(__file__).resolve().parent.parent
#: Any TerraScope tokenizer works with random weights; this one ships with the repo (1066 ids, official order).
TOKENIZER = ROOT / "tests" / "fixtures" / "terrascope-official-tiny" / "checkpoint"
QUESTION = "Which share of this scene is flooded, and are the main roads under water?"
OPTIONS = ["less than 10%", "10 to 25%", "25 to 50%", "more than 50%"]
REASONING = ("<think>I first look for open water and flooded fields around the river bend, then for the "
             "roads crossing the flood plain, and compare their extent with the whole scene. The water "
             "covers the low ground in the north east while the main road runs along the embankment, "
             "which stays dry except near the bridge where the flood reaches the road surface. The fields "
             "south of the river are saturated but not open water, so they do not count as flooded. ")
SEG_AT = (32, 80)  # positions of the two [SEG] in the 128-token trace

TINY = {
    "name": "tiny-bench",
    "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": 112, "patch_size": 14},
    "llm": {"vocab_size": 1066, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 96},
    "sam2": {"image_size": 256, "hiera_embed_dim": 8, "hiera_num_heads": 1, "hiera_stages": [1, 1, 2, 1],
             "hiera_global_att_blocks": [3], "hiera_window_spec": [8, 4, 4, 4],
             "hiera_window_pos_embed_bkg": [4, 4], "hidden_dim": 32, "decoder_mlp_dim": 64,
             "decoder_num_heads": 2, "iou_head_hidden_dim": 32},
    "template": "qwen_chat", "compat": "official", "max_tokens_per_seg": 8,
}


# ---- helpers -----------------------------------------------------------------------------------------------
class Log:
    def __init__(self, out: Path | None) -> None:
        self.lines: list[str] = []
        self.out = out

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(msg)

    def save(self, results: dict[str, Any]) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (self.out / "bench_gpu.log").write_text("\n".join(self.lines) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def naive_mode():
    """The reference loop: fast path off (``TERRASCOPE_FAST_DECODE=0``) and the SAM-2 encoder eager
    (``TERRASCOPE_SAM2_GRAPH=0``), as the released code runs."""
    old = {k: os.environ.get(k) for k in ("TERRASCOPE_FAST_DECODE", "TERRASCOPE_SAM2_GRAPH")}
    os.environ.update({k: "0" for k in old})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scene(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic smooth 'landscape' (blobs + noise): non-trivial masks, never all-zero pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.1, 0.4) * min(h, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(40, 160, size=3)
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img + 30, 0, 255).astype(np.uint8)


def forced_trace(ts: TerraScope, n_tokens: int) -> list[int]:
    """``n_tokens`` ids: reasoning text, [SEG] at SEG_AT, then ``</think><answer>B</answer>`` (the stop)."""
    sp = ts.tokenizer.special_ids()
    specials = set(sp.values())
    body = [t for t in ts.tokenizer.encode(REASONING * 4) if t not in specials]
    tail = ts.tokenizer.encode("</think><answer>B</answer>")
    trace = body[: n_tokens - len(tail)] + tail
    for p in SEG_AT:
        if p < len(trace) - len(tail):
            trace[p] = sp["seg"]
    assert len(trace) == n_tokens
    return trace


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- workloads -----------------------------------------------------------------------------------------------
def workload_images(kind: str, big: int, small: int, seed: int = 0) -> list[ImageInput]:
    if kind == "optical":
        return [ImageInput(scene(big, big, seed))]
    if kind == "pair":  # before / after
        return [ImageInput(scene(small, small, seed), "t0"), ImageInput(scene(small, small, seed + 1), "t1")]
    if kind == "optical+sar":
        return [ImageInput(scene(big, big, seed), "optical"), ImageInput(scene(big, big, seed + 2), "sar")]
    raise ValueError(kind)


def run_question(ts: TerraScope, images: list[ImageInput], trace: list[int], settings: GenerationSettings,
                 naive: bool) -> tuple[float, Any]:
    """One question from raw pixels to the result; returns (seconds, result)."""
    dev = ts.model.device
    sync(dev)
    t0 = time.perf_counter()
    if naive:
        with naive_mode():
            ctx = ts.prepare(images)
            # the released code re-runs the SAM-2 image encoder at every [SEG]: drop the cache after each mask
            res = ts.generator.run(ctx, QUESTION, OPTIONS, settings, on_mask=lambda step: ctx.sam_cache.clear(),
                                   forced_ids=trace)
    else:
        ctx = ts.prepare(images)
        res = fast_decode.fast_run(ts.generator, ctx, QUESTION, OPTIONS, settings, forced_ids=trace)
    sync(dev)
    return time.perf_counter() - t0, res


def bench_workload(ts: TerraScope, kind: str, args: argparse.Namespace, log: Log, trace: list[int],
                   settings: GenerationSettings, naive: bool) -> dict[str, Any]:
    dev = ts.model.device
    images = workload_images(kind, args.big, args.small)
    out: dict[str, Any] = {"kind": kind, "path": "naive" if naive else "fast"}
    reps = args.naive_repeats if naive else args.repeats
    run_question(ts, images, trace, settings, naive)  # warm-up (graph capture, allocator, cuDNN/cuBLAS plans)
    times, results = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        s, res = run_question(ts, images, trace, settings, naive)
        times.append(s)
        results.append(res)
    res = results[len(results) // 2]
    tm = res.timings_ms
    n_tok = len(res.token_ids) - res.token_ids.count(ts.generator.ids.region)
    n_seg = len(res.steps)
    out.update({
        "e2e_s": median(times), "e2e_all_s": times, "tokens": n_tok, "seg": n_seg, "stopped": res.stopped,
        "region_tokens": [len(st.token_indices) for st in res.steps],
        "preprocess_ms": tm.get("preprocess_ms"), "vision_ms": tm.get("vision_ms"),
        "prefill_ms": tm.get("prefill_ms"), "decode_ms": tm.get("decode_ms"), "seg_total_ms": tm.get("sam2_ms"),
        "seg_wait_ms": tm.get("seg_wait_ms", 0.0), "decode_steps": tm.get("decode_steps"),
        "decode_ms_per_token": tm.get("decode_ms", 0) / max(1, n_tok),
    })
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    log(f"[{out['path']}:{kind}] e2e {out['e2e_s']:.3f}s (runs {[round(t, 3) for t in times]}) "
        f"tokens={n_tok} seg={n_seg} regions={out['region_tokens']} prefill={out['prefill_ms']:.1f}ms "
        f"decode={out['decode_ms']:.1f}ms ({out['decode_ms_per_token']:.2f} ms/tok) seg={out['seg_total_ms']:.1f}ms "
        f"vision={out['vision_ms']:.1f}ms prep={out['preprocess_ms']:.1f}ms peak={out.get('peak_gib', 0):.2f}GiB")
    return out


def bench_sam2_encode(ts: TerraScope, args: argparse.Namespace) -> float:
    from model.preprocess import sam2_pixels

    dev = ts.model.device
    g = torch.from_numpy(sam2_pixels(scene(args.big, args.big, 0), ts.model.config.sam2.image_size))[None]
    ts.model.sam2_encode(g)
    times = []
    for _ in range(3):
        sync(dev)
        t0 = time.perf_counter()
        ts.model.sam2_encode(g)
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def bench_decode_step(ts: TerraScope, kernels: str, attention: str, prefix_len: int, steps: int,
                      log: Log, groups: int = 1, rows: int = 1) -> dict[str, Any]:
    """Graph replays of the bare decode step (``groups`` images x ``rows`` questions each, ``prefix_len``
    image-prefix tokens per image): ms/step.

    ``attention`` is what was asked for; the result's "attention" is what ran (a Triton kernel that cannot
    compile or fails its self-check falls back to bmm, and the reason is logged)."""
    model = ts.model
    dev = model.device
    dec = fast_decode.FastDecoder(model, groups=groups, rows_per_group=rows, max_prefix=prefix_len,
                                  max_row_len=steps + 72, inject_len=32, kernels=kernels, attention=attention)
    h = model.config.llm.hidden_size
    gen = torch.Generator(device=dev).manual_seed(0)
    dec.set_prefixes([(g, torch.randn(prefix_len, h, device=dev, dtype=model.dtype, generator=gen) * 0.02)
                      for g in range(groups)])
    dec._cur_pb = dec._pb()
    dec._reset_state()
    dec.pos.fill_(1)
    need = steps + 2  # one row bucket for the whole loop: capture once, then time replays only
    dec._launch("decode", need)  # captures the graph (and checks the attention kernel first)
    sync(dev)
    label = f"{dec.kernels}/{dec.attention}" + (f" batch {groups}x{rows}" if groups * rows > 1 else "")
    if dec.kernels != kernels:
        log(f"[decode-step:{kernels}/{attention}] runs {dec.kernels} kernels: {dec.kernels_reason.splitlines()[0]}")
    if dec.attention != attention:
        log(f"[decode-step:{kernels}/{attention}] runs {dec.attention} attention: {dec.attention_reason}")
    plan = next(iter(dec._attn_ws.values())).plan if dec._attn_ws else None
    t0 = time.perf_counter()
    for _ in range(steps):
        dec._launch("decode", need)
    sync(dev)
    ms = (time.perf_counter() - t0) * 1e3 / steps
    layer_bytes = sum(t.numel() * t.element_size() for lw in dec.layers
                      for t in (lw.wqkv, lw.wo, lw.wgu, lw.wd))
    head_bytes = dec.lm_head_w.numel() * dec.lm_head_w.element_size()
    gbs = (layer_bytes + head_bytes) / (ms * 1e-3) / 1e9
    log(f"[decode-step:{label}] {ms:.3f} ms/step over {steps} replays, prefix {prefix_len}: "
        f"weights {(layer_bytes + head_bytes) / 1e9:.2f} GB/step -> {gbs:.0f} GB/s"
        + (f"; kernel plan {plan}" if plan else "") + f"; lm_head {dec.lm_head_mode}")
    out = {"groups": groups, "rows": rows, "lm_head": dec.lm_head_mode,
           "kernels": dec.kernels, "kernels_requested": kernels, "attention": dec.attention, "attention_requested": attention,
           "attention_reason": dec.attention_reason if dec.attention != attention else "", "ms_per_step": ms,
           "weight_gb": (layer_bytes + head_bytes) / 1e9, "gb_s": gbs}
    del dec
    return out


def profile_decode_step(ts: TerraScope, kernels: str, attention: str, prefix_len: int, log: Log,
                        out: Path | None, groups: int = 1, rows: int = 1) -> None:
    """Per-kernel GPU time of eager decode steps (what a graph replay runs), top entries to the log."""
    from torch.profiler import ProfilerActivity, profile

    model = ts.model
    dec = fast_decode.FastDecoder(model, groups=groups, rows_per_group=rows, max_prefix=prefix_len, max_row_len=200,
                                  inject_len=32, kernels=kernels, use_graphs=False, attention=attention)
    gen = torch.Generator(device=model.device).manual_seed(0)
    dec.set_prefixes([(g, torch.randn(prefix_len, model.config.llm.hidden_size, device=model.device,
                                      dtype=model.dtype, generator=gen) * 0.02) for g in range(groups)])
    dec._cur_pb = dec._pb()
    dec._reset_state()
    for _ in range(3):
        dec._launch("decode", 100)
    sync(model.device)
    acts = [ProfilerActivity.CUDA] if model.device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(5):
            dec._launch("decode", 100)
        sync(model.device)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    for line in table.splitlines()[:22]:
        log("  " + line[:150])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tag = f"_batch{groups}x{rows}" if groups * rows > 1 else ""
        (out / f"profile_decode_{kernels}_{dec.attention}{tag}.txt").write_text(table + "\n")
    del dec


def run_batch(ts: TerraScope, imgs: list[list[ImageInput]], per_image: int, args: argparse.Namespace,
              trace: list[int], settings: GenerationSettings, prepare: str) -> tuple[list[Any], float]:
    """``per_image`` questions about each image from raw pixels in one ``answer_many`` batch, synced;
    returns (results, ms to prepare). ``prepare`` "many": one ViT forward for all images."""
    t0 = time.perf_counter()
    ctxs = ts.generator.prepare_many(imgs) if prepare == "many" else [ts.prepare(im) for im in imgs]
    t_prep = (time.perf_counter() - t0) * 1e3
    qs = [fast_decode.Question(ctx, f"{QUESTION} (view {j})", OPTIONS, trace) for ctx in ctxs
          for j in range(per_image)]
    res = fast_decode.answer_many(ts.generator, qs, settings, kernels=args.kernels_chosen,
                                  attention=args.attention_chosen)
    sync(ts.model.device)
    return res, t_prep


def bench_throughput(ts: TerraScope, batch: int, shared: bool, args: argparse.Namespace, log: Log,
                     trace: list[int], settings: GenerationSettings) -> dict[str, Any]:
    """``batch`` questions (forced traces) from raw pixels: one static-cache batch; q/s."""
    dev = ts.model.device
    n_images = max(1, batch // 8) if shared else batch
    imgs = [[ImageInput(scene(args.big, args.big, 100 + i))] for i in range(n_images)]
    qs_per = batch // n_images

    def once() -> tuple[float, list[Any], float]:
        sync(dev)
        t0 = time.perf_counter()
        res, t_prep = run_batch(ts, imgs, qs_per, args, trace, settings, args.prepare)
        return time.perf_counter() - t0, res, t_prep

    once()  # warm-up: decoder buffers and graphs for this shape
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [once() for _ in range(args.tp_repeats)]
    secs = median([r[0] for r in runs])
    res = runs[0][1]
    ok = all(len(r.steps) == len(SEG_AT) for r in res)
    tm = res[0].timings_ms
    out = {"batch": batch, "shared": shared, "images": n_images, "s": secs, "q_per_s": batch / secs,
           "all_two_masks": ok, "prepare_ms": runs[0][2], "prefill_ms": tm.get("prefill_ms"),
           "decode_ms": tm.get("decode_ms"), "seg_ms": tm.get("sam2_ms", 0) * batch,
           "decode_steps": tm.get("decode_steps"), "prepare": args.prepare,
           "sam2_early": fast_decode.sam2_early_enabled(ts.model)}
    for k in ("prompt_ms", "prefix_prefill_ms", "suffix_prefill_ms", "seg_handler_ms", "seg_wait_ms"):
        out[k] = tm.get(k)
    out["prompt_graph_width"] = fast_decode.PROMPT_GRAPH_WIDTH
    out["lm_head"] = [d.lm_head_mode for d in ts.model.__dict__.get("_ts_fast_decoders", {}).values()]
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log(f"[throughput] batch {batch:>2} {'shared' if shared else 'distinct'} ({n_images} images): "
        f"{secs:.3f}s -> {out['q_per_s']:.2f} q/s (masks ok={ok}, peak {out.get('peak_gib', 0):.1f} GiB; "
        f"prepare {out['prepare_ms']:.0f} ms, prefill {out['prefill_ms']:.0f} ms, decode {out['decode_ms']:.0f} ms "
        f"over {out['decode_steps']:.0f} steps, [SEG] handling {out['seg_ms']:.0f} ms; prompts "
        f"{out['prompt_ms'] or 0:.0f} ms, prefix prefill {out['prefix_prefill_ms'] or 0:.0f} ms, suffix prefill "
        f"{out['suffix_prefill_ms'] or 0:.0f} ms, [SEG] handler {out['seg_handler_ms'] or 0:.0f} ms; prepare="
        f"{args.prepare}, SAM-2 early={out['sam2_early']}, lm_head {out['lm_head']}, prompt graph <= "
        f"{out['prompt_graph_width']} tokens)")
    fast_decode.release_decoders(ts.model)
    return out


def gpu_gaps(trace: dict[str, Any], min_us: float = 50.0) -> dict[str, Any]:
    """Where the GPU idles in a chrome trace: the union of kernel/memcpy/memset spans, its gaps of at least
    ``min_us``, each charged to the innermost ``ts:`` phase label (``record_function``) open on the host at the
    gap's middle. Why: a batch's wall time minus its GPU busy time is host time nobody overlapped."""
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in trace.get("traceEvents", [])
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    labels = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and str(e.get("name", "")).startswith("ts:")]
    if not dev:
        return {"span_ms": 0.0, "busy_ms": 0.0, "gaps": {}}
    gaps: dict[str, tuple[float, int]] = {}
    cur_s, cur_e = dev[0]
    spans = []
    for s, e in dev[1:]:
        if s > cur_e:
            spans.append((cur_s, cur_e))
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    spans.append((cur_s, cur_e))
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        gap = s1 - e0
        if gap < min_us:
            continue
        mid = (e0 + s1) / 2
        open_ = [lb for lb in labels if lb[0] <= mid <= lb[1]]
        name = min(open_, key=lambda lb: lb[1] - lb[0])[2] if open_ else "(no phase)"
        tot, n = gaps.get(name, (0.0, 0))
        gaps[name] = (tot + gap / 1e3, n + 1)
    busy = sum(e - s for s, e in spans) / 1e3
    return {"span_ms": (spans[-1][1] - spans[0][0]) / 1e3, "busy_ms": busy,
            "gaps": {k: {"ms": v[0], "count": v[1]} for k, v in sorted(gaps.items(), key=lambda kv: -kv[1][0])}}


def profile_batch(ts: TerraScope, batch: int, args: argparse.Namespace, log: Log, trace: list[int],
                  settings: GenerationSettings, out: Path | None) -> None:
    """One shared-image batch from raw pixels under the profiler: GPU kernels by device time and host ops by
    CPU time, to the log (top entries) and ``profile_batch<N>_{gpu,cpu}.txt``; the GPU's idle gaps by phase
    (``gpu_gaps``) to the log, the chrome trace to ``profile_batch<N>.json.gz``."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    n_images = max(1, batch // 8)
    imgs = [[ImageInput(scene(args.big, args.big, 200 + i))] for i in range(n_images)]

    run_batch(ts, imgs, batch // n_images, args, trace, settings, "many")
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_batch(ts, imgs, batch // n_images, args, trace, settings, "many")
    log(f"[profile-batch {batch}] {time.perf_counter() - t0:.3f}s under the profiler")
    avg = prof.key_averages()
    for kind, key in (("gpu", "self_device_time_total"), ("cpu", "cpu_time_total")):
        table = avg.table(sort_by=key, row_limit=40)
        log(f"[profile-batch {batch}, by {key}]")
        for line in table.splitlines()[:18]:
            log("  " + line[:150])
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"profile_batch{batch}_{kind}.txt").write_text(table + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        raw = path.read_bytes()
    gaps = gpu_gaps(json.loads(raw))
    log(f"[gpu-gaps {batch}] span {gaps['span_ms']:.1f} ms, GPU busy {gaps['busy_ms']:.1f} ms; idle gaps >= 50 us "
        "by host phase: " + ", ".join(f"{k} {v['ms']:.1f} ms ({v['count']})" for k, v in gaps["gaps"].items()))
    if out is not None:
        (out / f"profile_batch{batch}.json.gz").write_bytes(gzip.compress(raw, 6))
        (out / f"gpu_gaps_batch{batch}.json").write_text(json.dumps(gaps, indent=1))
    fast_decode.release_decoders(ts.model)


# ---- main ------------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, log: Log) -> TerraScope:
    dev = torch.device(args.device)
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if args.shape == "tiny":
        cfg = TerraScopeConfig.from_dict(TINY)
    else:
        cfg = preset_config(args.preset)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ts = TerraScope.random(cfg, TOKENIZER, device=args.device, dtype=dtype, seed=0)
    sync(dev)
    n = sum(p.numel() for p in ts.model.parameters())
    msg = f"[build] {cfg.name}: {n / 1e9:.3f}B params, {dtype}, {time.perf_counter() - t0:.1f}s"
    if dev.type == "cuda":
        msg += f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB while building"
    log(msg)
    return ts


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default=None, help="terrascope-8b (cuda default) or terrascope-mini (cpu default)")
    p.add_argument("--shape", default="full", choices=["full", "tiny"], help="tiny: a toy model, to test the script")
    p.add_argument("--tokens", type=int, default=128, help="forced trace length")
    p.add_argument("--batches", default=None, help="throughput batch sizes (default 1,8,32 on cuda, none on cpu)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-repeats", type=int, default=2)
    p.add_argument("--tp-repeats", type=int, default=1)
    p.add_argument("--workloads", default=None, help="comma list of optical,pair,optical+sar")
    p.add_argument("--kernels", default="eager,compiled", help="decode-step variants to time; the fastest is used")
    p.add_argument("--attention", default="bmm,triton",
                   help="decode attention variants to time with each --kernels variant; the fastest pair is used")
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-kernel profile")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--early-ab", action="store_true",
                   help="also run the optical question and the shared batches with TERRASCOPE_SAM2_EARLY=1")
    p.add_argument("--shared-only", action="store_true", help="throughput: skip the distinct-image batches")
    p.add_argument("--prepare", default="many", choices=["many", "one"],
                   help="throughput: the batch's images through one ViT forward (Generator.prepare_many, default) "
                        "or one prepare per image")
    p.add_argument("--profile-batch", type=int, default=0, metavar="N",
                   help="profile one shared-image batch of N questions (GPU kernels and host ops), last")
    p.add_argument("--step-batch", default="4x8",
                   help="also time (and profile) the bare decode step at GROUPSxROWS, e.g. 4x8; '' skips")
    p.add_argument("--out", default=None, help="folder for bench_gpu.json and bench_gpu.log")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.preset = args.preset or ("terrascope-mini" if cpu else "terrascope-8b")
    if args.batches is None:
        args.batches = "" if cpu else "1,8,32"
    if args.workloads is None:
        args.workloads = "optical" if cpu else "optical,pair,optical+sar"
    # image sizes: 896x896 -> 4 tiles + thumbnail; CPU: one 512x512 tile; tiny: 112-px tiles
    if args.shape == "tiny":
        args.big, args.small = 224, 112
    else:
        args.big, args.small = (512, 512) if cpu else (896, 512)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out_dir = Path(args.out) if args.out else None
    log = Log(out_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu: CUDA is not available; use --device cpu --preset terrascope-mini", file=sys.stderr)
        return 2
    import transformers

    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "errors": [],
    }
    log(f"[env] {results['device']} torch {results['torch']} transformers {results['transformers']} "
        f"python {results['python']} threads {results['threads']}")
    torch.set_grad_enabled(False)
    ts = build(args, log)
    results["params"] = sum(p.numel() for p in ts.model.parameters())
    from model.preprocess import dynamic_tiles

    _, lay = dynamic_tiles(scene(args.big, args.big, 0), tile=ts.model.config.vision.image_size)
    results["optical_image"] = (f"{args.big}x{args.big}, {lay.n_grid_tiles} tile(s)"
                                + (" + thumbnail" if lay.thumbnail else ""))
    trace = forced_trace(ts, args.tokens)
    settings = GenerationSettings(max_new_tokens=4 * args.tokens + 256)

    def guarded(name: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001 - one broken section must not cost the whole device run
            log(f"[error] {name}: {exc!r}")
            results["errors"].append({"section": name, "error": repr(exc), "tb": traceback.format_exc()})
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return None

    # 1. bare decode step per (kernels, attention) variant (graph replay); pick the fastest pair for the rest
    prefix = 5 * ts.model.config.tokens_per_tile + 180
    variants = [(k, a) for k in args.kernels.split(",") if k for a in args.attention.split(",") if a]
    steps = []
    if dev.type == "cuda":
        for k, a in variants:
            r = guarded(f"decode-step:{k}/{a}", bench_decode_step, ts, k, a, prefix, 200, log)
            if r:
                steps.append(r)
    best = min(steps, key=lambda r: r["ms_per_step"]) if steps else None
    if dev.type == "cuda" and args.step_batch and best:
        g, r_ = (int(x) for x in args.step_batch.lower().split("x"))
        r = guarded(f"decode-step:batch{g}x{r_}", bench_decode_step, ts, best["kernels"], best["attention"], prefix,
                    200, log, g, r_)
        if r:
            steps.append(r)
    results["decode_step"] = steps
    args.kernels_chosen = best["kernels"] if best else "eager"
    args.attention_chosen = best["attention"] if best else "bmm"
    fast_decode.DEFAULT_KERNELS = args.kernels_chosen  # every decoder built below uses it
    os.environ[fast_decode.ATTENTION_ENV] = args.attention_chosen  # every decoder built below uses it
    results["kernels_chosen"], results["attention_chosen"] = args.kernels_chosen, args.attention_chosen
    log(f"[kernels] using {args.kernels_chosen}")
    fell_back = sorted({f"{r['attention_requested']}: {r['attention_reason']}" for r in steps
                        if r["attention"] != r["attention_requested"]})
    log(f"[attention] using {args.attention_chosen}" + (f" (fell back: {'; '.join(fell_back)})" if fell_back else ""))
    # 2. SAM-2 image encoder
    results["sam2_encode_ms"] = guarded("sam2-encode", bench_sam2_encode, ts, args)
    log(f"[sam2] encode {results['sam2_encode_ms']:.1f} ms" if results["sam2_encode_ms"] else "[sam2] failed")

    # 3. workloads: fast, then the naive baseline on the same question
    results["workloads"] = []
    for kind in [w for w in args.workloads.split(",") if w]:
        r = guarded(f"fast:{kind}", bench_workload, ts, kind, args, log, trace, settings, False)
        if r:
            results["workloads"].append(r)
        fast_decode.release_decoders(ts.model)
    if args.early_ab:  # the same question with the SAM-2 encode queued before decoding, for comparison
        os.environ["TERRASCOPE_SAM2_EARLY"] = "1"
        r = guarded("fast:optical:early-sam2", bench_workload, ts, "optical", args, log, trace, settings, False)
        if r:
            r["path"] = "fast, SAM-2 early"
            results["early_ab"] = r
        os.environ.pop("TERRASCOPE_SAM2_EARLY", None)
        fast_decode.release_decoders(ts.model)
    results["naive"] = []
    if not args.no_naive:
        kinds = ["optical"] if dev.type == "cuda" else [w for w in args.workloads.split(",") if w]
        for kind in kinds:
            r = guarded(f"naive:{kind}", bench_workload, ts, kind, args, log, trace, settings, True)
            if r:
                results["naive"].append(r)

    # 4. throughput
    results["throughput"] = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        for shared in (True,) if args.shared_only else (True, False):
            if b == 1 and not shared:
                continue  # one question: shared and distinct are the same run
            r = guarded(f"throughput:{b}:{shared}", bench_throughput, ts, b, shared, args, log, trace, settings)
            if r:
                results["throughput"].append(r)
            if args.early_ab and shared and b > 1:
                os.environ["TERRASCOPE_SAM2_EARLY"] = "1"
                r = guarded(f"throughput:{b}:{shared}:early", bench_throughput, ts, b, shared, args, log, trace,
                            settings)
                os.environ.pop("TERRASCOPE_SAM2_EARLY", None)
                if r:
                    results["throughput"].append(r)

    # 5. per-kernel profile, last: the profiler's instrumentation must not slow the timed runs above
    if dev.type == "cuda" and args.profile:
        guarded("profile", profile_decode_step, ts, args.kernels_chosen, args.attention_chosen, prefix, log, out_dir)
        if args.step_batch:
            g, r_ = (int(x) for x in args.step_batch.lower().split("x"))
            guarded("profile-batch", profile_decode_step, ts, args.kernels_chosen, args.attention_chosen, prefix,
                    log, out_dir, g, r_)

    if args.profile_batch:
        guarded("profile-batch-run", profile_batch, ts, args.profile_batch, args, log, trace, settings, out_dir)

    log.save(results)
    table(results, log)
    log.save(results)
    return 1 if results["errors"] else 0


def table(r: dict[str, Any], log: Log) -> None:
    fast = {w["kind"]: w for w in r.get("workloads", [])}
    naive = {w["kind"]: w for w in r.get("naive", [])}
    log("")
    log(f"== bench-gpu {r['date']} | {r['device']} | torch {r['torch']} | transformers {r['transformers']} ==")
    opt = fast.get("optical")
    if opt:
        log(f"optical {r.get('optical_image', '')}, {opt['tokens']}-token trace, {opt['seg']} [SEG] (regions "
            f"{opt['region_tokens']}):")
        log(f"  prefill            {opt['prefill_ms']:8.1f} ms   (vision {opt['vision_ms']:.1f} ms, "
            f"preprocess {opt['preprocess_ms']:.1f} ms)")
        log(f"  decode             {opt['decode_ms_per_token']:8.2f} ms/token (injections included)")
        if r.get("sam2_encode_ms"):
            log(f"  SAM-2 encode       {r['sam2_encode_ms']:8.1f} ms (once per image)")
        per_seg = (opt["seg_total_ms"] + opt.get("seg_wait_ms", 0)) / max(1, opt["seg"])
        log(f"  per [SEG]          {per_seg:8.1f} ms (mask decoder + selection + injection; host-visible)")
        log(f"  end to end         {opt['e2e_s']:8.3f} s/question")
        if "peak_gib" in opt:
            log(f"  peak GPU memory    {opt['peak_gib']:8.2f} GiB allocated ({opt['peak_reserved_gib']:.2f} reserved)")
    for kind in ("pair", "optical+sar"):
        w = fast.get(kind)
        if w:
            log(f"{kind:<12} e2e {w['e2e_s']:.3f} s, prefill {w['prefill_ms']:.1f} ms, decode "
                f"{w['decode_ms_per_token']:.2f} ms/token, peak {w.get('peak_gib', 0):.2f} GiB")
    ab = r.get("early_ab")
    if ab and opt:
        log(f"SAM-2 encoded before decoding (TERRASCOPE_SAM2_EARLY=1): e2e {ab['e2e_s']:.3f} s vs {opt['e2e_s']:.3f} s "
            "at the first [SEG]")
    for kind, n in naive.items():
        f = fast.get(kind)
        ratio = n["e2e_s"] / f["e2e_s"] if f else float("nan")
        log(f"naive {kind:<8} e2e {n['e2e_s']:.3f} s, decode {n['decode_ms_per_token']:.2f} ms/token -> "
            f"fast is {ratio:.2f}x faster end to end")
    for s in r.get("decode_step", []):
        if s.get("groups", 1) * s.get("rows", 1) > 1:
            log(f"decode step ({s['kernels']:8} {s['attention']:6}) batch {s['groups']}x{s['rows']}: "
                f"{s['ms_per_step']:.3f} ms")
            continue
        note = f" [asked {s['attention_requested']}]" if s["attention"] != s["attention_requested"] else ""
        log(f"decode step ({s['kernels']:8} {s['attention']:6}) {s['ms_per_step']:.3f} ms "
            f"({s['gb_s']:.0f} GB/s of weights){note}")
    if r.get("attention_chosen"):
        log(f"used: kernels={r.get('kernels_chosen')} attention={r['attention_chosen']}")
    for t in r.get("throughput", []):
        log(f"batch {t['batch']:>2} {'shared  ' if t['shared'] else 'distinct'} ({t['images']:>2} images) "
            f"{t['q_per_s']:7.2f} q/s" + ("  (SAM-2 early)" if t.get("sam2_early") else ""))
    if r.get("errors"):
        log(f"ERRORS in: {[e['section'] for e in r['errors']]}")


if __name__ == "__main__":
    raise SystemExit(main())
