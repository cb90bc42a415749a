"""Split-K decode attention (model/decode_attention.py) and the FastDecoder wired to it.

* Always (no triton needed): the attention switch, the split plan, and ``reference`` (the bmm math the
  runtime self-check compares against) against an independent per-row loop.
* With triton importable and ``TRITON_INTERPRET=1`` (CPU, float32; CI has no triton, so these skip there):
  the kernels in Triton's interpreter against the loop, and FastDecoder greedy traces with either attention.
* ``@gpu`` (CUDA): bf16 kernel vs the bmm math, the kernel replayed in a CUDA graph while lengths change, and
  the tiny model's traces with Triton vs bmm attention.

Every case fills the cache slots that must stay invisible (beyond ``prefix_len`` / ``pos``) with keys that
would dominate the softmax, so a masking error cannot hide in the tolerance.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import rand_image
from test_fast_decode import SEG2, assert_same, naive, sharp_scope

from model import decode_attention as da
from model import fast_decode as fd
from model.types import GenerationSettings, ImageInput

HAVE_TRITON = da.unavailable_reason() is None
INTERPRETED = HAVE_TRITON and da.interpreting()
interp_only = pytest.mark.skipif(not INTERPRETED, reason="needs triton and TRITON_INTERPRET=1")
_NO_GPU = ("needs CUDA" if not torch.cuda.is_available() else
           f"needs triton ({da.unavailable_reason()})" if not HAVE_TRITON else
           "TRITON_INTERPRET=1 runs the kernels on the host" if da.interpreting() else "")
needs_gpu = pytest.mark.skipif(bool(_NO_GPU), reason=_NO_GPU)

# (G, kvh, R, g, d, P, S, pb, sb, prefix_len per group, pos per row): block edges, single keys, full buckets
CASES = [
    (1, 2, 1, 2, 16, 200, 300, 128, 256, [100], [0]),
    (1, 2, 4, 3, 16, 160, 200, 160, 128, [1], [5, 127, 64, 63]),
    (4, 1, 1, 5, 32, 256, 128, 256, 128, [256, 3, 129, 64], [0, 1, 127, 65]),
    (4, 2, 4, 2, 16, 128, 96, 128, 96, [7, 128, 64, 65], list(range(0, 96, 6))),
    (1, 1, 4, 20, 24, 96, 64, 96, 64, [33], [2, 63, 31, 32]),  # 80 prefix queries: two query blocks; d=24
]


def make_inputs(case, dtype: torch.dtype, device: str, seed: int = 0):
    """Random q/K/V in the decoder's layout; hidden slots hold keys that would win the softmax."""
    G, kvh, R, g, d, P, S, pb, sb, plen, pos = case
    gen = torch.Generator().manual_seed(seed)
    k_pre_full = torch.randn(G, kvh, P, d, generator=gen)
    v_pre_full = torch.randn(G, kvh, P, d, generator=gen)
    k_row_full = torch.randn(G, kvh, R, S, d, generator=gen)
    v_row_full = torch.randn(G, kvh, R, S, d, generator=gen)
    q = torch.randn(G, kvh, R, g, 1, d, generator=gen) * 2.0  # peaked attention: one wrong key shows
    for a in range(G):
        k_pre_full[a, :, plen[a]:] = q[a].mean(dim=(1, 2, 3))[:, None, :] * 8.0
        v_pre_full[a, :, plen[a]:] = 1e3
        for r in range(R):
            k_row_full[a, :, r, pos[a * R + r] + 1:] = q[a, :, r].mean(dim=(1, 2))[:, None, :] * 8.0
            v_row_full[a, :, r, pos[a * R + r] + 1:] = -1e3
    to = {"device": device, "dtype": dtype}
    k_pre, v_pre = k_pre_full.to(**to)[:, :, :pb], v_pre_full.to(**to)[:, :, :pb]
    k_row, v_row = k_row_full.to(**to)[:, :, :, :sb], v_row_full.to(**to)[:, :, :, :sb]
    lens = torch.tensor(plen, device=device)
    poss = torch.tensor(pos, device=device)
    return q.to(**to).contiguous(), k_pre, v_pre, lens, k_row, v_row, poss


