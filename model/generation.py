"""Pixel-grounded generation: prefill, greedy/sampled decode, [SEG] -> mask -> token injection.

One ``VisualContext`` holds everything computed from the images (ViT tokens, layouts, the SAM-2 embedding
cache, optical/SAR relevance); it is built once and shared by every question about those images. The loop
keeps one live KV cache: a [SEG] step's hidden state prompts SAM-2, the selected visual tokens are fed as
``inputs_embeds`` at the next positions (nothing is re-encoded), then an optional grounding text span, and
decoding resumes from the last injected position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import fast_decode, prompting, selection
from .modeling_terrascope import Sam2Features, TerraScopeModel, mask_probabilities, text_relevance
from .preprocess import TileLayout, dynamic_tiles, normalize_tiles, resize_to, sam2_pixels, single_tile
from .types import (
    AnswerResult,
    GenerationSettings,
    GroundingFn,
    ImageInput,
    MaskCallback,
    MaskStep,
    StopFn,
    TokenCallback,
)


@dataclass
class VisualContext:
    """Everything derived from the images of one request (shared across its questions)."""

    kind: str  # "single" | "pair" | "series"
    pixels: list[np.ndarray]
    roles: list[str]
    layouts: list[TileLayout]
    token_counts: list[int]
    offsets: list[int]  # start of each image's block in ``vit_flat``
    vit_flat: torch.Tensor  # [N, H] projected visual tokens in prompt order
    sam_cache: dict[int, Sam2Features] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)


def _roles(images: list[ImageInput]) -> tuple[str, list[str]]:
    roles = [im.role for im in images]
    if not images:
        raise ValueError("at least one image is required")
    if len(images) == 1:
        if roles[0] not in ("optical", "sar", "t0"):
            raise ValueError(f"unknown image role {roles[0]!r}")
        return "single", roles
    if sorted(roles) == ["optical", "sar"]:
        return "pair", roles
    expected = [f"t{i}" for i in range(len(images))]
    if roles == expected:
        return "series", roles
    raise ValueError(f"image roles must be one image, an optical+sar pair, or t0..t{len(images) - 1} in order; "
                     f"got {roles}")


@torch.no_grad()
def prepare_images(model: TerraScopeModel, images: list[ImageInput]) -> VisualContext:
    """Validate, tile and encode the images (ViT + projector). SAM-2 runs lazily at the first [SEG]."""
    cfg = model.config
    t0 = time.perf_counter()
    kind, roles = _roles(images)
    pixels = [im.pixels for im in images]
    for i, p in enumerate(pixels):
        if not isinstance(p, np.ndarray) or p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            shape = getattr(p, "shape", None)
            dtype = getattr(p, "dtype", None)
            raise ValueError(f"images[{i}] ({roles[i]}): expected HxWx3 uint8 pixels, got shape {shape} {dtype}")
    if kind == "pair":
        order = [roles.index("optical"), roles.index("sar")]
        pixels = [pixels[order[0]], resize_to(pixels[order[1]], pixels[order[0]].shape[:2])]
        roles = ["optical", "sar"]
    tile = cfg.vision.image_size
    tiles, layouts = [], []
    for p in pixels:
        if kind == "single" or (kind == "pair" and cfg.compat == "native"):
            t, lay = dynamic_tiles(p, cfg.min_dynamic_patch, cfg.max_dynamic_patch, tile, cfg.use_thumbnail)
        else:
            t, lay = single_tile(p, tile)
        tiles.append(t)
        layouts.append(lay)
    t1 = time.perf_counter()
    pv = torch.from_numpy(normalize_tiles(np.concatenate(tiles)))
    vit = model.extract_feature(pv)
    vit_flat = vit.reshape(-1, vit.shape[-1])
    per_tile = cfg.tokens_per_tile
    counts = [lay.n_tiles * per_tile for lay in layouts]
    offsets = list(np.cumsum([0] + counts[:-1]).astype(int))
    if vit.device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return VisualContext(kind, pixels, roles, layouts, counts, [int(o) for o in offsets], vit_flat,
                         timings_ms={"preprocess_ms": (t1 - t0) * 1e3, "vision_ms": (t2 - t1) * 1e3})


@dataclass
class _Ids:
    eos: int
    seg: int
    region: int
    img_context: int
    answer_end: int
    stops: set[int]


@dataclass
class GenerationTrace:
    """Optional recorder for tests: every LM call's last logits and the [SEG] internals."""

    calls: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    segs: list[dict] = field(default_factory=list)
    prefill_hidden: torch.Tensor | None = None
    fed: list[torch.Tensor] = field(default_factory=list)  # every inputs_embeds chunk, in order
    cache: object | None = None  # the live KV cache at the end
    last_hidden: torch.Tensor | None = None  # hidden state of the last fed position


