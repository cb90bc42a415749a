"""Fast decode path: static KV cache, CUDA-graph decode and injection steps, shared image prefixes.

Why: the reference loop (one ``transformers`` forward per token on a ``DynamicCache``, ``.item()`` every
step) is bound by kernel launches and host round trips; at the 8B shape a decode step only has to stream
~14 GB of weights, ~5 ms on an H100, if the GPU never waits. So this module

* keeps every per-step tensor (token, position, KV cache, masks, hidden state) in preallocated buffers,
  so one CUDA graph replays a whole decode step (all layers, lm_head, argmax, teacher forcing);
* writes injections (the region tokens after a ``[SEG]``) into the same static cache with a second graph of
  fixed width: rows inject up to ``inject_len`` embeddings while the other rows of the batch decode their
  next token in the same replay. Neither graph is re-captured or recompiled by an injection;
* lets the host run one step behind the GPU (it launches step s+1 before reading step s's token through a
  pinned buffer), so the only waits are at ``[SEG]`` events (the mask needs the hidden state) and at the end;
* splits the cache into a prefix part shared by every question about the same image (the image tokens,
  prefilled once per image) and a per-question part, with one joint softmax over both, so a batch of
  questions about one image reads that image's KV once per step and never copies it;
* on CUDA, runs single-token steps' attention as one split-K Triton kernel pair (``decode_attention``)
  instead of four batched GEMMs and a softmax (``TERRASCOPE_DECODE_ATTENTION=triton|bmm``).

The decoder math is Qwen2 written out over the ``transformers`` module's own weights (q/k/v and gate/up are
fused in place as views, so no second copy of the weights exists and the ``transformers`` path keeps
working). Semantics follow the released inference loop (see ``reference_generate``): a token is appended
once it has been fed; a ``[SEG]`` step's logits are discarded; ``K`` injected embeddings append ``K``
placeholder ids; ``max_new_tokens`` counts those placeholders and is checked after ordinary tokens; the
``max_seg``-th ``[SEG]`` ends generation after its mask.

What a ``[SEG]`` does (SAM-2 decode, token selection, which embeddings to inject) is the caller's
``SegHandler``: ``answer_many`` wraps ``Generator.handle_segs`` (the same code ``Generator.run`` calls);
``SamSegHandler`` implements one from the model's primitives for the bench and tests.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling_terrascope import Sam2Features, TerraScopeModel, mask_probabilities
from .types import (
    AnswerResult,
    GenerationSettings,
    GroundingFn,
    MaskCallback,
    StopFn,
    TokenCallback,
)

if TYPE_CHECKING:  # generation imports this module; keep the import one-way at run time
    from .generation import AnswerState, Generator, VisualContext

log = logging.getLogger("terrascope.fast_decode")
NEG_INF = float("-inf")
#: Elementwise kernels inside the graphs: "eager" (plain torch ops) or "compiled" (Inductor-fused norm, rope
#: and SwiGLU; 1.2 ms a step faster at the 8B shape). TERRASCOPE_FAST_KERNELS chooses; unset, CUDA gets
#: "compiled" (Inductor emits Triton kernels there) and other devices "eager" (Inductor would need a C++
#: compiler). The compile happens once per process: the worker pays it in ``TerraScope.warm_up`` at load, and
#: a compile that fails switches that decoder to eager kernels (logged). ``make bench-gpu`` times both.
DEFAULT_KERNELS: str | None = os.environ.get("TERRASCOPE_FAST_KERNELS") or None


def default_kernels(device: torch.device) -> str:
    """The elementwise-kernel variant for a decoder on ``device`` (see ``DEFAULT_KERNELS``)."""
    return DEFAULT_KERNELS or ("compiled" if device.type == "cuda" else "eager")
#: Each (batch, width) shape of a compiled helper is one Dynamo specialisation; the default limit of 8 is
#: reached by a worker serving batches of 1, 8 and 32 and then silently falls back to eager kernels.
_RECOMPILE_LIMIT = 64
#: Held by graph captures: a capture must not see another thread's synchronous CUDA call (a pageable copy, an
#: allocation) while it records.
_CAPTURE_LOCK = threading.Lock()
#: Question prompts up to this many tokens a row are prefilled by a captured "ragged" graph (width buckets of
#: powers of two); longer ones run eagerly.
PROMPT_GRAPH_WIDTH = 64
#: Attention of single-token steps: "triton" (split-K kernel, CUDA), "bmm" (batched GEMMs + softmax) or "auto"
#: (triton where it can run). Read when a decoder is built; the ``attention`` arguments override it.
ATTENTION_ENV = "TERRASCOPE_DECODE_ATTENTION"
ATTENTION_MODES = ("auto", "triton", "bmm")


def attention_request(attention: str | None = None) -> str:
    """The requested attention mode: ``attention`` if given, else ``$TERRASCOPE_DECODE_ATTENTION``, else auto."""
    value = attention if attention is not None else os.environ.get(ATTENTION_ENV, "auto")
    mode = value.strip().lower() or "auto"
    if mode not in ATTENTION_MODES:
        src = "attention" if attention is not None else ATTENTION_ENV
        raise ValueError(f"{src} must be one of {', '.join(ATTENTION_MODES)}, got {value!r}")
    return mode


# ---- data passed in and out ----------------------------------------------------------------------------------
@dataclass
class DecodeSettings:
    """Stop rules (ids, not text: the engine never sees a tokenizer)."""

    stop_ids: tuple[int, ...]
    seg_id: int
    max_new_tokens: int = 512
    max_seg: int = 20


@dataclass
class RowInput:
    """One question: its prompt embeddings after the shared prefix of ``group`` (at least one)."""

    group: int
    embeds: torch.Tensor  # [S, H]
    forced: Sequence[int] | None = None  # teacher-forced ids by emitted position, -1 = free; None = greedy


@dataclass
class RowOutput:
    token_ids: list[int]
    stopped: str  # "eos" | "max_new_tokens" | "max_seg" | "cancelled"
    n_seg: int


@dataclass
class SegRequest:
    """A row fed ``[SEG]``: ``hidden`` is the last-layer (normed) hidden state of that step."""

    row: int
    group: int
    seg_index: int  # 0-based count of this row's [SEG]s
    hidden: torch.Tensor  # [H]
    token_ids: list[int]


@dataclass
class SegInjection:
    """What to feed after a ``[SEG]``: ``embeds`` [K, H] and the K ids that stand for them in the output."""

    embeds: torch.Tensor
    token_ids: list[int]


SegHandler = Callable[[list[SegRequest]], list[SegInjection]]
TokenFn = Callable[[int, int], None]  # (row, token id)


@dataclass
class DecodeStats:
    """Where the time of one ``generate`` went (host clock; the host waits only where noted)."""

    suffix_prefill_ms: float = 0.0
    total_ms: float = 0.0
    seg_ms: float = 0.0  # [SEG] handling: sync + handler (SAM-2 decode, selection) + injection launch
    handler_ms: float = 0.0  # the part of seg_ms spent inside the SegHandler (host + SAM-2 mask decode)
    decode_steps: int = 0
    inject_steps: int = 0
    graphed: bool = False
    seg_events: int = 0


# ---- weights -------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    wqkv: torch.Tensor
    bqkv: torch.Tensor
    wo: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor
    ln1: torch.Tensor
    ln2: torch.Tensor


def _rebind(linear: nn.Linear, name: str, tensor: torch.Tensor) -> None:
    setattr(linear, name, nn.Parameter(tensor, requires_grad=False))


def _adjacent(parts: Sequence[torch.Tensor]) -> bool:
    """True when ``parts`` are consecutive row blocks of one storage (our fused layout)."""
    first = parts[0]
    off = first.storage_offset()
    for t in parts:
        if (t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or t.storage_offset() != off
                or not t.is_contiguous()):
            return False
        off += t.numel()
    return True


@torch.no_grad()
def fuse_llm_weights(model: TerraScopeModel) -> list[_Layer]:
    """Fuse q/k/v and gate/up of every decoder layer in place (the Linear weights become views).

    One GEMV for the three projections and one for [gate|up]; the views keep the ``transformers``
    modules computing exactly what they did, with no second copy of the weights. Re-fuses if something
    (e.g. ``model.to``) replaced the views by separate tensors.
    """
    layers = []
    for layer in model.language_model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv_w = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
        qkv_b = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
        if not (_adjacent(qkv_w) and _adjacent(qkv_b)):
            wqkv, bqkv = torch.cat(qkv_w, 0), torch.cat(qkv_b, 0)
            lo = 0
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                hi = lo + lin.out_features
                _rebind(lin, "weight", wqkv[lo:hi])
                _rebind(lin, "bias", bqkv[lo:hi])
                lo = hi
        if not _adjacent([m.gate_proj.weight, m.up_proj.weight]):
            ni = m.gate_proj.out_features
            wgu = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0)
            _rebind(m.gate_proj, "weight", wgu[:ni])
            _rebind(m.up_proj, "weight", wgu[ni:])
        q, b, g = a.q_proj.weight, a.q_proj.bias, m.gate_proj.weight
        rows = q.shape[0] + a.k_proj.out_features + a.v_proj.out_features
        wqkv = q.as_strided((rows, q.shape[1]), q.stride())
        bqkv = b.as_strided((rows,), (1,))
        wgu = g.as_strided((g.shape[0] + m.up_proj.out_features, g.shape[1]), g.stride())
        layers.append(_Layer(wqkv, bqkv, a.o_proj.weight, wgu, m.down_proj.weight,
                             layer.input_layernorm.weight, layer.post_attention_layernorm.weight))
    return layers


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm exactly: normalise in float32, round to the input dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin with rotate_half's sign folded into ``sin_signed`` (same roundings)."""
    *lead, d = x.shape
    flipped = x.reshape(*lead, 2, d // 2).flip(-2).reshape(*lead, d)
    return x * cos + flipped * sin_signed


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    n = gu.shape[-1] // 2
    return F.silu(gu[..., :n]) * gu[..., n:]


def _rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor, kr: torch.Tensor, vr: torch.Tensor,
             index: tuple[torch.Tensor, ...], nh: int, kvh: int) -> torch.Tensor:
    """RoPE on q and k, k and v written into the row cache, q returned as [G, kvh, R, g, L, d].

    ``index_put_`` (not ``scatter_``) so that Inductor fuses all of it into one kernel writing the cache
    in place (with ``scatter_`` it clones the whole cache).
    """
    _, L, _, d = qkv.shape
    G, R = kr.shape[0], kr.shape[2]
    qk = _rope(qkv[:, :, : nh + kvh], cos, sin_s)
    kr.index_put_(index, qk[:, :, nh:].reshape(G, R, L, kvh, d).permute(0, 3, 1, 2, 4))
    vr.index_put_(index, qkv[:, :, nh + kvh:].reshape(G, R, L, kvh, d).permute(0, 3, 1, 2, 4))
    return qk[:, :, :nh].reshape(G, R, L, kvh, nh // kvh, d).permute(0, 3, 1, 4, 2, 5).contiguous()


def _joint_softmax(sp: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
    """One softmax over the prefix scores and the row scores (concatenated on the key axis)."""
    return torch.cat((sp, sr), -1).softmax(-1)


def _raise_recompile_limit() -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _RECOMPILE_LIMIT))