def loop_reference(q, k_pre, v_pre, prefix_len, k_row, v_row, pos, scale) -> torch.Tensor:
    """Independent float64 math: per (group, head, row), softmax over the valid prefix + row keys."""
    G, kvh, R, g, _, d = q.shape
    out = torch.empty(G, kvh, R, g, 1, d, dtype=torch.float64)
    for a in range(G):
        n = int(prefix_len[a])
        for h in range(kvh):
            for r in range(R):
                m = int(pos[a * R + r]) + 1
                keys = torch.cat([k_pre[a, h, :n], k_row[a, h, r, :m]]).double().cpu()
                vals = torch.cat([v_pre[a, h, :n], v_row[a, h, r, :m]]).double().cpu()
                s = q[a, h, r, :, 0].double().cpu() @ keys.T * scale
                out[a, h, r, :, 0] = s.softmax(-1) @ vals
    return out


# ---- always -------------------------------------------------------------------------------------------------
def test_attention_switch_and_cpu_resolution(monkeypatch):
    assert fd.attention_request("BMM") == "bmm"
    with pytest.raises(ValueError, match="attention must be one of"):
        fd.attention_request("flash")
    monkeypatch.setenv(fd.ATTENTION_ENV, "cuda-magic")
    with pytest.raises(ValueError, match=fd.ATTENTION_ENV):
        fd.attention_request()
    monkeypatch.setenv(fd.ATTENTION_ENV, "triton")
    assert fd.attention_request() == "triton"
    ts = sharp_scope()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dec = fd.FastDecoder(ts.model, max_prefix=8, max_row_len=40, inject_len=4)  # env asks for triton: CPU
    assert dec.attention == "bmm" and dec.attention_reason.startswith("cpu")
    assert fd.FastDecoder(ts.model, max_prefix=8, max_row_len=40, inject_len=4, attention="bmm").attention == "bmm"
    if not HAVE_TRITON:
        assert "triton" in da.unavailable_reason()
        with pytest.raises(RuntimeError, match="needs triton"):
            da.decode_attention(*make_inputs(CASES[0], torch.float32, "cpu"), 0.25, None)


@pytest.mark.parametrize("G,kvh,R,g,pb,sb,n_sm", [(1, 4, 1, 7, 1536, 128, 132), (4, 4, 8, 7, 1536, 256, 132),
                                                  (32, 4, 1, 7, 1536, 2048, 132), (1, 1, 4, 20, 96, 64, 4),
                                                  (2, 2, 3, 2, 8, 1, 1)])
def test_plan_covers_every_key_and_query(G, kvh, R, g, pb, sb, n_sm):
    p = da.make_plan(G, kvh, R, g, pb, sb, n_sm)
    for splits, chunk, n in ((p.splits_p, p.chunk_p, pb), (p.splits_r, p.chunk_r, sb)):
        assert chunk % p.block_k == 0 and 1 <= splits <= da.MAX_SPLITS
        assert splits * chunk >= n > (splits - 1) * chunk  # every key in exactly one split, no empty split
    assert p.qblock_p * p.qblocks_p >= R * g > p.qblock_p * (p.qblocks_p - 1)
    assert 16 <= p.qblock_p <= da.MAX_QUERY_BLOCK
    target = da.PROGRAMS_PER_SM * n_sm  # about this many programs per source, one more split per head at most
    assert G * kvh * p.qblocks_p * p.splits_p <= target + G * kvh * p.qblocks_p
    assert G * kvh * R * p.splits_r <= target + G * kvh * R


@pytest.mark.parametrize("case", CASES[:3])
def test_reference_is_the_joint_softmax(case):
    """``reference`` (what the self-check trusts) is the bmm math of _forward: equal to the loop."""
    args = make_inputs(case, torch.float32, "cpu")
    scale = case[4] ** -0.5
    torch.testing.assert_close(da.reference(*args, scale).double(), loop_reference(*args, scale),
                               atol=1e-4, rtol=1e-4)