class Generator:
    """Runs one answer. Stateless between answers except for the shared ``VisualContext``."""

    def __init__(self, model: TerraScopeModel, tokenizer: prompting.TokenizerWrapper) -> None:
        self.model = model
        self.tok = tokenizer
        sp = tokenizer.special_ids()
        stops = {sp["eos"], sp["answer_end"]}
        for name in model.config.extra_stop_tokens:
            stops.add(tokenizer.token_id(name))
        self.ids = _Ids(sp["eos"], sp["seg"], sp["region"], sp["img_context"], sp["answer_end"], stops)

    # ---- pieces -------------------------------------------------------------------------------------------
    def prompt_ids(self, ctx: VisualContext, question: str, options: list[str] | None) -> list[int]:
        text = prompting.build_prompt(self.model.config.template, question, options, ctx.token_counts, ctx.roles)
        return self.tok.encode(text)

    def _beta(self, ctx: VisualContext, question: str) -> tuple[np.ndarray, np.ndarray] | None:
        if ctx.kind != "pair":
            return None
        q_ids = torch.tensor(self.tok.encode(question), dtype=torch.long)
        q = self.model.embed_ids(q_ids)
        n = ctx.token_counts[0]
        beta_opt = text_relevance(ctx.vit_flat[:n], q).cpu().numpy()
        beta_sar = text_relevance(ctx.vit_flat[n:2 * n], q).cpu().numpy()
        return beta_opt, beta_sar

    def sam_features(self, ctx: VisualContext, index: int) -> Sam2Features:
        if index not in ctx.sam_cache:
            g = torch.from_numpy(sam2_pixels(ctx.pixels[index], self.model.config.sam2.image_size))[None]
            ctx.sam_cache[index] = self.model.sam2_encode(g)
        return ctx.sam_cache[index]

    def _route(self, ctx: VisualContext, seg_count: int, text_so_far: str) -> int:
        n = len(ctx.pixels)
        if n == 1:
            return 0
        if self.model.config.compat == "official" and ctx.kind == "series":
            return seg_count % n  # the release's convention for several images
        role = prompting.route_marker(text_so_far)
        if role in ctx.roles:
            return ctx.roles.index(role)
        return 0

    def _select(self, ctx: VisualContext, image: int, mask_sel: np.ndarray, settings: GenerationSettings,
                lam: int, rng: np.random.Generator) -> list[int]:
        """Local token indices (inside the image's block) to inject for one mask."""
        cfg = self.model.config
        lay = ctx.layouts[image]
        side = cfg.tokens_per_side
        if settings.injection == "none":
            return []
        if cfg.compat == "official":
            if ctx.kind == "single":
                local = selection.official_tiled(mask_sel, lay, side, lam)
            else:
                local = selection.official_single_tile(mask_sel, lay.tile, side, lam)
        else:
            cov = selection.cell_coverage(mask_sel, side * lay.rows, side * lay.cols)
            local = selection._tile_order(cov > 0.5, side, lay.cols, lay.rows)
            if settings.injection == "mask":
                local = selection.uniform_sample(local, side, lay.cols, lam)
        if settings.injection == "box":
            local = selection.uniform_sample(selection.box_tokens(local, side, lay.cols, lay.rows), side,
                                             lay.cols, lam)
        elif settings.injection == "random":
            k = min(len(local), lam)
            pool = lay.n_grid_tiles * side * side
            local = sorted(rng.choice(pool, size=k, replace=False).tolist()) if k else []
        return local

    # ---- the loop ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ctx: VisualContext, question: str, options: list[str] | None = None,
            settings: GenerationSettings | None = None, on_token: TokenCallback | None = None,
            on_mask: MaskCallback | None = None, grounding: GroundingFn | None = None,
            should_stop: StopFn | None = None, forced_ids: list[int] | None = None,
            prompt_ids: list[int] | None = None, trace: GenerationTrace | None = None) -> AnswerResult:
        settings = settings or GenerationSettings()
        if settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if settings.injection not in ("mask", "box", "random", "none"):
            raise ValueError(f"unknown injection mode {settings.injection!r}")
        # ---- GPU fast path (model/fast_decode.py, GPU engineer): same semantics on a static KV cache with
        # CUDA graphs; default on CUDA for greedy decoding, TERRASCOPE_FAST_DECODE=0 turns it off.
        if trace is None and prompt_ids is None and fast_decode.enabled(self.model, settings):
            return fast_decode.fast_run(self, ctx, question, options, settings, on_token, on_mask, grounding,
                                        should_stop, forced_ids)
        model, cfg, ids = self.model, self.model.config, self.ids
        lam = settings.max_tokens_per_seg or cfg.max_tokens_per_seg
        rng = np.random.default_rng(settings.seed)
        sampler = torch.Generator(device="cpu").manual_seed(settings.seed)
        timings = dict(ctx.timings_ms)
        t_start = time.perf_counter()
        sam_ms = 0.0

        prompt = prompt_ids if prompt_ids is not None else self.prompt_ids(ctx, question, options)
        beta = self._beta(ctx, question)
        ids_t = torch.tensor(prompt, dtype=torch.long)
        embeds = model.embed_ids(ids_t)[None]
        img_pos = (ids_t == ids.img_context).nonzero()[:, 0].to(embeds.device)
        if img_pos.numel() != ctx.vit_flat.shape[0]:
            raise ValueError(f"prompt has {img_pos.numel()} image tokens but the images give "
                             f"{ctx.vit_flat.shape[0]}")
        embeds[0, img_pos] = ctx.vit_flat.to(embeds.dtype)
        cache = model.new_cache()
        hidden, logits = model.lm_forward(embeds, cache, 0)
        pos = len(prompt)
        if trace is not None:
            trace.calls.append(("prefill", logits[0, -1].cpu()))
            trace.prefill_hidden = hidden[0, -1].float().cpu()
            trace.fed.append(embeds)
            trace.cache = cache
        timings["prefill_ms"] = (time.perf_counter() - t_start) * 1e3

        out_ids: list[int] = []
        steps: list[MaskStep] = []
        emitted = ""
        n_choices = 0
        stopped = "max_new_tokens"

        def emit() -> None:
            nonlocal emitted
            if on_token is None:
                return
            full = self.tok.decode(out_ids)
            if full.endswith("\ufffd") or not full.startswith(emitted):
                return
            if len(full) > len(emitted):
                delta, emitted = full[len(emitted):], full
                on_token(delta)

        def choose(lg: torch.Tensor) -> int:
            nonlocal n_choices
            if forced_ids is not None and n_choices < len(forced_ids):
                tok = int(forced_ids[n_choices])
            elif settings.temperature > 0:
                probs = torch.softmax(lg.float().cpu() / settings.temperature, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=sampler))
            else:
                tok = int(lg.argmax())
            n_choices += 1
            return tok

        def feed_ids(new: list[int], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal pos
            emb = model.embed_ids(torch.tensor(new, dtype=torch.long))[None]
            h, lg = model.lm_forward(emb, cache, pos)
            pos += len(new)
            if trace is not None:
                trace.calls.append((kind, lg[0, -1].cpu()))
                trace.fed.append(emb)
                trace.last_hidden = h[0, -1]
            return h, lg

        t_dec = time.perf_counter()
        next_id = choose(logits[0, -1])
        while True:
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
            out_ids.append(next_id)
            emit()
            if next_id in ids.stops:
                stopped = "eos" if next_id == ids.eos else "answer"
                break
            if next_id != ids.seg:
                if len(out_ids) >= settings.max_new_tokens:
                    stopped = "max_new_tokens"
                    break
                hidden, logits = feed_ids([next_id], "step")
                next_id = choose(logits[0, -1])
                continue

            # ---- [SEG]: its last-layer hidden state prompts SAM-2 -------------------------------------
            hidden, logits = feed_ids([next_id], "step")  # logits of the [SEG] step are discarded
            t_sam = time.perf_counter()
            seg_hidden = hidden[:, -1]
            prompt_emb = model.seg_prompt(seg_hidden)
            text_so_far = self.tok.decode(out_ids)
            image = self._route(ctx, len(steps), text_so_far)
            feats = self.sam_features(ctx, image)
            dec = model.sam2_decode(feats, prompt_emb)
            own_hw = ctx.pixels[image].shape[:2]
            # official multi-image code sizes every frame's mask to the first image
            sel_hw = ctx.pixels[0].shape[:2] if (cfg.compat == "official" and ctx.kind != "single") else own_hw
            probs_sel = mask_probabilities(dec.low_res, sel_hw, cfg.sam2.image_size)[0]
            probs = probs_sel if tuple(sel_hw) == tuple(own_hw) else mask_probabilities(
                dec.low_res, own_hw, cfg.sam2.image_size)[0]
            empty = cfg.suppress_no_object and float(dec.object_score[0, 0]) <= 0
            mask_sel = np.zeros(sel_hw, bool) if empty else (probs_sel > 0.5).cpu().numpy()
            mask = np.zeros(own_hw, bool) if empty else (probs > 0.5).cpu().numpy()
            local = self._select(ctx, image, mask_sel, settings, lam, rng)
            if ctx.kind == "pair":
                n = ctx.token_counts[0]
                modality = selection.choose_modality(beta[0], beta[1], local) if beta else []
                flat_idx = [j + (n if m == "sar" else 0) for j, m in zip(local, modality)]
            else:
                modality = []
                flat_idx = [ctx.offsets[image] + j for j in local]
            step = MaskStep(step=len(steps), label=prompting.seg_label(text_so_far), image_index=image,
                            mask=mask, score=float(dec.iou[0, dec.best[0]]), token_indices=list(flat_idx),
                            modality=modality)
            sam_ms += (time.perf_counter() - t_sam) * 1e3
            if trace is not None:
                trace.segs.append({"hidden": seg_hidden.float().cpu(), "prompt": prompt_emb.float().cpu(),
                                   "iou": dec.iou.cpu(), "obj": dec.object_score.cpu(),
                                   "low_res": dec.low_res.cpu(), "probs": probs_sel.cpu(),
                                   "local": local, "image": image})
            if on_mask is not None:
                on_mask(step)
            last_logits = logits
            if flat_idx:
                region = ctx.vit_flat[torch.tensor(flat_idx, device=ctx.vit_flat.device)][None]
                if trace is not None:
                    trace.segs[-1]["region_embeds"] = region.float().cpu()
                h_reg, last_logits = model.lm_forward(region.to(model.dtype), cache, pos)
                pos += len(flat_idx)
                if trace is not None:
                    trace.calls.append(("region", last_logits[0, -1].cpu()))
                    trace.fed.append(region.to(model.dtype))
                    trace.last_hidden = h_reg[0, -1]
                out_ids.extend([ids.region] * len(flat_idx))
            if grounding is not None:
                span = grounding(step)
                if span:
                    step.grounding_text = span
                    g_ids = self.tok.encode(span)
                    if g_ids:
                        _, last_logits = feed_ids(g_ids, "grounding")
                        out_ids.extend(g_ids)
            steps.append(step)
            emit()
            if len(steps) >= settings.max_seg:
                stopped = "max_seg"
                break
            next_id = choose(last_logits[0, -1])

        timings["decode_ms"] = (time.perf_counter() - t_dec) * 1e3 - sam_ms
        timings["sam2_ms"] = sam_ms
        timings["total_ms"] = timings.get("preprocess_ms", 0) + timings.get("vision_ms", 0) + (
            time.perf_counter() - t_start) * 1e3
        timings["generated_tokens"] = float(len(out_ids))
        text = self.tok.decode(out_ids).strip()
        if on_token is not None:
            full = self.tok.decode(out_ids)
            if len(full) > len(emitted) and full.startswith(emitted):
                on_token(full[len(emitted):])
        reasoning, answer = prompting.parse_response(text)
        choice = prompting.extract_choice(text, len(options)) if options else None
        return AnswerResult(text=text, reasoning=reasoning, answer=answer, choice=choice, steps=steps,
                            token_ids=out_ids, timings_ms=timings, stopped=stopped)
