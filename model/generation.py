"""Pixel-grounded generation: prefill, greedy/sampled decode, [SEG] -> mask -> token injection.

One ``VisualContext`` holds everything computed from the images (ViT tokens, layouts, the SAM-2 embedding
cache, optical/SAR relevance); it is built once and shared by every question about those images
(``Generator.prepare_many`` builds several with one ViT forward, for a batch). The loop
keeps one live KV cache: a [SEG] step's hidden state prompts SAM-2, the selected visual tokens are fed as
``inputs_embeds`` at the next positions (nothing is re-encoded), then an optional grounding text span, and
decoding resumes from the last injected position. ``Generator.handle_segs`` is that [SEG] handling for one
answer or a batch; ``run`` and the fast path (model/fast_decode.py) both call it and differ only in how the
injected embeddings reach their KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from . import fast_decode, prompting, regions, selection
from .configuration_terrascope import TerraScopeConfig
from .modeling_terrascope import Sam2Features, TerraScopeModel, mask_probabilities, text_relevance
from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SAM2_MEAN,
    SAM2_STD,
    TileLayout,
    resize_to,
    sam2_resize,
    tile_images,
)
from .transfer import host_copy, host_pool, normalize_pixels, normalized_on, sam_frame_on
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
    #: GPU phases timed by CUDA events, resolved into ``timings_ms`` by ``timings()`` once they are done: a
    #: host sync only to time the ViT would idle the GPU while the host builds the prompts
    pending_ms: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=dict)
    #: image index -> its SAM-2 input resize, started on the host pool when the context is made (CUDA): at the
    #: first [SEG] of a batch of 32 the four 1024-px resizes kept the GPU idle for 37 ms
    sam_frames: dict[int, Future] = field(default_factory=dict)
    #: identity of this context's image prompt for the fast path's prefix cache (a key that cannot be reused
    #: by a later context at the same address, as ``id(ctx)`` could)
    prefix_token: object = field(default_factory=object)

    def timings(self) -> dict[str, float]:
        """``timings_ms`` with every pending GPU phase resolved (waits for those phases' end events)."""
        for key, (start, end) in list(self.pending_ms.items()):
            end.synchronize()
            self.timings_ms[key] = start.elapsed_time(end)
            del self.pending_ms[key]
        return dict(self.timings_ms)


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


@dataclass
class _HostImages:
    """One request after the host stage: validated, pair-aligned and tiled (uint8 tiles, normalised later)."""

    kind: str
    roles: list[str]
    pixels: list[np.ndarray]
    tiles: list[np.ndarray]
    layouts: list[TileLayout]


def _host_images(cfg: TerraScopeConfig, images: list[ImageInput]) -> _HostImages:
    """Validate the images, align a SAR image on its optical pair, and tile them (numpy/PIL only)."""
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
    tiles, layouts = tile_images(cfg, pixels, kind)
    return _HostImages(kind, roles, pixels, tiles, layouts)


def _context(model: TerraScopeModel, host: _HostImages, vit: torch.Tensor, timings: dict[str, float],
             vision: _VisionClock) -> VisualContext:
    """The ``VisualContext`` of one request from its projected ViT tokens [tiles, 256, H]."""
    counts = [lay.n_tiles * model.config.tokens_per_tile for lay in host.layouts]
    offsets = np.cumsum([0] + counts[:-1]).astype(int)
    ctx = VisualContext(host.kind, host.pixels, host.roles, host.layouts, counts, [int(o) for o in offsets],
                        vit.reshape(-1, vit.shape[-1]), timings_ms=dict(timings))
    vision.stamp(ctx)
    if model.device.type == "cuda":  # on a CPU the model's own threads have no idle time to fill
        size = model.config.sam2.image_size
        ctx.sam_frames = {i: host_pool().submit(sam_frame_on, model.device, p, size)
                          for i, p in enumerate(host.pixels)}
    return ctx


class _VisionClock:
    """Times the ViT forward: CUDA events (resolved later by ``VisualContext.timings``) on CUDA, the wall clock
    elsewhere (where the forward has finished when it returns)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.ms = 0.0
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        self.ms = (time.perf_counter() - self.t0) * 1e3

    def stamp(self, ctx: VisualContext) -> None:
        if self.cuda:
            ctx.pending_ms["vision_ms"] = (self.start, self.end)
        else:
            ctx.timings_ms["vision_ms"] = self.ms


@torch.no_grad()
def prepare_images(model: TerraScopeModel, images: list[ImageInput]) -> VisualContext:
    """Validate, tile and encode the images (ViT + projector). SAM-2 runs lazily at the first [SEG]."""
    t0 = time.perf_counter()
    host = _host_images(model.config, images)
    t1 = time.perf_counter()
    clock = _VisionClock(model.device)
    vit = model.extract_feature(normalized_on(model, host.tiles, IMAGENET_MEAN, IMAGENET_STD))
    clock.stop()
    return _context(model, host, vit, {"preprocess_ms": (t1 - t0) * 1e3}, clock)


@torch.no_grad()
def prepare_images_many(model: TerraScopeModel, images_list: Sequence[list[ImageInput]], *,
                        max_tiles: int | None = None) -> list[VisualContext]:
    """``prepare_images`` for several requests: host tiling in a thread pool, then ONE ViT + projector forward
    over every tile of every request (chunks of ``max_tiles`` tiles when given, to bound activation memory).

    The contexts equal ``prepare_images``'s one by one (bit for bit on CPU float32; the batch may change GPU
    kernels, so within bf16 rounding there). Each context's ``preprocess_ms`` / ``vision_ms`` are the whole
    batch's wall times (every request waited for all of it); ``prepare_batch`` is the number of requests.
    """
    if max_tiles is not None and max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    if not images_list:
        return []
    t0 = time.perf_counter()

    def host_stage(k: int) -> _HostImages:
        try:
            return _host_images(model.config, list(images_list[k]))
        except ValueError as exc:
            raise ValueError(f"images_list[{k}]: {exc}") from exc

    todo = range(len(images_list))
    with torch.profiler.record_function("ts:host_tiling"):  # phase labels for bench.gpu's gap profile
        staged = list(host_pool().map(host_stage, todo)) if len(images_list) > 1 else [host_stage(0)]
    t1 = time.perf_counter()
    clock = _VisionClock(model.device)
    with torch.profiler.record_function("ts:vit"):
        pv = normalized_on(model, [t for host in staged for t in host.tiles], IMAGENET_MEAN, IMAGENET_STD)
        step = max_tiles or pv.shape[0]
        vit = torch.cat([model.extract_feature(pv[i:i + step]) for i in range(0, pv.shape[0], step)])
    clock.stop()
    timings = {"preprocess_ms": (t1 - t0) * 1e3, "prepare_batch": float(len(images_list))}
    out, start = [], 0
    for host in staged:
        n = sum(t.shape[0] for t in host.tiles)
        out.append(_context(model, host, vit[start:start + n], timings, clock))
        start += n
    return out


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


def check_settings(settings: GenerationSettings) -> None:
    """Reject settings neither decode path can honour (shared by ``Generator.run`` and the fast path)."""
    if settings.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if settings.injection not in ("mask", "box", "random", "none"):
        raise ValueError(f"unknown injection mode {settings.injection!r}")


class AnswerState:
    """One answer's bookkeeping, shared by ``Generator.run`` and the fast path (one per batch row).

    Holds the ids so far (the [SEG] handling reads them for routing and labels), the streamed text, the mask
    steps and the per-answer inputs of token selection (λ, the seeded rng, the pair's modality relevance).
    """

    def __init__(self, gen: Generator, ctx: VisualContext, question: str, settings: GenerationSettings,
                 on_token: TokenCallback | None = None, on_mask: MaskCallback | None = None,
                 grounding: GroundingFn | None = None) -> None:
        self.tok = gen.tok
        self.ctx = ctx
        self.settings = settings
        self.lam = settings.max_tokens_per_seg or gen.model.config.max_tokens_per_seg
        self.rng = np.random.default_rng(settings.seed)
        self.beta = gen._beta(ctx, question)
        self.on_token, self.on_mask, self.grounding = on_token, on_mask, grounding
        self.out_ids: list[int] = []
        self.steps: list[MaskStep] = []
        self.drawn: list[regions.Drawn] = []  # earlier masks, for the phrase rules (settings.region_rules)
        self.emitted = ""
        self.sam_ms = 0.0

    def emit(self) -> None:
        """Stream the new text since the last call (held back while it ends in a partial UTF-8 character)."""
        if self.on_token is None:
            return
        full = self.tok.decode(self.out_ids)
        if full.endswith("\ufffd") or not full.startswith(self.emitted):
            return
        if len(full) > len(self.emitted):
            delta, self.emitted = full[len(self.emitted):], full
            self.on_token(delta)

    def result(self, options: list[str] | None, timings: dict[str, float], stopped: str) -> AnswerResult:
        """Flush the rest of the stream and parse the answer."""
        text = self.tok.decode(self.out_ids).strip()
        if self.on_token is not None:
            full = self.tok.decode(self.out_ids)
            if len(full) > len(self.emitted) and full.startswith(self.emitted):
                self.on_token(full[len(self.emitted):])
        reasoning, answer = prompting.parse_response(text)
        choice = prompting.extract_choice(text, len(options)) if options else None
        return AnswerResult(text=text, reasoning=reasoning, answer=answer, choice=choice, steps=self.steps,
                            token_ids=self.out_ids, timings_ms=timings, stopped=stopped)


@dataclass
class SegEvent:
    """An answer whose last fed token was [SEG]; ``hidden`` [H] is that step's last-layer hidden state."""

    state: AnswerState
    hidden: torch.Tensor


#: Writes one injected part into the caller's KV cache: (event index, "region" | "grounding", embeddings
#: [K, H] in the model dtype, the K ids that stand for them). ``Generator.run`` feeds it at once; the fast
#: path collects the parts and its decoder injects them in one step.
InjectFn = Callable[[int, str, torch.Tensor, list[int]], None]

#: Masks of at least this many pixels are selected in the thread pool (``handle_segs``).
PARALLEL_SELECT_PIXELS = 4_000_000
#: Images per batched SAM-2 image-encoder forward (``Generator.sam_features_many``): bounds its activations.
SAM2_MAX_FRAMES = 8


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
        """The prompt's ids. Tokenised with ONE image-context token per image, then each expanded to its count:
        the placeholder is an added special token, so the tokenizer splits around it either way and the ids
        are the same, but a 1,460-token string cost ~3.5 ms a question (a batch of 32 spent 113 ms here)."""
        return self.prompt_ids_many([(ctx, question, options)])[0]

    def prompt_ids_many(self, items: Sequence[tuple[VisualContext, str, list[str] | None]]) -> list[list[int]]:
        """``prompt_ids`` of several (context, question, options) in one tokenizer call: one at a time, the 32
        questions of a batch kept the GPU idle for ~25 ms."""
        template, img = self.model.config.template, self.ids.img_context
        texts = [prompting.build_prompt(template, q, o, [1] * len(c.token_counts), c.roles) for c, q, o in items]
        out = []
        for (ctx, question, options), ids in zip(items, self.tok.encode_many(texts)):
            counts = ctx.token_counts
            marks = [i for i, t in enumerate(ids) if t == img]
            if len(marks) != len(counts):  # the question itself spells the placeholder: tokenise the full text
                out.append(self.tok.encode(prompting.build_prompt(template, question, options, counts, ctx.roles)))
                continue
            full: list[int] = []
            start = 0
            for i, n in zip(marks, counts):
                full += ids[start:i] + [img] * n
                start = i + 1
            out.append(full + ids[start:])
        return out

    def _beta(self, ctx: VisualContext, question: str) -> tuple[np.ndarray, np.ndarray] | None:
        if ctx.kind != "pair":
            return None
        q_ids = torch.tensor(self.tok.encode(question), dtype=torch.long)
        q = self.model.embed_ids(q_ids)
        n = ctx.token_counts[0]
        beta_opt = text_relevance(ctx.vit_flat[:n], q).cpu().numpy()
        beta_sar = text_relevance(ctx.vit_flat[n:2 * n], q).cpu().numpy()
        return beta_opt, beta_sar

    def _sam_frame(self, ctx: VisualContext, index: int) -> np.ndarray | torch.Tensor:
        """The image's SAM-2 input resize: the one started with the context (on CUDA already on the device),
        else made now on the host."""
        started = ctx.sam_frames.pop(index, None)
        if started is not None:
            return started.result()
        return sam2_resize(ctx.pixels[index], self.model.config.sam2.image_size)

    def _sam_input(self, frames: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Normalised SAM-2 input [N, 3, S, S] on the model's device from uint8 frames (host or device)."""
        if all(isinstance(f, torch.Tensor) and f.device == self.model.device for f in frames):
            main = torch.cuda.current_stream(self.model.device)
            for f in frames:  # made on the upload stream, read on this one: keep the allocator off them
                f.record_stream(main)
            return normalize_pixels(torch.stack(list(frames)), SAM2_MEAN, SAM2_STD)
        host = [f.cpu().numpy() if isinstance(f, torch.Tensor) else f for f in frames]
        return normalized_on(self.model, np.stack(host), SAM2_MEAN, SAM2_STD)

    def sam_features(self, ctx: VisualContext, index: int) -> Sam2Features:
        if index not in ctx.sam_cache:
            ctx.sam_cache[index] = self.model.sam2_encode(self._sam_input([self._sam_frame(ctx, index)]))
        return ctx.sam_cache[index]

    @torch.no_grad()
    def sam_features_many(self, pairs: Sequence[tuple[VisualContext, int]],
                          max_frames: int = SAM2_MAX_FRAMES) -> list[Sam2Features]:
        """``sam_features`` of several (context, image) pairs; the uncached ones in ONE batched SAM-2 encode
        (or one per ``max_frames`` images: a 1024-px Hiera-L forward holds a few hundred MB per frame).

        The 1024-px host resizes run in the thread pool (PIL releases the GIL). Each context caches its own
        frame (a view of the batch), so later [SEG]s read it exactly as if ``sam_features`` had encoded it.
        """
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        todo: dict[tuple[int, int], tuple[VisualContext, int]] = {}
        for ctx, index in pairs:
            if not 0 <= index < len(ctx.pixels):
                raise ValueError(f"image index {index} out of range for a context of {len(ctx.pixels)} images")
            if index not in ctx.sam_cache:
                todo.setdefault((id(ctx), index), (ctx, index))
        if todo:
            work = list(todo.values())

            def host(k: int) -> np.ndarray:
                return self._sam_frame(*work[k])

            frames = list(host_pool().map(host, range(len(work)))) if len(work) > 1 else [host(0)]
            for lo in range(0, len(work), max_frames):
                chunk = work[lo:lo + max_frames]
                feats = self.model.sam2_encode(self._sam_input(frames[lo:lo + max_frames]))
                for k, (ctx, index) in enumerate(chunk):
                    ctx.sam_cache[index] = feats if len(chunk) == 1 else feats.frame(k)
        return [ctx.sam_cache[index] for ctx, index in pairs]

    def encode_sam_many(self, ctxs: Sequence[VisualContext], max_frames: int = SAM2_MAX_FRAMES) -> int:
        """Encode SAM-2 for every image of ``ctxs`` now, in one batched forward (returns how many were new).

        Lazily each image is encoded at its first [SEG], one per call; calling this before decoding a batch
        trades that for one batched encode, including images that may never be segmented.
        """
        pairs = [(ctx, i) for ctx in ctxs for i in range(len(ctx.pixels))]
        new = len({(id(c), i) for c, i in pairs if i not in c.sam_cache})
        self.sam_features_many(pairs, max_frames)
        return new

    def prepare_many(self, images_list: Sequence[list[ImageInput]], *, sam2: bool = False,
                     max_tiles: int | None = None) -> list[VisualContext]:
        """One ``VisualContext`` per request, the tiles of all requests through ONE ViT forward
        (``prepare_images_many``). ``sam2=True`` also encodes every image's SAM-2 features now, in batched
        forwards of up to ``SAM2_MAX_FRAMES`` images (``encode_sam_many``; timed as ``sam2_encode_ms``)."""
        ctxs = prepare_images_many(self.model, images_list, max_tiles=max_tiles)
        if sam2 and ctxs:
            dev = self.model.device
            t0 = time.perf_counter()
            self.encode_sam_many(ctxs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            for ctx in ctxs:
                ctx.timings_ms["sam2_encode_ms"] = (time.perf_counter() - t0) * 1e3
        return ctxs

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

    def prompt_embeds(self, ctx: VisualContext, ids: list[int]) -> torch.Tensor:
        """[S, H] embeddings of a prompt with the images' visual tokens at its image-context positions."""
        ids_t = torch.tensor(ids, dtype=torch.long)
        embeds = self.model.embed_ids(ids_t)
        img_pos = (ids_t == self.ids.img_context).nonzero()[:, 0].to(embeds.device)
        if img_pos.numel() != ctx.vit_flat.shape[0]:
            raise ValueError(f"prompt has {img_pos.numel()} image tokens but the images give "
                             f"{ctx.vit_flat.shape[0]}")
        embeds[img_pos] = ctx.vit_flat.to(embeds.dtype)
        return embeds

    # ---- [SEG] ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def handle_segs(self, events: list[SegEvent], inject: InjectFn, *,
                    wait_features: Callable[[VisualContext, int], None] | None = None,
                    trace_segs: list[dict] | None = None) -> float:
        """Handle the [SEG]s of one step, for one answer (``run``) or a batch of them (the fast path).

        Per event: the hidden state prompts SAM-2 (one batched mask decode for all events), the mask is routed
        to an image, tokens are selected, the ``MaskStep`` goes to ``on_mask``, the selected visual tokens and
        then the optional grounding span go to ``inject`` (the caller's cache write) and their ids to the
        answer. ``wait_features(ctx, image)`` runs before an image's SAM-2 features are read (the prefetch).
        Returns the ms spent before the callbacks (SAM-2, masks, selection).
        """
        t0 = time.perf_counter()
        model, cfg = self.model, self.model.config
        hidden = torch.stack([e.hidden for e in events])
        prompts = model.seg_prompt(hidden)
        plan: list[tuple[AnswerState, str, int]] = []
        for e in events:
            st = e.state
            text_so_far = self.tok.decode(st.out_ids)
            image = self._route(st.ctx, len(st.steps), text_so_far)
            if wait_features is not None:
                wait_features(st.ctx, image)
            plan.append((st, text_so_far, image))
        # images first segmented at this step are encoded together (one batched SAM-2 forward)
        feats = self.sam_features_many([(st.ctx, image) for st, _, image in plan])
        batch = feats[0] if len(feats) == 1 else Sam2Features(
            [torch.cat([f.image_embeddings[i] for f in feats]) for i in range(len(feats[0].image_embeddings))],
            feats[0].image_pe)
        dec = model.sam2_decode(batch, prompts)
        n = len(plan)
        sel_hw, own_hw = [], []
        for st, _, image in plan:
            ctx = st.ctx
            own = tuple(ctx.pixels[image].shape[:2])
            # official multi-image code sizes every frame's mask to the first image
            sel = tuple(ctx.pixels[0].shape[:2]) if (cfg.compat == "official" and ctx.kind != "single") else own
            sel_hw.append(sel)
            own_hw.append(own)
        empty = [cfg.suppress_no_object and o <= 0 for o in dec.object_score[:, 0].tolist()]
        scores = dec.iou.gather(1, dec.best[:, None])[:, 0].tolist()
        masks_sel: list[np.ndarray] = [np.zeros(0, bool)] * n
        masks_own: list[np.ndarray] = [np.zeros(0, bool)] * n
        probs_sel: list[torch.Tensor] = [dec.low_res.new_zeros(0)] * n  # kept for the trace
        for hws, out in ((sel_hw, masks_sel), (own_hw, masks_own)):
            for hw in set(hws):  # one interpolation and one device-to-host copy per mask size
                rows = [i for i in range(n) if hws[i] == hw]
                if out is masks_own and all(sel_hw[i] == hw for i in rows):
                    for i in rows:
                        out[i] = masks_sel[i]
                    continue
                idx = torch.tensor(rows, device=dec.low_res.device)
                probs = mask_probabilities(dec.low_res[idx], hw, cfg.sam2.image_size)
                host = host_copy(probs > 0.5)
                for j, i in enumerate(rows):
                    out[i] = np.zeros(hw, bool) if empty[i] else host[j]
                    if out is masks_sel:
                        probs_sel[i] = probs[j]

        labels = [prompting.seg_label(text_so_far) for _, text_so_far, _ in plan]
        rules: list[str | None] = [None] * n
        for i, (st, _, image) in enumerate(plan):
            if st.settings.region_rules:
                raw = masks_own[i]
                masks_own[i], rules[i] = regions.project(labels[i], image, raw, st.drawn)
                st.drawn.append(regions.Drawn(labels[i], image, raw, masks_own[i]))
                if rules[i] is not None:
                    masks_sel[i] = regions.resample(masks_own[i], sel_hw[i])

        def select(i: int) -> list[int]:
            st, _, image = plan[i]
            return self._select(st.ctx, image, masks_sel[i], st.settings, st.lam, st.rng)

        # threads only pay off for big masks: at 896 px a selection is ~0.15 ms of mostly GIL-held numpy, and
        # 32 of them took twice as long in the pool as in a loop; random injection keeps one rng order
        parallel = (n > 1 and masks_sel[0].size >= PARALLEL_SELECT_PIXELS
                    and all(p[0].settings.injection != "random" for p in plan))
        chosen = list(host_pool().map(select, range(n))) if parallel else [select(i) for i in range(n)]
        built: list[tuple[MaskStep, list[int]]] = []
        for i, (st, _, image) in enumerate(plan):
            ctx, local = st.ctx, chosen[i]
            if ctx.kind == "pair":
                n_opt = ctx.token_counts[0]
                modality = selection.choose_modality(st.beta[0], st.beta[1], local) if st.beta else []
                flat_idx = [j + (n_opt if m == "sar" else 0) for j, m in zip(local, modality)]
            else:
                modality = []
                flat_idx = [ctx.offsets[image] + j for j in local]
            step = MaskStep(step=len(st.steps), label=labels[i], image_index=image, mask=masks_own[i],
                            score=float(scores[i]), token_indices=list(flat_idx), modality=modality,
                            region_rule=rules[i])
            built.append((step, flat_idx))
        mask_ms = (time.perf_counter() - t0) * 1e3

        region_tokens = self._regions([(st.ctx, flat_idx) for (st, _, _), (_, flat_idx) in zip(plan, built)])
        for i, ((st, _, image), (step, flat_idx)) in enumerate(zip(plan, built)):
            ctx = st.ctx
            if trace_segs is not None:
                trace_segs.append({"hidden": hidden[i:i + 1].float().cpu(), "prompt": prompts[i:i + 1].float().cpu(),
                                   "iou": dec.iou[i:i + 1].cpu(), "obj": dec.object_score[i:i + 1].cpu(),
                                   "low_res": dec.low_res[i:i + 1].cpu(), "probs": probs_sel[i].cpu(),
                                   "local": chosen[i], "image": image})
            if st.on_mask is not None:
                st.on_mask(step)
            if flat_idx:
                region_ids = [self.ids.region] * len(flat_idx)
                inject(i, "region", region_tokens[i], region_ids)
                st.out_ids.extend(region_ids)
            if st.grounding is not None:
                span = st.grounding(step)
                if span:
                    step.grounding_text = span
                    g_ids = self.tok.encode(span)
                    if g_ids:
                        g_emb = model.embed_ids(torch.tensor(g_ids, dtype=torch.long)).to(model.dtype)
                        inject(i, "grounding", g_emb, g_ids)
                        st.out_ids.extend(g_ids)
            st.steps.append(step)
            st.emit()
        return mask_ms

    def _regions(self, picks: list[tuple[VisualContext, list[int]]]) -> list[torch.Tensor]:
        """The visual tokens ``vit_flat[flat_idx]`` of each (context, indices), one gather per context: one at
        a time, a batch's 32 index uploads and gathers kept the GPU idle for a few ms a [SEG] round."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(picks)
        by_ctx: dict[int, list[int]] = {}
        for i, (ctx, idx) in enumerate(picks):
            if idx:
                by_ctx.setdefault(id(ctx), []).append(i)
        for members in by_ctx.values():
            ctx = picks[members[0]][0]
            flat = [j for i in members for j in picks[i][1]]
            rows = ctx.vit_flat[torch.tensor(flat, device=ctx.vit_flat.device)].to(self.model.dtype)
            for i, part in zip(members, torch.split(rows, [len(picks[i][1]) for i in members])):
                out[i] = part
        return out

    # ---- the loop ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ctx: VisualContext, question: str, options: list[str] | None = None,
            settings: GenerationSettings | None = None, on_token: TokenCallback | None = None,
            on_mask: MaskCallback | None = None, grounding: GroundingFn | None = None,
            should_stop: StopFn | None = None, forced_ids: list[int] | None = None,
            prompt_ids: list[int] | None = None, trace: GenerationTrace | None = None) -> AnswerResult:
        settings = settings or GenerationSettings()
        check_settings(settings)
        # ---- GPU fast path (model/fast_decode.py, GPU engineer): same semantics on a static KV cache with
        # CUDA graphs; default on CUDA for greedy decoding, TERRASCOPE_FAST_DECODE=0 turns it off.
        if trace is None and prompt_ids is None and fast_decode.enabled(self.model, settings):
            return fast_decode.fast_run(self, ctx, question, options, settings, on_token, on_mask, grounding,
                                        should_stop, forced_ids)
        model, ids = self.model, self.ids
        sampler = torch.Generator(device="cpu").manual_seed(settings.seed)
        timings = ctx.timings()
        t_start = time.perf_counter()
        sam_ms = 0.0

        prompt = prompt_ids if prompt_ids is not None else self.prompt_ids(ctx, question, options)
        st = AnswerState(self, ctx, question, settings, on_token, on_mask, grounding)
        embeds = self.prompt_embeds(ctx, prompt)[None]
        cache = model.new_cache()
        hidden, logits = model.lm_forward(embeds, cache, 0)
        pos = len(prompt)
        if trace is not None:
            trace.calls.append(("prefill", logits[0, -1].cpu()))
            trace.prefill_hidden = hidden[0, -1].float().cpu()
            trace.fed.append(embeds)
            trace.cache = cache
        timings["prefill_ms"] = (time.perf_counter() - t_start) * 1e3

        out_ids = st.out_ids
        n_choices = 0
        stopped = "max_new_tokens"

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

        def feed(emb: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal pos
            h, lg = model.lm_forward(emb, cache, pos)
            pos += emb.shape[1]
            if trace is not None:
                trace.calls.append((kind, lg[0, -1].cpu()))
                trace.fed.append(emb)
                trace.last_hidden = h[0, -1]
            return h, lg

        last_logits = logits

        def inject(_: int, kind: str, emb: torch.Tensor, new: list[int]) -> None:
            """The [SEG] handling's cache write: feed each injected part now, on the live cache."""
            nonlocal last_logits
            if kind == "region" and trace is not None:
                trace.segs[-1]["region_embeds"] = emb[None].float().cpu()
            _, last_logits = feed(emb[None], kind)

        t_dec = time.perf_counter()
        next_id = choose(logits[0, -1])
        while True:
            if should_stop is not None and should_stop():
                stopped = "cancelled"
                break
            out_ids.append(next_id)
            st.emit()
            if next_id in ids.stops:
                stopped = "eos" if next_id == ids.eos else "answer"
                break
            if next_id != ids.seg:
                if len(out_ids) >= settings.max_new_tokens:
                    stopped = "max_new_tokens"
                    break
                hidden, logits = feed(model.embed_ids(torch.tensor([next_id], dtype=torch.long))[None], "step")
                next_id = choose(logits[0, -1])
                continue

            # ---- [SEG]: its last-layer hidden state prompts SAM-2; the logits of the [SEG] step are discarded
            hidden, last_logits = feed(model.embed_ids(torch.tensor([next_id], dtype=torch.long))[None], "step")
            sam_ms += self.handle_segs([SegEvent(st, hidden[0, -1])], inject,
                                       trace_segs=trace.segs if trace is not None else None)
            if len(st.steps) >= settings.max_seg:
                stopped = "max_seg"
                break
            next_id = choose(last_logits[0, -1])

        timings["decode_ms"] = (time.perf_counter() - t_dec) * 1e3 - sam_ms
        timings["sam2_ms"] = sam_ms
        timings["total_ms"] = timings.get("preprocess_ms", 0) + timings.get("vision_ms", 0) + (
            time.perf_counter() - t_start) * 1e3
        timings["generated_tokens"] = float(len(out_ids))
        return st.result(options, timings, stopped)