# ---- Triton interpreter (CPU, float32) ------------------------------------------------------------------------
@pytest.fixture()
def interpreter_scalars(monkeypatch):
    """triton 3.6's interpreter turns scalars into 1-element arrays and ``int()``s them for ``range``; numpy
    >= 2.4 refuses that. Index them through ``.reshape(-1)[0]`` (what later triton releases do)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch)


@interp_only
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_math_in_the_interpreter(case, interpreter_scalars):
    G, kvh, R, g, d, P, S, pb, sb, *_ = case
    args = make_inputs(case, torch.float32, "cpu", seed=len(case[-1]))
    scale = d ** -0.5
    ws = da.Workspace.create(G, kvh, R, g, d, pb, sb, torch.float32, torch.device("cpu"))
    got = da.decode_attention(*args, scale, ws)
    assert got.data_ptr() == ws.out.data_ptr() and got.shape == (G, kvh, R, g, 1, d)
    want = loop_reference(*args, scale)
    assert want.abs().max() < 50  # the hidden slots (V = +-1e3) stayed hidden
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, da.reference(*args, scale), atol=2e-5, rtol=1e-5)
    assert da.self_check(ws, P, S, scale) is None


QUESTION, FREE_QUESTION = "Where is the water?", "Describe the scene."


def _traces(ts, monkeypatch, attention: str):
    """A forced trace with two [SEG] and a free greedy one on the fast path, with this attention."""
    monkeypatch.setenv(fd.ATTENTION_ENV, attention)
    fd.release_decoders(ts.model)
    ctx = ts.prepare([ImageInput(rand_image(90, 200, seed=1))])
    res = fd.fast_run(ts.generator, ctx, QUESTION, None, GenerationSettings(max_new_tokens=40),
                      forced_ids=ts.tokenizer.encode(SEG2))
    free = fd.fast_run(ts.generator, ctx, FREE_QUESTION, None, GenerationSettings(max_new_tokens=16))
    (dec,) = ts.model.__dict__["_ts_fast_decoders"].values()
    return res, free, dec, ctx


def _check_both_match_the_reference(ts, ctx, a, a_free, b, b_free) -> None:
    """Same ids, stops and selections; masks compared to the reference loop, which tolerates pixels at the
    0.5 threshold (the attentions round differently)."""
    ref = naive(ts, ctx, QUESTION, GenerationSettings(max_new_tokens=40), forced_ids=ts.tokenizer.encode(SEG2))
    ref_free = naive(ts, ctx, FREE_QUESTION, GenerationSettings(max_new_tokens=16))
    assert len(ref.steps) == 2
    for got, got_free in ((a, a_free), (b, b_free)):
        assert_same(ref, got)
        assert_same(ref_free, got_free)


@interp_only
def test_fast_decoder_traces_equal_with_kernel_in_the_interpreter(monkeypatch, interpreter_scalars):
    ts = sharp_scope()
    a, a_free, dec_a, ctx = _traces(ts, monkeypatch, "bmm")
    b, b_free, dec_b, _ = _traces(ts, monkeypatch, "triton")
    assert dec_a.attention == "bmm" and dec_b.attention == "triton", dec_b.attention_reason
    assert dec_b._attn_ws  # the kernel ran (one workspace per (pb, sb) bucket used)
    _check_both_match_the_reference(ts, ctx, a, a_free, b, b_free)


def _broken_launch(*args, **kwargs):
    raise RuntimeError("PTX JIT compilation failed (test)")


@interp_only
@pytest.mark.parametrize("where,patch", [("self_check", lambda *a, **k: "kernel disagrees with the bmm math: test"),
                                         ("decode_attention", _broken_launch)])
def test_a_failing_kernel_falls_back_to_bmm_with_a_logged_reason(where, patch, monkeypatch, caplog,
                                                                  interpreter_scalars):
    """A kernel that fails its check, or raises in a step, costs a logged fallback; the answer is bmm's."""
    ts = sharp_scope()
    b, _, _, _ = _traces(ts, monkeypatch, "bmm")
    if where == "decode_attention":  # let the self-check pass, then break the launches the steps make
        monkeypatch.setattr(da, "self_check", lambda *a, **k: None)
    monkeypatch.setattr(da, where, patch)
    with caplog.at_level(logging.WARNING, logger="terrascope.fast_decode"):
        a, _, dec, _ = _traces(ts, monkeypatch, "triton")
    assert dec.attention == "bmm" and ("disagrees" in dec.attention_reason or "PTX" in dec.attention_reason)
    assert "using bmm" in caplog.text
    assert a.token_ids == b.token_ids
    assert [st.token_indices for st in a.steps] == [st.token_indices for st in b.steps]


# ---- CUDA ---------------------------------------------------------------------------------------------------
def _errors(case, seed: int = 0) -> tuple[float, float, float]:
    args = make_inputs(case, torch.bfloat16, "cuda", seed=seed)
    G, kvh, R, g, d, _, _, pb, sb, *_ = case
    scale = d ** -0.5
    ws = da.Workspace.create(G, kvh, R, g, d, pb, sb, torch.bfloat16, torch.device("cuda"))
    got = da.decode_attention(*args, scale, ws).double().cpu()
    bmm = da.reference(*args, scale).double().cpu()
    want = loop_reference(*args, scale)
    return float((got - want).abs().max()), float((bmm - want).abs().max()), float(want.abs().max())