@dataclass(frozen=True)
class _Elementwise:
    """The elementwise chains of a step: plain torch ops, or Inductor-fused kernels.

    Graph bodies (fixed shapes) take ``compiled(dynamic=False)``. Eager multi-token steps (prefix and question
    prefills, wide injections) take ``compiled(dynamic=True)``: one shape-generic kernel per chain instead of
    a recompile per length. Eager, the SwiGLU and norm chains ran as generic strided kernels, about a third
    of the prefix prefill's GPU time at batch 32."""

    rms: Callable
    rope: Callable
    rope_kv: Callable
    silu_mul: Callable
    softmax: Callable

    @staticmethod
    def eager() -> _Elementwise:
        return _Elementwise(_rms, _rope, _rope_kv, _silu_mul, _joint_softmax)

    @staticmethod
    def compiled(dynamic: bool) -> _Elementwise:
        c = (lambda f: torch.compile(f, dynamic=True)) if dynamic else torch.compile
        return _Elementwise(c(_rms), c(_rope), c(_rope_kv), c(_silu_mul), c(_joint_softmax))


# ---- the engine ----------------------------------------------------------------------------------------------
class _Pending:
    """Tokens of one launched step: read through a pinned buffer after its event (CUDA) or directly (CPU)."""

    def __init__(self, tok: torch.Tensor, host: torch.Tensor | None) -> None:
        if host is None:
            self._values: list[int] | None = tok.tolist()
            self._event = None
        else:
            host.copy_(tok, non_blocking=True)
            self._host = host
            self._event = torch.cuda.Event()
            self._event.record()
            self._values = None

    def tokens(self) -> list[int]:
        if self._values is None:
            self._event.synchronize()
            self._values = self._host.tolist()
        return self._values


