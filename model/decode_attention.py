"""Split-K ("flash-decoding") attention for the FastDecoder's single-token steps, in Triton.

Why: at batch 1 a decode step's attention is tiny (about 3 MB of KV per layer on the 8B shape), but the bmm
math in ``FastDecoder._forward`` spends four batched GEMMs and a four-kernel softmax on it, about 1 ms per
step. Here one launch computes partial (acc, max, sum-exp) over key chunks of both caches in parallel and a
second one merges them (log-sum-exp), so the joint softmax over prefix and row keys is exact.

Layout (what ``_forward`` has after ``_rope_kv``; nothing is copied):

* q ``[G, kvh, R, g, 1, d]`` contiguous; query row ``((G*kvh + h)*R + r)*g + j``;
* prefix cache ``[G, kvh, pb, d]`` (a strided view), valid slots ``< prefix_len[G]``;
* row cache ``[G, kvh, R, sb, d]`` (a strided view), valid slots ``<= pos[G*R + r]``.

Every per-step length is read on the device (``prefix_len``, ``pos``), so one captured CUDA graph stays valid
while they change; ``pb`` and ``sb`` are bucket sizes fixed per graph. The partial buffers live in a
``Workspace`` the decoder allocates before capture. Triton is optional: without it this module still imports
and ``unavailable_reason()`` says why (the decoder then keeps the bmm math).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # optional: the CPU venv has no triton; the decoder then keeps the bmm math
    import triton
    import triton.language as tl
except Exception as _exc:  # noqa: BLE001 - any import failure (missing, broken install) means "unavailable"
    triton = None
    tl = None
    _IMPORT_ERROR: str | None = f"triton does not import: {_exc!r}"
else:
    _IMPORT_ERROR = None

#: Keys per inner block (the N of q@k^T, the K of p@v); float32 tiles use half, to fit shared memory.
BLOCK_K = 64
#: Upper bound on the splits of one source (prefix or row), so the combine stays short.
MAX_SPLITS = 64
#: Splits are sized to give about this many programs per SM per source. One wave is best on an H100 at every
#: decode batch of the 8B shape (``python3 -m bench.attention_plans``, 2026-11-27: 4 images x 8 questions
#: 14.4 us a layer against 16.9 us at 2, 1 question 6.2 against 6.6, 32 images 45.5 against 47.9).
PROGRAMS_PER_SM = 1
#: Most prefix queries one program holds (R*g rows share a KV head; more would spill registers).
MAX_QUERY_BLOCK = 64
#: Warps of the partials kernel: 4 beat 8 at every plan of that sweep (4x8: 12.5 against 14.4 us a layer).
NUM_WARPS = 4


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not (for logs and the bench)."""
    return _IMPORT_ERROR


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``, where the kernels run on CPU tensors (slowly: tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _attend_chunk(q_ptr, n_q, k_ptr, v_ptr, stride_kt, stride_vt, lo, hi, scale_log2,
                      acc_ptr, m_ptr, l_ptr, q0, split, n_splits,
                      BQ: tl.constexpr, BK: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Online softmax of ``n_q`` queries over keys [lo, hi) of one head; writes (acc, max, sumexp)."""
        rq = tl.arange(0, BQ)
        rk = tl.arange(0, BK)
        rd = tl.arange(0, BD)
        dmask = rd < D
        qmask = rq < n_q
        q = tl.load(q_ptr + rq[:, None] * D + rd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BQ], float("-inf"), tl.float32)
        l_i = tl.zeros([BQ], tl.float32)
        acc = tl.zeros([BQ, BD], tl.float32)
        for start in range(lo, hi, BK):
            kt = start + rk
            kmask = kt < hi
            lmask = kmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kt[:, None] * stride_kt + rd[None, :], mask=lmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kt[:, None] * stride_vt + rd[None, :], mask=lmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        rows = (q0 + rq).to(tl.int64)
        tl.store(m_ptr + rows * n_splits + split, m_i, mask=qmask)
        tl.store(l_ptr + rows * n_splits + split, l_i, mask=qmask)
        tl.store(acc_ptr + (rows[:, None] * n_splits + split) * D + rd[None, :], acc,
                 mask=qmask[:, None] & dmask[None, :])

    # Per-bucket sizes are not specialised on (divisible by 16, == 1): one compile per model shape, not one
    # per length bucket in the middle of a generation.
    @triton.jit(do_not_specialize=["pb", "sb", "n_pre_programs", "qblocks_p", "splits_p", "splits_r", "chunk_p",
                                   "chunk_r", "n_splits"])
    def _partials_kernel(q_ptr, kp_ptr, vp_ptr, kr_ptr, vr_ptr, plen_ptr, pos_ptr, acc_ptr, m_ptr, l_ptr,
                         scale_log2, pb, sb, n_pre_programs, qblocks_p, splits_p, splits_r, chunk_p, chunk_r,
                         n_splits, skp_g, skp_h, skp_t, svp_g, svp_h, svp_t,
                         skr_g, skr_h, skr_r, skr_t, svr_g, svr_h, svr_r, svr_t,
                         KVH: tl.constexpr, R: tl.constexpr, GQ: tl.constexpr, D: tl.constexpr,
                         BD: tl.constexpr, BQP: tl.constexpr, BQR: tl.constexpr, BK: tl.constexpr,
                         PRECISION: tl.constexpr):
        """Programs [0, n_pre_programs): (group*kvh, query block, prefix split), up to BQP of the R*g
        queries that share one KV head of the prefix; the rest: (group*kvh*R, row split), the g queries of
        one row. Split s of the prefix is partial s, split s of the row cache is partial ``splits_p + s``."""
        pid = tl.program_id(0)
        if pid < n_pre_programs:
            per_head = qblocks_p * splits_p
            gh = pid // per_head
            qb = (pid % per_head) // splits_p
            s = pid % splits_p
            grp = (gh // KVH).to(tl.int64)
            h = (gh % KVH).to(tl.int64)
            n_valid = tl.minimum(tl.load(plen_ptr + grp).to(tl.int32), pb)
            lo = s * chunk_p
            hi = tl.minimum(lo + chunk_p, n_valid)
            q0 = gh * (R * GQ) + qb * BQP
            _attend_chunk(q_ptr + q0.to(tl.int64) * D, tl.minimum(R * GQ - qb * BQP, BQP),
                          kp_ptr + grp * skp_g + h * skp_h, vp_ptr + grp * svp_g + h * svp_h, skp_t, svp_t,
                          lo, hi, scale_log2, acc_ptr, m_ptr, l_ptr, q0, s, n_splits,
                          BQP, BK, D, BD, PRECISION)
        else:
            rid = pid - n_pre_programs
            ghr = rid // splits_r
            s = rid % splits_r
            gh = ghr // R
            r = (ghr % R).to(tl.int64)
            grp = (gh // KVH).to(tl.int64)
            h = (gh % KVH).to(tl.int64)
            n_valid = tl.minimum(tl.load(pos_ptr + grp * R + r).to(tl.int32) + 1, sb)
            lo = s * chunk_r
            hi = tl.minimum(lo + chunk_r, n_valid)
            _attend_chunk(q_ptr + ghr.to(tl.int64) * (GQ * D), GQ,
                          kr_ptr + grp * skr_g + h * skr_h + r * skr_r,
                          vr_ptr + grp * svr_g + h * svr_h + r * svr_r, skr_t, svr_t,
                          lo, hi, scale_log2, acc_ptr, m_ptr, l_ptr, ghr * GQ, splits_p + s, n_splits,
                          BQR, BK, D, BD, PRECISION)

    @triton.jit(do_not_specialize=["n_splits"])
    def _combine_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, n_splits, KVH: tl.constexpr, R: tl.constexpr,
                        GQ: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr):
        """One query: log-sum-exp merge of its partials (empty ones have max -inf and weigh nothing).

        Queries are numbered [G, kvh, R, g]; the output is stored [G, R, kvh, g], i.e. already the rows'
        [batch, heads * d] layout the o-projection reads (no transposing copy after the kernel)."""
        qi = tl.program_id(0).to(tl.int64)
        j = qi % GQ
        row = (qi // GQ) % R
        kv = (qi // (GQ * R)) % KVH
        grp = qi // (GQ * R * KVH)
        dest = ((grp * R + row) * KVH + kv) * GQ + j
        rs = tl.arange(0, BS)
        rd = tl.arange(0, BD)
        dmask = rd < D
        m_lane = tl.full([BS], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BS):
            idx = s0 + rs
            m_lane = tl.maximum(m_lane, tl.load(m_ptr + qi * n_splits + idx, mask=idx < n_splits,
                                                other=float("-inf")))
        m_max = tl.max(m_lane, 0)
        l_lane = tl.zeros([BS], tl.float32)
        acc = tl.zeros([BS, BD], tl.float32)
        for s0 in range(0, n_splits, BS):
            idx = s0 + rs
            smask = idx < n_splits
            m = tl.load(m_ptr + qi * n_splits + idx, mask=smask, other=float("-inf"))
            w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
            l_lane += w * tl.load(l_ptr + qi * n_splits + idx, mask=smask, other=0.0)
            a = tl.load(acc_ptr + (qi * n_splits + idx[:, None]) * D + rd[None, :],
                        mask=smask[:, None] & dmask[None, :], other=0.0)
            acc += a * w[:, None]
        o = tl.sum(acc, 0) / tl.sum(l_lane, 0)
        tl.store(o_ptr + dest * D + rd, o.to(o_ptr.dtype.element_ty), mask=dmask)


# ---- host side ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """How the keys of each source are split over programs (fixed per (pb, sb) bucket)."""

    qblock_p: int  # prefix queries per program (a power of two >= 16)
    qblocks_p: int  # prefix query blocks per KV head
    splits_p: int
    splits_r: int
    chunk_p: int  # keys per prefix program (a multiple of BLOCK_K)
    chunk_r: int
    block_k: int
    num_warps: int = 4

    @property
    def n_splits(self) -> int:
        return self.splits_p + self.splits_r


def _split(n_keys: int, n_heads: int, target: int, block_k: int) -> tuple[int, int]:
    """(splits, keys per split) for ``n_heads`` sequences of ``n_keys`` keys: about ``target`` programs."""
    blocks = max(1, math.ceil(n_keys / block_k))
    per = max(1, math.ceil(n_heads * blocks / target), math.ceil(blocks / MAX_SPLITS))
    return math.ceil(blocks / per), per * block_k


def make_plan(G: int, kvh: int, R: int, g: int, pb: int, sb: int, n_sm: int, block_k: int = BLOCK_K) -> Plan:
    target = max(1, PROGRAMS_PER_SM * n_sm)
    qblock = min(_pow2(R * g, 16), MAX_QUERY_BLOCK)
    qblocks = math.ceil(R * g / qblock)
    sp, cp = _split(pb, G * kvh * qblocks, target, block_k)
    sr, cr = _split(sb, G * kvh * R, target, block_k)
    return Plan(qblock, qblocks, sp, sr, cp, cr, block_k, NUM_WARPS)


@dataclass
class Workspace:
    """Preallocated buffers of one (pb, sb) bucket: float32 partials and the output (no allocation in a graph)."""

    G: int
    kvh: int
    R: int
    g: int
    d: int
    pb: int
    sb: int
    plan: Plan
    acc: torch.Tensor  # [Q, n_splits, d] float32
    m: torch.Tensor  # [Q, n_splits] float32 (log2 domain)
    l: torch.Tensor  # [Q, n_splits] float32
    out: torch.Tensor  # [G, kvh, R, g, 1, d] in the model dtype: a view of storage laid out [G, R, kvh, g, 1, d]

    @classmethod
    def create(cls, G: int, kvh: int, R: int, g: int, d: int, pb: int, sb: int, dtype: torch.dtype,
               device: torch.device) -> Workspace:
        if min(G, kvh, R, g, d, pb, sb) < 1:
            raise ValueError(f"decode attention: every size must be >= 1, got G={G} kvh={kvh} R={R} g={g} "
                             f"d={d} pb={pb} sb={sb}")
        device = torch.device(device)
        n_sm = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4)
        plan = make_plan(G, kvh, R, g, pb, sb, n_sm, BLOCK_K // 2 if dtype == torch.float32 else BLOCK_K)
        Q = G * kvh * R * g
        f32 = {"device": device, "dtype": torch.float32}
        return cls(G, kvh, R, g, d, pb, sb, plan, torch.empty(Q, plan.n_splits, d, **f32),
                   torch.empty(Q, plan.n_splits, **f32), torch.empty(Q, plan.n_splits, **f32),
                   torch.empty(G, R, kvh, g, 1, d, device=device, dtype=dtype).permute(0, 2, 1, 3, 4, 5))


def _check(ws: Workspace, q: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, prefix_len: torch.Tensor,
           k_row: torch.Tensor, v_row: torch.Tensor, pos: torch.Tensor) -> None:
    G, kvh, R, g, d = ws.G, ws.kvh, ws.R, ws.g, ws.d
    want = {"q": (q, (G, kvh, R, g, 1, d)), "k_pre": (k_pre, (G, kvh, ws.pb, d)),
            "v_pre": (v_pre, (G, kvh, ws.pb, d)), "k_row": (k_row, (G, kvh, R, ws.sb, d)),
            "v_row": (v_row, (G, kvh, R, ws.sb, d)), "prefix_len": (prefix_len, (G,)), "pos": (pos, (G * R,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"decode attention: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.device != ws.out.device:
            raise ValueError(f"decode attention: {name} is on {t.device}, the workspace on {ws.out.device}")
    if q.dtype != ws.out.dtype:
        raise ValueError(f"decode attention: q is {q.dtype} but the workspace was made for {ws.out.dtype}")
    for name, t in (("k_pre", k_pre), ("v_pre", v_pre), ("k_row", k_row), ("v_row", v_row)):
        if t.stride(-1) != 1:
            raise ValueError(f"decode attention: {name} must have a unit stride on its last (head_dim) axis")
        if t.dtype != q.dtype:
            raise ValueError(f"decode attention: {name} is {t.dtype} but q is {q.dtype}")


def decode_attention(q: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, prefix_len: torch.Tensor,
                     k_row: torch.Tensor, v_row: torch.Tensor, pos: torch.Tensor, scale: float,
                     ws: Workspace) -> torch.Tensor:
    """softmax(q·[k_pre | k_row]ᵀ·scale) · [v_pre | v_row] for one token per row; returns ``ws.out``.

    Shapes are in the module docstring. Launches two kernels and allocates nothing (CUDA-graph safe).
    """
    if triton is None:
        raise RuntimeError(f"decode attention needs triton: {_IMPORT_ERROR}")
    _check(ws, q, k_pre, v_pre, prefix_len, k_row, v_row, pos)
    q = q.contiguous()  # _rope_kv's output already is; a compiled variant could lay it out otherwise
    p = ws.plan
    n_pre = ws.G * ws.kvh * p.qblocks_p * p.splits_p
    grid = (n_pre + ws.G * ws.kvh * ws.R * p.splits_r,)
    bd = _pow2(ws.d, 16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for float32 inputs
    _partials_kernel[grid](
        q, k_pre, v_pre, k_row, v_row, prefix_len, pos, ws.acc, ws.m, ws.l,
        float(scale) * math.log2(math.e), ws.pb, ws.sb, n_pre, p.qblocks_p, p.splits_p, p.splits_r, p.chunk_p,
        p.chunk_r, p.n_splits,
        k_pre.stride(0), k_pre.stride(1), k_pre.stride(2), v_pre.stride(0), v_pre.stride(1), v_pre.stride(2),
        k_row.stride(0), k_row.stride(1), k_row.stride(2), k_row.stride(3),
        v_row.stride(0), v_row.stride(1), v_row.stride(2), v_row.stride(3),
        KVH=ws.kvh, R=ws.R, GQ=ws.g, D=ws.d, BD=bd, BQP=p.qblock_p, BQR=_pow2(ws.g, 16),
        BK=p.block_k, PRECISION=precision, num_warps=p.num_warps)
    n_q = ws.G * ws.kvh * ws.R * ws.g
    _combine_kernel[(n_q,)](ws.acc, ws.m, ws.l, ws.out, p.n_splits, KVH=ws.kvh, R=ws.R, GQ=ws.g, D=ws.d, BD=bd,
                            BS=16 if p.n_splits <= 16 else 32, num_warps=4)
    return ws.out


def reference(q: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor, prefix_len: torch.Tensor,
              k_row: torch.Tensor, v_row: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """The bmm math of ``FastDecoder._forward`` for one token per row (masks built from the same lengths)."""
    G, kvh, R, g, _, d = q.shape
    pb, sb = k_pre.shape[2], k_row.shape[3]
    neg = torch.tensor(float("-inf"), device=q.device, dtype=q.dtype)
    zero = torch.zeros((), device=q.device, dtype=q.dtype)
    slots_p = torch.arange(pb, device=q.device)
    pmask = torch.where(slots_p[None, :] < prefix_len[:, None], zero, neg)  # [G, pb]
    pmask = pmask[:, None, None, :].expand(G, kvh, 1, pb).reshape(G * kvh, 1, pb)
    slots_r = torch.arange(sb, device=q.device)
    rmask = torch.where(slots_r[None, :] <= pos[:, None], zero, neg).view(G, 1, R, 1, sb)
    rmask = rmask.expand(G, kvh, R, g, sb).reshape(G * kvh * R, g, sb)
    kp, vp = k_pre.reshape(G * kvh, pb, d), v_pre.reshape(G * kvh, pb, d)
    kr, vr = k_row.reshape(G * kvh * R, sb, d), v_row.reshape(G * kvh * R, sb, d)
    sp = torch.baddbmm(pmask, q.reshape(G * kvh, R * g, d), kp.transpose(1, 2), alpha=scale)
    sr = torch.baddbmm(rmask, q.reshape(G * kvh * R, g, d), kr.transpose(1, 2), alpha=scale)
    probs = torch.cat((sp.view(G, kvh, R, g, pb), sr.view(G, kvh, R, g, sb)), -1).softmax(-1)
    o = torch.bmm(probs[..., :pb].reshape(G * kvh, R * g, pb), vp)
    o = torch.baddbmm(o.view(G * kvh * R, g, d), probs[..., pb:].reshape(G * kvh * R, g, sb), vr)
    return o.view(G, kvh, R, g, 1, d)


@torch.no_grad()
def self_check(ws: Workspace, P: int, S: int, scale: float, seed: int = 0) -> str | None:
    """Run the kernel once on random data laid out like the decoder's caches (capacity ``P`` prefix and
    ``S`` row slots, so the strides and specialisations match the real launches) against ``reference``.

    Returns None when it agrees, else the reason (compile error, launch error, mismatch). The decoder calls
    it before it first uses a bucket, outside any graph capture: a kernel that cannot compile or is wrong on
    this device then costs a logged fallback to the bmm math, not a crash or a wrong answer.
    """
    if triton is None:
        return _IMPORT_ERROR
    dev, dtype = ws.out.device, ws.out.dtype
    G, kvh, R, g, d, pb, sb = ws.G, ws.kvh, ws.R, ws.g, ws.d, ws.pb, ws.sb
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    k_pre, v_pre = rnd(G, kvh, P, d)[:, :, :pb], rnd(G, kvh, P, d)[:, :, :pb]
    k_row, v_row = rnd(G, kvh, R, S, d)[:, :, :, :sb], rnd(G, kvh, R, S, d)[:, :, :, :sb]
    q = rnd(G, kvh, R, g, 1, d)
    prefix_len = torch.randint(1, pb + 1, (G,), device=dev, generator=gen)
    prefix_len[0] = pb  # the full bucket once
    pos = torch.randint(0, sb, (G * R,), device=dev, generator=gen)
    pos[0] = sb - 1
    try:
        got = decode_attention(q, k_pre, v_pre, prefix_len, k_row, v_row, pos, scale, ws).float()
    except Exception as exc:  # noqa: BLE001 - compile/launch errors become a reason, not a crash
        return f"kernel failed: {exc!r}"
    want = reference(q, k_pre, v_pre, prefix_len, k_row, v_row, pos, scale).float()
    if not torch.isfinite(got).all():
        return "kernel output is not finite"
    err = float((got - want).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if err > tol * (1.0 + float(want.abs().max())):
        return f"kernel disagrees with the bmm math: max abs error {err:.3g} (tolerance {tol:g})"
    return None