GPU_CASES = CASES + [
    (1, 4, 1, 7, 128, 2048, 512, 1536, 256, [1460], [130]),  # the 8B shape at batch 1
    (4, 4, 4, 7, 128, 2048, 512, 1536, 512, [1460, 1460, 300, 1536], [130, 511, 0, 64] * 4),
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_kernel_matches_bmm_math_bf16_on_cuda(case):
    err_k, err_b, top = _errors(case)
    assert top < 50  # nothing hidden leaked into the reference
    # bf16 inputs: the kernel keeps scores in float32, so it is at least as close as the bmm math
    assert err_k <= 2 * err_b + 4e-3 * top, (case, err_k, err_b, top)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_in_a_cuda_graph_follows_device_lengths(dtype):
    """Captured once; prefix_len, pos and the cache contents change in place between replays."""
    case = (2, 2, 2, 7, 128, 512, 256, 384, 256, [300, 384], [10, 255, 0, 128])
    G, kvh, R, g, d, _, _, pb, sb, *_ = case
    q, k_pre, v_pre, plen, k_row, v_row, pos = make_inputs(case, dtype, "cuda")
    ws = da.Workspace.create(G, kvh, R, g, d, pb, sb, dtype, torch.device("cuda"))
    scale = d ** -0.5
    da.decode_attention(q, k_pre, v_pre, plen, k_row, v_row, pos, scale, ws)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = da.decode_attention(q, k_pre, v_pre, plen, k_row, v_row, pos, scale, ws)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for lens, poss in (([300, 384], [10, 255, 0, 128]), ([1, 64], [0, 0, 64, 63]), ([129, 200], [200, 3, 7, 9])):
        plen.copy_(torch.tensor(lens))
        pos.copy_(torch.tensor(poss))
        q.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(dtype))
        k_row.copy_(torch.randn(k_row.shape, device="cuda", generator=gen).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = loop_reference(q, k_pre, v_pre, plen, k_row, v_row, pos, scale)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_gpu
def test_fast_decoder_traces_triton_vs_bmm_on_cuda(monkeypatch):
    ts = sharp_scope()
    ts.model.to("cuda")
    a, a_free, dec_a, ctx = _traces(ts, monkeypatch, "bmm")
    b, b_free, dec_b, _ = _traces(ts, monkeypatch, "triton")
    assert dec_a.attention == "bmm"
    assert dec_b.attention == "triton", f"fell back to bmm: {dec_b.attention_reason}"
    assert dec_b.use_graphs and dec_b._attn_ws and any(k[0] == "decode" for k in dec_b._graphs)
    _check_both_match_the_reference(ts, ctx, a, a_free, b, b_free)


@pytest.mark.gpu
@needs_gpu
def test_bf16_decoder_states_match_across_attention_on_cuda():
    """The same forced bf16 trace through both attentions: the last hidden state and the row caches agree to
    bf16 rounding (the tokens are forced, so both decoders see the same inputs)."""
    ts = sharp_scope()
    ts.model.to("cuda", torch.bfloat16)
    h = ts.model.config.llm.hidden_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    prefix = torch.randn(150, h, device="cuda", generator=gen).to(torch.bfloat16)
    prompt = torch.randn(9, h, device="cuda", generator=gen).to(torch.bfloat16)
    forced = list(np.random.default_rng(0).integers(10, 900, size=60))
    st = fd.DecodeSettings(stop_ids=(-1,), seg_id=-2, max_new_tokens=60)
    states = {}
    for attention in ("bmm", "triton"):
        dec = fd.FastDecoder(ts.model, max_prefix=256, max_row_len=200, inject_len=8, attention=attention)
        dec.set_prefix(0, prefix)
        out = dec.generate([fd.RowInput(0, prompt, forced)], st, lambda reqs: [])
        assert dec.attention == attention, dec.attention_reason
        assert out[0].token_ids == [int(t) for t in forced]
        states[attention] = (dec.hidden_out.float().clone(), dec.k_row[-1, 0, :, 0, :70].float().clone())
    for x, y in zip(states["bmm"], states["triton"]):
        err = float((x - y).abs().max())
        assert err <= 3e-2 * float(x.abs().max()), err