class FastDecoder:
    """Static-cache greedy decoder for ``groups`` x ``rows_per_group`` questions.

    Build once per shape (``get_decoder`` caches them on the model), then per batch: ``set_prefix`` for each
    group (the shared image prompt), then ``generate``. CUDA graphs are captured on first use when the model
    is on CUDA (``use_graphs``); on CPU every step runs eagerly through the same code.

    ``attention`` ("auto", "triton", "bmm"; None reads ``TERRASCOPE_DECODE_ATTENTION``) picks the attention
    of single-token steps; ``self.attention`` is what runs and ``self.attention_reason`` why not Triton.
    """

    #: attention of eager multi-token steps (question prompts; injections outside a graph): "sdpa"
    #: (``_prefill_attend``) or "bmm" (what the captured injection graphs run)
    prefill_attention = "sdpa"

    def __init__(self, model: TerraScopeModel, *, groups: int = 1, rows_per_group: int = 1,
                 max_prefix: int, max_row_len: int, inject_len: int = 16,
                 use_graphs: bool | None = None, kernels: str = "eager", attention: str | None = None) -> None:
        lm = model.language_model.model
        cfg = lm.config
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.G, self.R = int(groups), int(rows_per_group)
        self.B = self.G * self.R
        self.P = int(max_prefix)
        self.S = int(max_row_len)
        self.Linj = int(inject_len)
        if min(self.G, self.R, self.P, self.S, self.Linj) < 1:
            raise ValueError("FastDecoder: groups, rows_per_group, max_prefix, max_row_len, inject_len must be >= 1")
        if self.S <= self.Linj + 1:
            raise ValueError(f"max_row_len {self.S} must exceed inject_len {self.Linj} + 1")
        self.nh = cfg.num_attention_heads
        self.kvh = cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.g = self.nh // self.kvh
        self.H = cfg.hidden_size
        self.eps = float(lm.norm.variance_epsilon)
        self.scale = self.d ** -0.5
        self.layers = fuse_llm_weights(model)
        self.embed_w = lm.embed_tokens.weight
        self.norm_w = lm.norm.weight
        self.lm_head_w = model.language_model.lm_head.weight
        self.inv_freq = lm.rotary_emb.inv_freq.to(self.device, torch.float32)
        self.rope_scale = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        if use_graphs is None:
            use_graphs = self.device.type == "cuda"
        if use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.use_graphs = bool(use_graphs)
        self.kernels = kernels
        self.kernels_reason = ""  # why "compiled" was given up, if it was
        self._fused = self._multi = _Elementwise.eager()  # graph bodies / eager multi-token steps
        if kernels == "compiled":  # fuse the elementwise chains (norm, rope + cache write, SwiGLU, softmax)
            _raise_recompile_limit()
            self._fused, self._multi = _Elementwise.compiled(dynamic=False), _Elementwise.compiled(dynamic=True)
        elif kernels != "eager":
            raise ValueError(f"kernels must be 'eager' or 'compiled', got {kernels!r}")
        self._alloc()
        self.lm_head_mode = self._pick_lm_head()
        self._da = None  # the decode_attention module once the Triton path is chosen (imported lazily)
        self._attn_ws: dict[tuple[int, int], object] = {}  # (pb, sb) -> its decode_attention.Workspace
        self.attention, self.attention_reason = self._resolve_attention(attention_request(attention))
        self._graphs: dict[tuple[str, int, int, int], torch.cuda.CUDAGraph] = {}
        self._cur_pb = self.P
        self.prefix_keys: dict[int, tuple] = {}  # group -> what its prefix cache holds (reused across calls)
        self._pool = None
        self._ring = None
        self._ring_i = 0
        if self.device.type == "cuda":
            self._ring = torch.zeros(8, self.B, dtype=torch.long, pin_memory=True)

    # ---- buffers ------------------------------------------------------------------------------------------
    def _alloc(self) -> None:
        n, G, R, B = len(self.layers), self.G, self.R, self.B
        kw = {"device": self.device, "dtype": self.dtype}
        self.k_pre = torch.zeros(n, G, self.kvh, self.P, self.d, **kw)
        self.v_pre = torch.zeros_like(self.k_pre)
        self.k_row = torch.zeros(n, G, self.kvh, R, self.S, self.d, **kw)
        self.v_row = torch.zeros_like(self.k_row)
        li = {"device": self.device, "dtype": torch.long}
        self.prefix_len = torch.zeros(G, **li)
        self.pmask = torch.full((G * self.kvh, 1, self.P), NEG_INF, **kw)
        self.pos = torch.zeros(B, **li)
        self.tok = torch.zeros(B, **li)
        self.count = torch.zeros(B, **li)
        self.forced = torch.full((B, 1), -1, **li)
        self.seg_id = torch.zeros((), **li)
        self.hidden_out = torch.zeros(B, self.H, **kw)
        self.rag_cap = max(self.Linj, PROMPT_GRAPH_WIDTH)  # widest graphed multi-token step
        self.rag_embeds = torch.zeros(B, self.rag_cap, self.H, **kw)
        self.rag_nvalid = torch.ones(B, **li)
        self.rag_emit = torch.ones(B, dtype=torch.bool, device=self.device)
        self.ones_b = torch.ones(B, **li)
        self.arange_b = torch.arange(B, **li)
        self.slots = torch.arange(self.S, **li)
        # broadcast index pieces of the row-cache write [G, kvh, R, L] (the slot part is per step)
        self.idx_g = torch.arange(G, **li).view(G, 1, 1, 1)
        self.idx_h = torch.arange(self.kvh, **li).view(1, self.kvh, 1, 1)
        self.idx_r = torch.arange(R, **li).view(1, 1, R, 1)
        self.cap = self.S - self.Linj - 1  # positions are clamped here so no write leaves the cache

    # ---- decode attention ----------------------------------------------------------------------------------
    def _resolve_attention(self, request: str) -> tuple[str, str]:
        """("triton" | "bmm", why not triton). Triton runs on CUDA; on CPU only when asked for explicitly under
        ``TRITON_INTERPRET=1`` (kernel tests). An unavailable Triton is logged, never an error."""
        if request == "bmm":
            return "bmm", "requested"
        from . import decode_attention as da

        if self.device.type != "cuda" and not (request == "triton" and da.interpreting()):
            return "bmm", f"{self.device.type} device (the kernel is CUDA-only outside TRITON_INTERPRET=1)"
        reason = da.unavailable_reason()
        if reason is not None:
            if request == "triton":
                log.warning("decode attention: Triton requested but unavailable (%s); using bmm", reason)
            return "bmm", reason
        self._da = da
        return "triton", ""

    def _fallback(self, reason: str) -> None:
        log.warning("decode attention: the Triton kernel is unusable here (%s); using bmm", reason)
        self.attention, self.attention_reason = "bmm", reason
        self._attn_ws.clear()

    def _attn_workspace(self, pb: int, sb: int):
        """The kernel's buffers for this bucket, created (and the kernel checked) on first use; None = bmm.

        Called before a graph is captured (``_capture``), so a capture never allocates or compiles here. A
        kernel that fails to compile or disagrees with the bmm math switches this decoder to bmm (logged).
        """
        if self.attention != "triton":
            return None
        ws = self._attn_ws.get((pb, sb))
        if ws is not None:
            return ws
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"decode attention buffers for bucket ({pb}, {sb}) were not prepared before capture")
        try:
            ws = self._da.Workspace.create(self.G, self.kvh, self.R, self.g, self.d, pb, sb, self.dtype,
                                           self.device)
            reason = self._da.self_check(ws, self.P, self.S, self.scale)
        except Exception as exc:  # noqa: BLE001 - any failure of the optional kernel falls back to bmm
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            self._fallback(reason)
            return None
        self._attn_ws[(pb, sb)] = ws
        return ws

    def _pick_lm_head(self) -> str:
        """How the lm_head GEMM is laid out: "xw" (x @ W.T) or "wx" ((W @ x.T), argmax over the vocab axis).

        Why: at batch 32 on an H100/H200, cuBLAS runs x @ W.T (152k-wide output) with an sm75-era kernel at a
        third of the bandwidth of the other layouts (1.2 ms a step instead of ~0.4). Timed once per decoder on
        CUDA with more than one row; batch 1 and other devices keep "xw"."""
        if self.device.type != "cuda" or self.B == 1:
            return "xw"
        x = torch.randn(self.B, self.H, device=self.device, dtype=self.dtype)
        w = self.lm_head_w
        runs = {"xw": lambda: (x @ w.t()).argmax(-1), "wx": lambda: (w @ x.t()).argmax(0)}
        best, best_ms = "xw", float("inf")
        for name, fn in runs.items():
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end) / 5
            if ms < best_ms:
                best, best_ms = name, ms
        return best

    def _prefill_mask(self, lim: torch.Tensor, pb: int, sb: int) -> torch.Tensor:
        """[G, 1, R*g*L, pb + R*sb] bool: a query (row r, head j of a KV head, token t) sees its group's valid
        prefix slots and the slots of its own row up to its position ``lim[b, t]``."""
        G, R, L, g = self.G, self.R, lim.shape[1], self.g
        dev = self.device
        pre = torch.arange(pb, device=dev)[None, :] < self.prefix_len[:, None]  # [G, pb]
        pre = pre[:, None, None, None, :].expand(G, R, g, L, pb)
        same = torch.eye(R, dtype=torch.bool, device=dev)[None, :, None, :, None]  # q row r, key row r'
        upto = self.slots[:sb][None, None, None, None, :] <= lim.view(G, R, L, 1, 1)
        row = (same & upto).view(G, R, 1, L, R * sb).expand(G, R, g, L, R * sb)
        return torch.cat((pre, row), -1).reshape(G, 1, R * g * L, pb + R * sb)

    def _prefill_attend(self, q: torch.Tensor, li: int, pb: int, sb: int, mask: torch.Tensor) -> torch.Tensor:
        """Attention of L tokens a row through ``scaled_dot_product_attention``, one call per layer for the
        batch: per KV head, the queries of its g heads in every row of a group are one query block over [the
        group's prefix ; every row of the group], ``mask`` keeping each row to its own slots. Returns ``o`` in
        the bmm path's layout [G, kvh, R, g, L, d] (the query block's own order: no copy either way).

        Why: the bmm path materialises [G*kvh, R*g*L, pb] scores, concatenates and slices them; at batch 32
        with 45-token prompts that was most of a 125 ms prefill. Folding the g query heads into the block
        instead of repeating K/V g times saved the copies too."""
        G, R, kvh, g, d = self.G, self.R, self.kvh, self.g, self.d
        L = q.shape[4]
        qq = q.reshape(G, kvh, R * g * L, d)
        kk = torch.cat((self.k_pre[li, :, :, :pb], self.k_row[li, :, :, :, :sb].reshape(G, kvh, R * sb, d)), 2)
        vv = torch.cat((self.v_pre[li, :, :, :pb], self.v_row[li, :, :, :, :sb].reshape(G, kvh, R * sb, d)), 2)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale)  # [G, kvh, R*g*L, d]
        return o.view(G, kvh, R, g, L, d)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_pre, self.v_pre, self.k_row, self.v_row))

    # ---- the decoder math ------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, n_valid: torch.Tensor, emit: torch.Tensor, pb: int, sb: int,
                 fused: bool = False) -> None:
        """``_step``; a single-token step whose Triton attention raises (outside a capture) falls back to bmm
        and runs again: nothing a step writes before its end (K/V at the rows' positions) changes its inputs."""
        kernel = self.attention == "triton" and x.shape[1] == 1
        if kernel and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            try:
                return self._step(x, n_valid, emit, pb, sb, fused)
            except Exception as exc:  # noqa: BLE001 - the optional kernel must not take generation down
                self._fallback(f"the kernel raised in a step: {type(exc).__name__}: {exc}")
        return self._step(x, n_valid, emit, pb, sb, fused)

    def _step(self, x: torch.Tensor, n_valid: torch.Tensor, emit: torch.Tensor, pb: int, sb: int,
              fused: bool) -> None:
        """Run rows' tokens ``x`` [B, L, H] at their positions; update cache, hidden_out, tok, pos, count.

        Attention reads the first ``pb`` prefix slots and ``sb`` row slots only (length buckets: a step
        never streams the unused tail of the cache). Row b's first ``n_valid[b]`` tokens are real; the rest
        are padding whose cache writes land beyond the row's new position, where the causal mask hides them
        until real tokens overwrite them. ``fused`` uses the compiled elementwise helpers (graph bodies).
        """
        ops = self._fused if fused else self._multi
        rms, rope_kv, silu_mul, softmax = ops.rms, ops.rope_kv, ops.silu_mul, ops.softmax
        G, R, B, kvh, g, d = self.G, self.R, self.B, self.kvh, self.g, self.d
        L = x.shape[1]
        nh = self.nh
        ar = torch.arange(L, device=self.device)
        lim = self.pos[:, None] + ar[None, :]  # [B, L] last visible row slot of each query
        ws = self._attn_workspace(pb, sb) if L == 1 else None  # the kernel reads prefix_len and pos itself
        # graph bodies (their warm-up runs included, so a capture never meets an uninitialised cuBLAS path)
        # keep the bmm math; eager multi-token steps take SDPA
        sdpa = L > 1 and self.prefill_attention == "sdpa" and not (fused and self.use_graphs)
        if sdpa:
            sdpa_mask = self._prefill_mask(lim, pb, sb)
        elif ws is None:
            row_mask = torch.where(self.slots[None, None, :sb] <= lim[..., None], 0.0, NEG_INF).to(self.dtype)
            row_mask = row_mask.view(G, 1, R, 1, L, sb).expand(G, kvh, R, g, L, sb).reshape(G * kvh * R, g * L, sb)
            pmask = self.pmask[:, :, :pb]
        plen = self.prefix_len[:, None].expand(G, R).reshape(B)
        abs_pos = (plen + self.pos)[:, None] + ar[None, :]  # [B, L]
        freqs = abs_pos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, :, None, :]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        half = d // 2
        sin_s = torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, :, None, :]
        index = (self.idx_g, self.idx_h, self.idx_r, lim.view(G, 1, R, L))
        h = x.reshape(B * L, self.H)
        for li, w in enumerate(self.layers):
            n1 = rms(h, w.ln1, self.eps)
            qkv = torch.addmm(w.bqkv, n1, w.wqkv.t()).view(B, L, nh + 2 * kvh, d)
            kr, vr = self.k_row[li], self.v_row[li]  # [G, kvh, R, S, d]
            q = rope_kv(qkv, cos, sin_s, kr, vr, index, nh, kvh)
            if sdpa:  # eager multi-token steps (a batch's question prompts): fused attention, no score tensors
                o = self._prefill_attend(q, li, pb, sb, sdpa_mask)
            elif ws is not None:  # one split-K kernel pair: prefix + row keys, joint softmax, no masks
                o = self._da.decode_attention(q, self.k_pre[li, :, :, :pb], self.v_pre[li, :, :, :pb],
                                              self.prefix_len, kr[:, :, :, :sb], vr[:, :, :, :sb], self.pos,
                                              self.scale, ws)
            else:
                kp = self.k_pre[li, :, :, :pb].reshape(G * kvh, pb, d)
                vp = self.v_pre[li, :, :, :pb].reshape(G * kvh, pb, d)
                krb = kr[:, :, :, :sb].reshape(G * kvh * R, sb, d)
                vrb = vr[:, :, :, :sb].reshape(G * kvh * R, sb, d)
                sp = torch.baddbmm(pmask, q.view(G * kvh, R * g * L, d), kp.transpose(1, 2), alpha=self.scale)
                sr = torch.baddbmm(row_mask, q.view(G * kvh * R, g * L, d), krb.transpose(1, 2), alpha=self.scale)
                probs = softmax(sp.view(G, kvh, R, g * L, pb), sr.view(G, kvh, R, g * L, sb))
                o = torch.bmm(probs[..., :pb].reshape(G * kvh, R * g * L, pb), vp)
                o = torch.baddbmm(o.view(G * kvh * R, g * L, d), probs[..., pb:].reshape(G * kvh * R, g * L, sb),
                                  vrb)
            o = o.view(G, kvh, R, g, L, d).permute(0, 2, 4, 1, 3, 5).reshape(B * L, nh * d)
            h = torch.addmm(h, o, w.wo.t())
            n2 = rms(h, w.ln2, self.eps)
            h = torch.addmm(h, silu_mul(n2 @ w.wgu.t()), w.wd.t())
        last = h.view(B, L, self.H)[self.arange_b, n_valid - 1]
        normed = rms(last, self.norm_w, self.eps)
        self.hidden_out.copy_(normed)
        if self.lm_head_mode == "wx":
            best = (self.lm_head_w @ normed.t()).argmax(0)
        else:
            best = (normed @ self.lm_head_w.t()).argmax(-1)
        col = self.count.clamp(max=self.forced.shape[1] - 1)[:, None]
        f = self.forced.gather(1, col)[:, 0]
        self.tok.copy_(torch.where(f >= 0, f, best))
        self.count.add_(emit.long())
        self.pos.copy_(torch.clamp(self.pos + n_valid, max=self.cap))

    def _or_eager(self, step: Callable[..., None], *args: object) -> None:
        """``step(*args)`` (a graph body or an eager multi-token step); if the compiled kernels fail (their
        compile runs at first call), go eager and run it again.

        A retry is safe: a failing compiled helper has written nothing, and the steps before it only write the
        same K/V values at the same slots again; positions and tokens change at the very end of a step.
        """
        if self.kernels != "compiled":
            step(*args)
            return
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - a missing compiler or an Inductor bug costs speed, not answers
            self._eager_kernels(f"{type(exc).__name__}: {exc}")
            step(*args)

    def _eager_kernels(self, reason: str) -> None:
        log.warning("fast decode: compiled kernels failed (%s); using eager kernels", reason.splitlines()[0])
        self.kernels, self.kernels_reason = "eager", reason
        self._fused = self._multi = _Elementwise.eager()

    def _body(self, kind: str, pb: int, sb: int, width: int = 1) -> None:
        if kind == "decode":
            emit = self.tok != self.seg_id  # a step fed [SEG] emits nothing: its logits are discarded
            x = F.embedding(self.tok[:, None], self.embed_w)
            self._forward(x, self.ones_b, emit, pb, sb, fused=True)
        else:
            self._forward(self.rag_embeds[:, :width], self.rag_nvalid, self.rag_emit, pb, sb, fused=True)

    # ---- length buckets and graphs ------------------------------------------------------------------------------
    def _sb(self, need: int) -> int:
        """Smallest row bucket holding ``need`` slots (powers of two from 128, capped at the capacity)."""
        b = 128
        while b < need:
            b *= 2
        return min(b, self.S)

    def _pb(self) -> int:
        return min(_round_up(int(self.prefix_len.max()), 128), self.P)

    def _wb(self, wide: int, cap: int | None = None) -> int:
        """Width bucket of a multi-token step: powers of two from 8 up to ``cap`` (``inject_len`` for
        injections). A batch injecting a few tokens a row must not run ``B x inject_len`` tokens through the
        model (at batch 32 that step is compute-bound)."""
        w = 8
        while w < wide:
            w *= 2
        return min(w, self.Linj if cap is None else cap)

    def _launch(self, kind: str, need: int, width: int = 1) -> None:
        """Run one decode ("decode") or injection ("ragged", ``width`` embeddings a row) step: graph replay
        when graphed."""
        pb, sb = self._cur_pb, self._sb(need)
        if not self.use_graphs:
            self._or_eager(self._body, kind, pb, sb, width)
            return
        key = (kind, pb, sb, width)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        graph.replay()

    def _capture(self, key: tuple[str, int, int, int]) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then capture; the live state is saved and restored around it.

        Warm-up steps write K/V only at or after each row's position (slots nothing valid occupies yet).
        """
        kind, pb, sb, width = key
        if kind == "decode" or width == 1:  # single-token steps: kernel buffers and check before capture
            self._attn_workspace(pb, sb)
        saved = [t.clone() for t in (self.pos, self.tok, self.count, self.hidden_out)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with _CAPTURE_LOCK:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._or_eager(self._body, kind, pb, sb, width)  # the first call compiles (outside the capture)
                    self.pos.copy_(saved[0])
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._body(kind, pb, sb, width)
        self._pool = graph.pool()
        for t, v in zip((self.pos, self.tok, self.count, self.hidden_out), saved):
            t.copy_(v)
        self._graphs[key] = graph
        return graph

    def capture(self, row_len: int = 128) -> None:
        """Capture the decode and injection graphs of the first buckets now (e.g. while loading)."""
        if not self.use_graphs:
            return
        self._cur_pb = self._pb()
        with torch.no_grad():
            for kind, width in (("decode", 1), ("ragged", self._wb(1))):
                key = (kind, self._cur_pb, self._sb(row_len), width)
                if key not in self._graphs:
                    self._capture(key)

    def _reset_state(self) -> None:
        self.pos.zero_()
        self.tok.zero_()
        self.count.zero_()
        self.rag_nvalid.fill_(1)
        self.rag_emit.fill_(True)

    def _post(self) -> _Pending:
        if self._ring is None:
            return _Pending(self.tok, None)
        slot = self._ring[self._ring_i % self._ring.shape[0]]
        self._ring_i += 1
        return _Pending(self.tok, slot)

    # ---- prefixes ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_prefix(self, group: int, embeds: torch.Tensor) -> None:
        """Prefill ``embeds`` [P, H] (the shared image prompt) once into group ``group``'s prefix cache."""
        self.set_prefixes([(group, embeds)])

    @torch.no_grad()
    def set_prefixes(self, items: Sequence[tuple[int, torch.Tensor]], max_tokens: int = 8192) -> None:
        """``set_prefix`` for several groups: their tokens go through each weight GEMM together (packs of up to
        ``max_tokens`` tokens, at least one prefix each, to bound activation memory), attention per group.

        Why: a batch over a few images spent more time prefilling prefixes one by one than the GEMMs need.
        """
        for group, embeds in items:
            self.prefix_keys.pop(group, None)
            if not 0 <= group < self.G:
                raise ValueError(f"group {group} out of range (decoder has {self.G})")
            if not 1 <= embeds.shape[0] <= self.P:
                raise ValueError(f"prefix of {embeds.shape[0]} tokens does not fit max_prefix={self.P}")
        pack: list[tuple[int, torch.Tensor]] = []
        for item in items:
            if pack and sum(e.shape[0] for _, e in pack) + item[1].shape[0] > max_tokens:
                self._or_eager(self._prefill_pack, pack)
                pack = []
            pack.append(item)
        if pack:
            self._or_eager(self._prefill_pack, pack)

    def _prefill_pack(self, pack: list[tuple[int, torch.Tensor]]) -> None:
        kvh, d, nh, ops = self.kvh, self.d, self.nh, self._multi
        lens = [int(e.shape[0]) for _, e in pack]
        starts = [sum(lens[:i]) for i in range(len(lens))]
        T = sum(lens)
        h = torch.cat([e.to(self.device, self.dtype).reshape(-1, self.H) for _, e in pack])
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        freqs = pos.float()[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)[:, None, :]
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        sin_s = torch.cat((-sin[:, : d // 2], sin[:, d // 2:]), -1)[:, None, :]
        last = len(self.layers) - 1
        for li, w in enumerate(self.layers):
            n1 = ops.rms(h, w.ln1, self.eps)
            qkv = torch.addmm(w.bqkv, n1, w.wqkv.t()).view(T, nh + 2 * kvh, d)
            qk = ops.rope(qkv[:, : nh + kvh], cos, sin_s)
            outs = []
            for (group, _), a, n in zip(pack, starts, lens):
                q, k, v = qk[a:a + n, :nh], qk[a:a + n, nh:], qkv[a:a + n, nh + kvh:]
                self.k_pre[li, group, :, :n].copy_(k.transpose(0, 1))
                self.v_pre[li, group, :, :n].copy_(v.transpose(0, 1))
                if li == last:
                    continue  # nothing reads a prefix's last hidden states: its last layer is K/V only
                kk = k.transpose(0, 1).repeat_interleave(self.g, 0)[None]
                vv = v.transpose(0, 1).repeat_interleave(self.g, 0)[None]
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv, is_causal=True)
                outs.append(o[0].transpose(0, 1).reshape(n, nh * d))
            if li == last:
                break
            h = torch.addmm(h, outs[0] if len(outs) == 1 else torch.cat(outs), w.wo.t())
            h = torch.addmm(h, ops.silu_mul(ops.rms(h, w.ln2, self.eps) @ w.wgu.t()), w.wd.t())
        for (group, _), n in zip(pack, lens):
            self.prefix_len[group] = n
            mask = torch.full((self.P,), NEG_INF, device=self.device, dtype=self.dtype)
            mask[:n] = 0.0
            self.pmask.view(self.G, self.kvh, self.P)[group] = mask

    # ---- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, rows: Sequence[RowInput], settings: DecodeSettings, on_seg: SegHandler, *,
                 on_token: TokenFn | None = None, should_stop: Callable[[], bool] | None = None,
                 stats: DecodeStats | None = None) -> list[RowOutput]:
        """Greedy-decode every row (with [SEG] events) and return their outputs in the order given."""
        t_start = time.perf_counter()
        stats = stats if stats is not None else DecodeStats()
        stats.graphed = self.use_graphs
        slot_of = self._arrange(rows)
        self._cur_pb = self._pb()
        B = self.B
        width = max(r.embeds.shape[0] for r in rows)
        if any(r.embeds.shape[0] < 1 for r in rows) or width > self.cap:
            raise ValueError(f"question prompts must have 1..{self.cap} tokens, got up to {width}")
        with torch.profiler.record_function("ts:suffix_prefill"):  # phase labels for bench.gpu's gap profile
            used, prev = self._prefill_suffixes(rows, slot_of, settings, width)
        stats.suffix_prefill_ms = (time.perf_counter() - t_start) * 1e3

        row_of = {s: i for i, s in enumerate(slot_of)}
        ids: list[list[int]] = [[] for _ in range(B)]
        n_seg = [0] * B
        stopped = ["eos"] * B
        done = [s not in row_of for s in range(B)]
        stop_ids = set(settings.stop_ids)
        prev_emitting = list(slot_of)  # rows whose output of the last launched step is a real token
        prev_seg: list[int] = []  # rows that were fed [SEG] by the last launched step

        def finish(s: int, why: str) -> None:
            done[s] = True
            stopped[s] = why

        def consume(tokens: list[int], emitting: list[int]) -> list[int]:
            segs = []
            for s in emitting:
                if done[s]:
                    continue
                t = tokens[s]
                ids[s].append(t)
                if on_token is not None:
                    on_token(row_of[s], t)
                if t in stop_ids:
                    finish(s, "eos")
                elif t == settings.seg_id:
                    segs.append(s)
                elif len(ids[s]) >= settings.max_new_tokens:
                    finish(s, "max_new_tokens")
            if should_stop is not None and should_stop():
                for s in range(B):
                    if not done[s]:
                        finish(s, "cancelled")
                return []
            return segs

        while True:
            if prev_seg:
                t0 = time.perf_counter()
                tokens = prev.tokens()  # the [SEG] step must finish: its hidden state makes the mask
                new_seg = consume(tokens, [s for s in prev_emitting if s not in prev_seg])
                segs = [s for s in prev_seg if not done[s]]
                reqs = [SegRequest(row_of[s], s // self.R, n_seg[s], self.hidden_out[s].clone(), list(ids[s]))
                        for s in segs]
                t_h = time.perf_counter()
                with torch.profiler.record_function("ts:seg_handler"):
                    injections = on_seg(reqs) if reqs else []
                stats.handler_ms += (time.perf_counter() - t_h) * 1e3
                if len(injections) != len(reqs):
                    raise RuntimeError("SegHandler returned a different number of injections than requests")
                inject: dict[int, torch.Tensor] = {}
                nothing: list[int] = []
                for s, inj in zip(segs, injections):
                    ids[s].extend(inj.token_ids)
                    n_seg[s] += 1
                    stats.seg_events += 1
                    if n_seg[s] >= settings.max_seg:
                        finish(s, "max_seg")
                        continue
                    k = inj.embeds.shape[0]
                    if k == 0:
                        nothing.append(s)
                        continue
                    if used[s] + k + 1 > self.cap:
                        raise ValueError(f"answer outgrew the cache (max_row_len={self.S}); raise it")
                    inject[s] = inj.embeds
                if nothing:  # nothing to inject: resume from the [SEG] step's own logits (already in tok)
                    self.count.index_add_(0, torch.tensor(nothing, device=self.device),
                                          torch.ones(len(nothing), dtype=torch.long, device=self.device))
                    new_seg += consume(tokens, nothing)
                if all(done):
                    stats.seg_ms += (time.perf_counter() - t0) * 1e3
                    break
                wide = max([e.shape[0] for e in inject.values()] + [1])
                nv = [1] * B
                em = [s not in new_seg for s in range(B)]
                buf = self.rag_embeds if wide <= self.Linj else torch.zeros(
                    B, wide, self.H, device=self.device, dtype=self.dtype)
                buf[:, 0] = F.embedding(self.tok, self.embed_w)  # rows not injecting feed their last token
                for s, e in inject.items():
                    buf[s, : e.shape[0]] = e.to(self.device, self.dtype)
                    nv[s], em[s] = e.shape[0], True
                self.rag_nvalid.copy_(torch.tensor(nv))
                self.rag_emit.copy_(torch.tensor(em))
                need = max(used[s] for s in range(B) if not done[s]) + max(wide, self.Linj)
                if wide <= self.Linj:
                    self._launch("ragged", need, self._wb(wide))
                else:  # wider than the injection graph: an eager step at this width
                    self._or_eager(self._forward, buf[:, :wide], self.rag_nvalid, self.rag_emit,
                                         self._cur_pb, self._sb(need))
                stats.inject_steps += 1
                for s in range(B):
                    used[s] += nv[s]
                prev = self._post()
                prev_emitting = [s for s in range(B) if not done[s] and em[s]]
                prev_seg = [s for s in new_seg if not done[s]]
                stats.seg_ms += (time.perf_counter() - t0) * 1e3
                continue
            if all(done):
                break
            if any(used[s] + 1 > self.cap for s in range(B) if not done[s]):
                raise ValueError(f"answer outgrew the cache (max_row_len={self.S}); raise it")
            self._launch("decode", max(used[s] for s in range(B) if not done[s]) + 1)
            # ^ step s+1 is queued before step s is read: the GPU never idles here
            stats.decode_steps += 1
            for s in range(B):
                used[s] += 1
            cur = self._post()
            new_seg = consume(prev.tokens(), prev_emitting)
            prev = cur
            prev_seg = [s for s in new_seg if not done[s]]
            prev_emitting = [s for s in range(B) if not done[s] and s not in new_seg]
            if all(done):
                break
        stats.total_ms = (time.perf_counter() - t_start) * 1e3
        return [RowOutput(ids[s], stopped[s], n_seg[s]) for s in slot_of]

    def _prefill_suffixes(self, rows: Sequence[RowInput], slot_of: list[int], settings: DecodeSettings,
                          width: int) -> tuple[list[int], _Pending]:
        """Every question's own prompt in one ragged step (a graph replay when graphed and the prompts fit
        ``rag_cap``; eagerly, at batch 32 it was bound by ~1,100 kernel launches). Returns the host mirror of
        each slot's cache position and the step's pending tokens."""
        B = self.B
        self._reset_state()
        self.seg_id.fill_(settings.seg_id)
        self._load_forced(rows, slot_of)
        used = [1] * B
        for s, r in zip(slot_of, rows):
            used[s] = r.embeds.shape[0]
        wb = self._wb(width, self.rag_cap)
        if self.use_graphs and width <= self.rag_cap and wb < self.S:
            self.rag_embeds[:, :wb].zero_()
            for s, r in zip(slot_of, rows):
                self.rag_embeds[s, : r.embeds.shape[0]] = r.embeds.to(self.device, self.dtype)
            self.rag_nvalid.copy_(torch.tensor(used))
            self.rag_emit.fill_(True)
            self._launch("ragged", width, wb)
        else:
            emb = torch.zeros(B, width, self.H, device=self.device, dtype=self.dtype)
            for s, r in zip(slot_of, rows):
                emb[s, : r.embeds.shape[0]] = r.embeds.to(self.device, self.dtype)
            n_valid = torch.tensor(used, device=self.device)
            emit = torch.ones(B, dtype=torch.bool, device=self.device)
            self._or_eager(self._forward, emb, n_valid, emit, self._cur_pb, self._sb(width))
        prev = self._post()
        if self.device.type == "cuda":
            prev.tokens()
        return used, prev

    def _arrange(self, rows: Sequence[RowInput]) -> list[int]:
        """Batch slot of each row: group-major, ``R`` slots per group; unused slots idle."""
        if not rows:
            raise ValueError("generate needs at least one row")
        used = [0] * self.G
        slots = []
        for r in rows:
            if not 0 <= r.group < self.G:
                raise ValueError(f"row group {r.group} out of range (decoder has {self.G} groups)")
            if int(self.prefix_len[r.group]) < 1:
                raise ValueError(f"group {r.group} has no prefix: call set_prefix first")
            if used[r.group] >= self.R:
                raise ValueError(f"more than {self.R} questions for group {r.group}")
            slots.append(r.group * self.R + used[r.group])
            used[r.group] += 1
        return slots

    def _load_forced(self, rows: Sequence[RowInput], slot_of: list[int]) -> None:
        longest = max([len(r.forced) for r in rows if r.forced is not None] + [0])
        table = torch.full((self.B, longest + 1), -1, dtype=torch.long)
        for s, r in zip(slot_of, rows):
            if r.forced is not None:
                table[s, : len(r.forced)] = torch.tensor(list(r.forced), dtype=torch.long)
        if tuple(table.shape) != tuple(self.forced.shape):
            if self._graphs:  # the graphs captured the old table's address: copy into a fixed-width one
                if table.shape[1] > self.forced.shape[1]:
                    raise ValueError(f"forced traces longer than {self.forced.shape[1] - 1} tokens need a "
                                     "new decoder (max_forced)")
                self.forced.fill_(-1)
                self.forced[:, : table.shape[1]] = table.to(self.device)
                return
            self.forced = table.to(self.device)
        else:
            self.forced.copy_(table)

    def reserve_forced(self, length: int) -> None:
        """Make room for forced traces of ``length`` ids before the graphs are captured (benchmarks)."""
        if self._graphs:
            raise RuntimeError("reserve_forced must be called before the graphs are captured")
        self.forced = torch.full((self.B, length + 1), -1, dtype=torch.long, device=self.device)


# ---- decoder cache on the model ------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return max(m, math.ceil(n / m) * m)


def get_decoder(model: TerraScopeModel, *, prefix_len: int, max_row_len: int, groups: int = 1,
                rows_per_group: int = 1, inject_len: int = 16, kernels: str = "eager",
                attention: str | None = None) -> FastDecoder:
    """A cached ``FastDecoder`` large enough for these sizes (rounded up so shapes and graphs get reused)."""
    cache: dict[tuple, FastDecoder] = model.__dict__.setdefault("_ts_fast_decoders", {})
    key = (groups, rows_per_group, _round_up(prefix_len, 512), _round_up(max_row_len, 256), inject_len, kernels,
           attention_request(attention))
    dec = cache.get(key)
    if dec is None:
        for k in [k for k in cache if k[:2] == key[:2] and k[4:] == key[4:]]:
            del cache[k]  # a bigger decoder of the same batch shape replaces a smaller one
        dec = FastDecoder(model, groups=groups, rows_per_group=rows_per_group, max_prefix=key[2],
                          max_row_len=key[3], inject_len=inject_len, kernels=kernels, attention=key[6])
        cache[key] = dec
    return dec


def row_capacity(prompt_len: int, settings: DecodeSettings, inject_len: int) -> int:
    """The per-question cache length ``generate`` needs for these settings."""
    return prompt_len + settings.max_new_tokens + settings.max_seg * (inject_len + 1) + inject_len + 4


# ---- the reference loop (the released code's behaviour; also the naive baseline) ------------------------------
@torch.no_grad()
def reference_generate(model: TerraScopeModel, prompt_embeds: torch.Tensor, settings: DecodeSettings,
                       on_seg: SegHandler, *, forced: Sequence[int] | None = None,
                       on_token: TokenFn | None = None) -> RowOutput:
    """Eager loop on a ``DynamicCache``: one forward and one ``.item()`` per token, like the official code."""
    cache = model.new_cache()
    _, logits = model.lm_forward(prompt_embeds.to(model.device, model.dtype)[None], cache, 0)
    pos = prompt_embeds.shape[0]
    ids: list[int] = []
    n_emit = 0

    def pick(lg: torch.Tensor) -> int:
        if forced is not None and n_emit < len(forced) and forced[n_emit] >= 0:  # -1: not forced
            return int(forced[n_emit])
        return int(lg[0, -1].argmax().item())

    next_id = pick(logits)
    n_seg = 0
    while True:
        hidden, logits = model.lm_forward(model.embed_ids(torch.tensor([[next_id]])), cache, pos)
        pos += 1
        tok = next_id
        ids.append(tok)
        n_emit += 1
        if on_token is not None:
            on_token(0, tok)
        if tok in settings.stop_ids:
            return RowOutput(ids, "eos", n_seg)
        if tok == settings.seg_id:
            inj = on_seg([SegRequest(0, 0, n_seg, hidden[0, -1], list(ids))])[0]
            ids.extend(inj.token_ids)
            n_seg += 1
            if n_seg >= settings.max_seg:
                return RowOutput(ids, "max_seg", n_seg)
            _, logits = model.lm_forward(inj.embeds.to(model.device, model.dtype)[None], cache, pos)
            pos += inj.embeds.shape[0]
            next_id = pick(logits)
            continue
        next_id = pick(logits)
        if len(ids) >= settings.max_new_tokens:
            return RowOutput(ids, "max_new_tokens", n_seg)


# ---- a [SEG] handler built from the model's primitives -------------------------------------------------------
@dataclass
class SegImage:
    """One image a [SEG] can point at."""

    features: Sam2Features | None  # SAM-2 embeddings of this image (1 frame), computed once
    hw: tuple[int, int]  # the image's own pixel grid: masks come back at this size
    select: Callable[[np.ndarray], list[int]]  # bool mask -> visual token indices
    region_embeds: Callable[[list[int]], torch.Tensor]  # token indices -> [K, H] embeddings to inject
    sam2_pixels: torch.Tensor | None = None  # [1, 3, 1024, 1024]; re-encoded at each [SEG] when reencode


@dataclass
class SegGroup:
    images: list[SegImage]
    route: Callable[[int], int] = field(default=lambda k: 0)  # [SEG] index -> image index


@dataclass
class SegRecord:
    row: int
    seg_index: int
    image_index: int
    mask: np.ndarray
    score: float
    token_indices: list[int]


class SamSegHandler:
    """SAM-2 decode of every pending [SEG] in one batch, selection on the host, region embeddings back.

    ``reencode=True`` runs the SAM-2 image encoder again at every [SEG] (what the released code does; used
    as the naive baseline). ``records`` keeps every mask for tests and reports.
    """

    def __init__(self, model: TerraScopeModel, groups: list[SegGroup], region_id: int,
                 suppress_no_object: bool = True, reencode: bool = False) -> None:
        self.model = model
        self.groups = groups
        self.region_id = region_id
        self.suppress = suppress_no_object
        self.reencode = reencode
        self.records: list[SegRecord] = []

    @torch.no_grad()
    def __call__(self, reqs: list[SegRequest]) -> list[SegInjection]:
        m = self.model
        prompts = m.seg_prompt(torch.stack([r.hidden for r in reqs]))
        images = []
        for r in reqs:
            grp = self.groups[r.group]
            idx = grp.route(r.seg_index)
            images.append((idx, grp.images[idx]))
        feats = []
        for _, im in images:
            if self.reencode:
                if im.sam2_pixels is None:
                    raise ValueError("reencode needs SegImage.sam2_pixels")
                feats.append(m.sam2_encode(im.sam2_pixels))
            else:
                if im.features is None:
                    raise ValueError("SegImage.features is missing")
                feats.append(im.features)
        batch = Sam2Features([torch.cat([f.image_embeddings[i] for f in feats]) for i in
                              range(len(feats[0].image_embeddings))], feats[0].image_pe)
        out = m.sam2_decode(batch, prompts)
        masks: list[torch.Tensor] = []
        for i, (_, im) in enumerate(images):
            prob = mask_probabilities(out.low_res[i:i + 1], im.hw)[0]
            mask = prob > 0.5
            if self.suppress:
                mask = mask & (out.object_score[i, 0] > 0)
            masks.append(mask)
        host = [mk.cpu().numpy() for mk in masks]
        scores = out.iou.gather(1, out.best[:, None])[:, 0].tolist()
        result = []
        for r, (idx, im), mk, sc in zip(reqs, images, host, scores):
            chosen = im.select(mk)
            emb = im.region_embeds(chosen)
            self.records.append(SegRecord(r.row, r.seg_index, idx, mk, float(sc), list(chosen)))
            result.append(SegInjection(emb, [self.region_id] * emb.shape[0]))
        return result


# ---- TerraScope integration: Generator.run and answer_batch on the fast path ------------------------------------
def enabled(model: TerraScopeModel, settings: GenerationSettings | None) -> bool:
    """Fast path by default on CUDA for greedy decoding; ``TERRASCOPE_FAST_DECODE=0`` turns it off, ``=1``
    turns it on elsewhere too (CPU runs the same static-cache code without graphs)."""
    env = os.environ.get("TERRASCOPE_FAST_DECODE", "auto").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if settings is not None and settings.temperature > 0:
        return False  # sampling stays on the reference loop
    return model.device.type == "cuda" or env in ("1", "on", "true", "yes")


@dataclass
class Question:
    """One question for ``answer_many``; questions sharing a ``VisualContext`` share its prefix KV."""

    ctx: VisualContext
    question: str
    options: list[str] | None = None
    forced_ids: list[int] | None = None
    on_token: TokenCallback | None = None
    on_mask: MaskCallback | None = None
    grounding: GroundingFn | None = None


class _SamEarly:
    """SAM-2 embeddings of every image of a batch, encoded before decoding starts, on a side stream (CUDA).

    The idea: the image encoder is compute-bound and decoding bandwidth-bound, so an encode queued before the
    first decode step could run beside the first decode steps instead of stalling the first [SEG]. It is
    issued from the calling thread, in one batched forward (``Generator.encode_sam_many``). Measured on an
    H100 (docs/PERFORMANCE.md, run 7) it gained nothing once the encoder runs as a CUDA graph: the two
    contend for the same SMs. So it is off unless ``TERRASCOPE_SAM2_EARLY=1``; otherwise each image is
    encoded at its first [SEG]. The features land in each context's ``sam_cache`` exactly as a lazy encode
    would put them there, once per image.
    """

    def __init__(self, gen: Generator, ctxs: Sequence[VisualContext]) -> None:
        self.main = torch.cuda.current_stream()
        self.stream = torch.cuda.Stream()
        self.stream.wait_stream(self.main)
        todo = [c for c in ctxs if any(i not in c.sam_cache for i in range(len(c.pixels)))]
        self.event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            gen.encode_sam_many(todo)
            for ctx in todo:  # the main stream reads them: the allocator must not recycle them under it
                for feats in ctx.sam_cache.values():
                    for t in [*feats.image_embeddings, feats.image_pe]:
                        t.record_stream(self.main)
            self.event.record(self.stream)
        self.images = sum(len(c.pixels) for c in todo)
        self._waited = False

    def wait(self, ctx: VisualContext, index: int) -> None:
        """Before a [SEG] reads SAM-2 features: the main stream waits for the side stream's encode (once)."""
        self.close()

    def close(self) -> None:
        """Also at the end of a batch, even one without [SEG]: later work on the main stream (the next
        batch's encode may replay the same SAM-2 graph) is ordered after this encode."""
        if not self._waited:
            torch.cuda.current_stream().wait_event(self.event)
            self._waited = True


def sam2_early_enabled(model: TerraScopeModel) -> bool:
    return model.device.type == "cuda" and os.environ.get("TERRASCOPE_SAM2_EARLY", "0") == "1"


def _seg_handler(gen: Generator, states: list[AnswerState], early: _SamEarly | None) -> SegHandler:
    """``Generator.handle_segs`` as the decoder's ``SegHandler``: every row's injected parts are collected and
    handed back as one injection (the decoder writes them in one step)."""
    from .generation import SegEvent

    model = gen.model

    @torch.no_grad()
    def handle(reqs: list[SegRequest]) -> list[SegInjection]:
        t0 = time.perf_counter()
        parts: list[list[torch.Tensor]] = [[] for _ in reqs]
        ids: list[list[int]] = [[] for _ in reqs]

        def collect(i: int, kind: str, emb: torch.Tensor, new: list[int]) -> None:
            parts[i].append(emb)
            ids[i] += new

        gen.handle_segs([SegEvent(states[r.row], r.hidden) for r in reqs], collect,
                        wait_features=early.wait if early is not None else None)
        out = []
        for p, i in zip(parts, ids):
            emb = torch.cat(p) if p else torch.zeros(0, model.config.llm.hidden_size, device=model.device,
                                                     dtype=model.dtype)
            out.append(SegInjection(emb, i))
        share = (time.perf_counter() - t0) * 1e3 / len(reqs)
        for r in reqs:
            states[r.row].sam_ms += share
        return out

    return handle


def _batch_rows(gen: Generator, questions: Sequence[Question]
                ) -> tuple[list[tuple[tuple, torch.Tensor]], list[RowInput]]:
    """Each distinct image prompt once (its key and embeddings: the groups' prefixes) and each question's row:
    its group and the embeddings of its own text after the image prompt.

    The question texts of rows whose image prompt is already there are embedded in one lookup: one at a time,
    32 host-to-device copies of a few ids kept the GPU idle for ~30 ms of a batch."""
    model = gen.model
    img_end = gen.tok.special_ids()["img_end"]
    groups: dict[tuple, int] = {}
    prefixes: list[tuple[tuple, torch.Tensor]] = []
    plan: list[tuple[int, torch.Tensor | list[int], list[int] | None]] = []  # (group, embeds or ids, forced)
    all_ids = gen.prompt_ids_many([(q.ctx, q.question, q.options) for q in questions])
    for q, ids in zip(questions, all_ids):
        last_end = len(ids) - 1 - ids[::-1].index(img_end) if img_end in ids else -1
        split = min(last_end + 1 if last_end >= 0 else len(ids) - 1, len(ids) - 1)
        token = q.ctx.prefix_token
        key = (id(token), tuple(ids[:split]))
        if key not in groups:
            embeds = gen.prompt_embeds(q.ctx, ids)
            groups[key] = len(prefixes)
            prefixes.append(((token, tuple(ids[:split])), embeds[:split]))
            plan.append((groups[key], embeds[split:], q.forced_ids))
        else:  # the image prompt is already there: only this question's own text is embedded (below)
            plan.append((groups[key], ids[split:], q.forced_ids))
    texts = [part for _, part, _ in plan if isinstance(part, list)]
    pieces = iter(())
    if texts:
        flat = model.embed_ids(torch.tensor([t for ids in texts for t in ids], dtype=torch.long))
        pieces = iter(torch.split(flat, [len(ids) for ids in texts]))
    rows = [RowInput(group, next(pieces) if isinstance(part, list) else part, forced)
            for group, part, forced in plan]
    return prefixes, rows


@torch.no_grad()
def answer_many(gen: Generator, questions: Sequence[Question], settings: GenerationSettings | None = None,
                should_stop: StopFn | None = None, kernels: str | None = None,
                attention: str | None = None) -> list[AnswerResult]:
    """Answer several questions in one static-cache batch; each image's prompt prefix is prefilled once.

    ``kernels`` and ``attention`` pick the decoder variants (default: ``TERRASCOPE_FAST_KERNELS``,
    ``TERRASCOPE_DECODE_ATTENTION``)."""
    from .generation import AnswerState, check_settings

    settings = settings or GenerationSettings()
    check_settings(settings)
    if not questions:
        return []
    model = gen.model
    t_start = time.perf_counter()
    with torch.profiler.record_function("ts:prompts"):  # phase labels for bench.gpu's gap profile
        prefixes, rows = _batch_rows(gen, questions)
    per_group = [0] * len(prefixes)
    for r in rows:
        per_group[r.group] += 1
    lam = settings.max_tokens_per_seg or model.config.max_tokens_per_seg
    inject_len = _round_up(lam + 24, 8)
    dsettings = DecodeSettings(stop_ids=tuple(sorted(gen.ids.stops)), seg_id=gen.ids.seg,
                               max_new_tokens=settings.max_new_tokens, max_seg=settings.max_seg)
    width = max(r.embeds.shape[0] for r in rows)
    dec = get_decoder(model, prefix_len=max(p[1].shape[0] for p in prefixes),
                      max_row_len=row_capacity(width, dsettings, inject_len), groups=len(prefixes),
                      rows_per_group=max(per_group), inject_len=inject_len, kernels=kernels or default_kernels(model.device),
                      attention=attention)
    longest = max([len(q.forced_ids) for q in questions if q.forced_ids] + [0])
    if longest >= dec.forced.shape[1] and not dec._graphs:
        dec.reserve_forced(_round_up(longest, 256))
    t_prefix = time.perf_counter()
    todo = [(g, emb) for g, (key, emb) in enumerate(prefixes) if dec.prefix_keys.get(g) != key]
    with torch.profiler.record_function("ts:prefix_prefill"):
        dec.set_prefixes(todo)  # the same image prompt stays cached between calls
    for g, (key, _) in enumerate(prefixes):
        dec.prefix_keys[g] = key
    early = None
    if sam2_early_enabled(model):  # queued behind the prefill on a side stream; runs beside the decoding
        early = _SamEarly(gen, list({id(q.ctx): q.ctx for q in questions}.values()))
    if model.device.type == "cuda":
        torch.cuda.current_stream().synchronize()
    t_end = time.perf_counter()
    prefill_ms = (t_end - t_start) * 1e3
    split_ms = {"prompt_ms": (t_prefix - t_start) * 1e3, "prefix_prefill_ms": (t_end - t_prefix) * 1e3,
                "prefix_groups": float(len(todo)), "sam2_early_images": float(early.images if early else 0)}
    states = [AnswerState(gen, q.ctx, q.question, settings, q.on_token, q.on_mask, q.grounding)
              for q in questions]

    def on_tok(row: int, tok: int) -> None:
        st = states[row]
        st.out_ids.append(tok)
        st.emit()

    stats = DecodeStats()
    try:
        with torch.profiler.record_function("ts:generate"):
            outs = dec.generate(rows, dsettings, _seg_handler(gen, states, early), on_token=on_tok,
                                should_stop=should_stop, stats=stats)
    finally:
        if early is not None:
            early.close()
    results = []
    for q, st, out in zip(questions, states, outs):
        stopped = out.stopped
        if stopped == "eos" and out.token_ids and out.token_ids[-1] != gen.ids.eos:
            stopped = "answer"
        timings = q.ctx.timings()
        decode_ms = stats.total_ms - stats.suffix_prefill_ms - stats.handler_ms
        timings.update(split_ms)
        timings.update({"prefill_ms": prefill_ms + stats.suffix_prefill_ms, "decode_ms": decode_ms,
                        "suffix_prefill_ms": stats.suffix_prefill_ms, "seg_handler_ms": stats.handler_ms,
                        "sam2_ms": st.sam_ms, "generated_tokens": float(len(st.out_ids)),
                        "decode_steps": float(stats.decode_steps), "fast_path": 1.0,
                        "seg_wait_ms": stats.seg_ms - stats.handler_ms,
                        "total_ms": timings.get("preprocess_ms", 0) + timings.get("vision_ms", 0)
                        + (time.perf_counter() - t_start) * 1e3})
        # st.out_ids equals out.token_ids: on_tok and the injections append every id to both
        results.append(st.result(q.options, timings, stopped))
    return results


def fast_run(gen: Generator, ctx: VisualContext, question: str, options: list[str] | None = None,
             settings: GenerationSettings | None = None, on_token: TokenCallback | None = None,
             on_mask: MaskCallback | None = None, grounding: GroundingFn | None = None,
             should_stop: StopFn | None = None, forced_ids: list[int] | None = None) -> AnswerResult:
    """``Generator.run`` on the fast path (same arguments, same result)."""
    q = Question(ctx, question, options, forced_ids, on_token, on_mask, grounding)
    return answer_many(gen, [q], settings, should_stop)[0]


def release_decoders(model: TerraScopeModel) -> None:
    """Drop the cached decoders (their KV buffers and graphs), e.g. between benchmark shapes."""
    model.__dict__.pop("_ts_fast_decoders", None)
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
