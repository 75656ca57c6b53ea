"""The forward pass's small ops (hybrid/ops.py) against float64 NumPy.

Every op runs on both paths: `native` (hybrid._ops, checked to have been
called) and `torch` (ops.NATIVE off: what CUDA tensors get). Shapes are odd
(row lengths not multiples of the C loops' 16 lanes, one row, many rows).
Tolerances are float32's: a few ulp of the result's scale (exp to ~1 ulp, sums
of up to a few thousand terms). Non-contiguous and non-float32 inputs must take
the torch path and still be right; bad calls into the C module are ValueErrors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from gguf_retype import random_k_blocks
from hybrid import _ops, ops
from hybrid.quantize import quantize

RTOL = 2e-6


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Runs the test on one path; on the native one, checks afterwards that _ops was called."""
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(_ops, name)
            return lambda *args: (calls.append(name), fn(*args))[1]
    monkeypatch.setattr(ops, "_ops", Counting())
    monkeypatch.setattr(ops, "NATIVE", request.param == "native")
    yield request.param
    assert bool(calls) == (request.param == "native"), calls


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def t32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def close(got: torch.Tensor, want: np.ndarray, rtol: float = RTOL, scale: float | None = None):
    """|got - want| <= rtol * scale (default: the largest |want|), in float64."""
    assert tuple(got.shape) == want.shape
    assert got.dtype == torch.float32
    err = np.abs(got.double().numpy() - want).max(initial=0.0)
    bound = rtol * (np.abs(want).max(initial=0.0) if scale is None else scale)
    assert err <= bound, (err, bound)


def ref_sigmoid(x):
    """1 / (1 + e^-x), without overflow and exact to float64 at both ends."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def ref_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(1, 2048), (3, 37), (5, 1), (2, 4, 37)])
def test_rms_norm(path, rng, shape):
    """Row by row; [T, H, D] is Qwen3's per-head q/k norm (one weight [D] for every head)."""
    x = rng.normal(size=shape) * 3
    w = rng.normal(size=shape[-1])
    x32, w32 = t32(x), t32(w)
    close(ops.rms_norm(x32, w32, 1e-6), ref_rms_norm(x32.double().numpy(), w32.double().numpy(), 1e-6))


def test_rms_norm_columns(path, rng):
    """kv_cmpr: the norm of the first L columns of [T, L + R]."""
    x, w = t32(rng.normal(size=(3, 45))), t32(rng.normal(size=40))
    want = ref_rms_norm(x.double().numpy()[:, :40], w.double().numpy(), 1e-5)
    close(ops.rms_norm(x, w, 1e-5, slice(0, 40)), want)
    w5 = t32(rng.normal(size=5))
    close(ops.rms_norm(x, w5, 1e-5, slice(40, None)), ref_rms_norm(x.double().numpy()[:, 40:], w5.double().numpy(), 1e-5))


def ref_rope(x, cos, sin):
    """x [T, ..., n] rotated in consecutive pairs, cos/sin [T, n/2]."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def cos_sin(rng, n_pos, half):
    """A table over positions as `hybrid.model.Model.cos_sin` holds it: [n_pos, half] each."""
    ang = rng.uniform(-50, 50, size=(n_pos, half))
    return t32(np.cos(ang) * 1.3), t32(np.sin(ang) * 1.3)


def rows_of(table, pos):
    return table[0].double().numpy()[pos.numpy()], table[1].double().numpy()[pos.numpy()]


@pytest.mark.parametrize("pos", [[0], [7, 0, 31]])
def test_rope_keeps_the_head_part(path, rng, pos):
    """q_pe: [T, H, nope + rot], the rot part rotated by each token's row of the table, the nope
    part kept."""
    pos = torch.tensor(pos)
    x = t32(rng.normal(size=(len(pos), 5, 14 + 6)))
    table = cos_sin(rng, 32, 3)
    xd = x.double().numpy()
    want = np.concatenate([xd[..., :14], ref_rope(xd[..., 14:], *rows_of(table, pos))], -1)
    close(ops.rope(x, table, pos, 14), want)


def test_rope_tail_only(path, rng):
    """k_pe: the rotated last columns of [T, L + R] alone."""
    pos = torch.tensor([3, 4, 5, 6])
    x = t32(rng.normal(size=(4, 9 + 10)))
    table = cos_sin(rng, 7, 5)
    close(ops.rope(x, table, pos, 9, keep_from=9), ref_rope(x.double().numpy()[:, 9:], *rows_of(table, pos)))


def ref_rope_neox(x, cos, sin):
    """x [T, ..., n] rotated in the pairs (i, i + n/2) (ggml's NEOX mode), cos/sin [T, n/2]."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    x0, x1 = np.split(x, 2, axis=-1)
    return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], -1)


@pytest.mark.parametrize("pos", [[0], [7, 0, 31]])
def test_rope_neox(path, rng, pos):
    """Qwen3's q/k: [T, H, D] rotated whole, in NEOX pairs (i, i + D/2)."""
    pos = torch.tensor(pos)
    x = t32(rng.normal(size=(len(pos), 3, 18)))
    table = cos_sin(rng, 32, 9)
    close(ops.rope(x, table, pos, 0, neox=True), ref_rope_neox(x.double().numpy(), *rows_of(table, pos)))


def ref_softmax(x, scale=1.0, masked=None):
    z = x * scale
    if masked is not None:
        z = np.where(masked, -np.inf, z)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_masked(n_tok, n_past):
    """[T, n_kv] True where token t, at position n_past + t, may not attend (a later position)."""
    return np.arange(n_past + n_tok)[None, :] > (n_past + np.arange(n_tok))[:, None]


@pytest.mark.parametrize("n_tok,n_past", [(1, 0), (1, 40), (6, 0), (3, 17)])
def test_causal_softmax(path, rng, n_tok, n_past):
    kq = t32(rng.normal(size=(5, n_tok, n_past + n_tok)) * 20)
    got = ops.softmax(kq, 0.07, n_past)
    masked = ref_masked(n_tok, n_past)
    close(got, ref_softmax(kq.double().numpy(), 0.07, masked))
    assert (got[:, torch.from_numpy(masked)] == 0).all()


def test_append_kv(path, rng):
    """The CPY into the KV cache: after the n_past cached rows, the rest of the cache untouched;
    x may be a view (a per-head matmul's heads); the tail (k_pe) continues every head's row.
    The value is the cache itself."""
    n_ctx, n_past, n_tok, n_head = 11, 4, 3, 5
    cache = t32(rng.normal(size=(n_ctx, n_head, 7 + 3)))
    before = cache.double().numpy().copy()
    k_nope = t32(rng.normal(size=(n_tok, n_head, 9)))[..., 2:]                 # [T, H, 7], rows strided
    k_pe = t32(rng.normal(size=(n_tok, 3)))
    got = ops.append_kv(cache, n_past, k_nope, k_pe)
    want = before.copy()
    want[n_past:n_past + n_tok, :, :7] = k_nope.double().numpy()
    want[n_past:n_past + n_tok, :, 7:] = k_pe.double().numpy()[:, None, :]
    close(cache, want, rtol=0, scale=1)
    assert got is cache
    v = t32(rng.normal(size=(n_tok, n_head, 10)))
    close(ops.append_kv(cache, 0, v)[:n_tok], v.double().numpy(), rtol=0, scale=1)


def test_append_kv_compressed(path, rng):
    """MLA's cache [n_ctx, L + R]: kv_cmpr [T, L] then k_pe [T, R] per position."""
    cache = t32(np.zeros((9, 13 + 4)))
    kv_cmpr, k_pe = t32(rng.normal(size=(2, 13))), t32(rng.normal(size=(2, 4)))
    got = ops.append_kv(cache, 7, kv_cmpr, k_pe)
    want = np.zeros((9, 17))
    want[7:] = np.concatenate([kv_cmpr.double().numpy(), k_pe.double().numpy()], -1)
    assert got is cache
    close(cache, want, rtol=0, scale=1)
    with pytest.raises(ValueError):                                              # position 9 of 9
        ops.append_kv(cache, 8, kv_cmpr, k_pe)


@pytest.fixture
def any_batch_native(monkeypatch):
    """Batches of any size on the native kq/kqv (by default larger ones run in torch)."""
    monkeypatch.setattr(ops, "MAX_NATIVE_ATTN_TOKENS", 1 << 20)


@pytest.mark.parametrize("n_tok,n_past", [(1, 0), (1, 18), (3, 5), (11, 2)])
def test_kq_and_kqv(path, rng, any_batch_native, n_tok, n_past):
    """Standard attention: q [T, H, D], K [n_kv, H, D], V [n_kv, H, Dv] (views of the cache),
    odd sizes, more tokens than a block of the C loops."""
    n_head, d, dv, n_kv = 3, 37, 21, n_past + n_tok
    q = t32(rng.normal(size=(n_tok, n_head, d)))
    k = t32(rng.normal(size=(n_kv + 4, n_head, d)))[:n_kv]
    v = t32(rng.normal(size=(n_kv, n_head, dv)))
    qd, kd, vd = q.double().numpy(), k.double().numpy(), v.double().numpy()
    close(ops.kq(q, k), np.einsum("thd,shd->hts", qd, kd), rtol=1e-6)
    pr = t32(ref_softmax(rng.normal(size=(n_head, n_tok, n_kv)), masked=ref_masked(n_tok, n_past)))
    close(ops.kqv(pr, v), np.einsum("hts,shd->thd", pr.double().numpy(), vd), rtol=1e-6)


@pytest.mark.parametrize("n_tok,n_past", [(1, 0), (3, 5), (11, 2)])
def test_kq_and_kqv_grouped(path, rng, any_batch_native, n_tok, n_past):
    """GQA: 6 query heads over 2 cached K/V heads, query head h reading cached head h // 3."""
    n_head, n_head_kv, d, n_kv = 6, 2, 19, n_past + n_tok
    q = t32(rng.normal(size=(n_tok, n_head, d)))
    k = t32(rng.normal(size=(n_kv, n_head_kv, d)))
    v = t32(rng.normal(size=(n_kv, n_head_kv, d)))
    kd, vd = (np.repeat(t.double().numpy(), 3, axis=1) for t in (k, v))
    close(ops.kq(q, k), np.einsum("thd,shd->hts", q.double().numpy(), kd), rtol=1e-6)
    pr = t32(ref_softmax(rng.normal(size=(n_head, n_tok, n_kv)), masked=ref_masked(n_tok, n_past)))
    close(ops.kqv(pr, v), np.einsum("hts,shd->thd", pr.double().numpy(), vd), rtol=1e-6)


@pytest.mark.parametrize("n_tok,n_past", [(1, 0), (2, 7), (9, 30)])
def test_kq_and_kqv_compressed(path, rng, any_batch_native, n_tok, n_past):
    """MLA: one cache row [L + R] per position for every head; q in two parts, q_nope absorbed
    [T, H, L] and q_pe [T, H, R] (a view into q's rows); V the cache's first L columns."""
    n_head, L, R, n_kv = 4, 35, 6, n_past + n_tok
    q_abs = t32(rng.normal(size=(n_tok, n_head, L)))
    q = t32(rng.normal(size=(n_tok, n_head, 10 + R)))
    kv = t32(rng.normal(size=(n_kv, L + R)))
    q_cat = np.concatenate([q_abs.double().numpy(), q.double().numpy()[..., 10:]], -1)
    close(ops.kq(q_abs, kv, q[..., 10:]), np.einsum("thd,sd->hts", q_cat, kv.double().numpy()), rtol=1e-6)
    pr = t32(ref_softmax(rng.normal(size=(n_head, n_tok, n_kv)), masked=ref_masked(n_tok, n_past)))
    want = np.einsum("hts,sl->thl", pr.double().numpy(), kv.double().numpy()[:, :L])
    close(ops.kqv(pr, kv[:, :L]), want, rtol=1e-6)


def ref_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, n_past: int, scale: float) -> np.ndarray:
    """Causal attention in float64: q [T, H, D], k [n_kv, H, D] (or [n_kv, D]), v likewise -> [T, H, Dv]."""
    heads = k.ndim == 3
    scores = np.einsum("thd,shd->hts" if heads else "thd,sd->hts", q, k)
    pr = ref_softmax(scores, scale, ref_masked(q.shape[0], n_past))
    return np.einsum("hts,shd->thd" if heads else "hts,sd->thd", pr, v)


@pytest.mark.parametrize("threads", [0, 1, 3])
@pytest.mark.parametrize("n_tok,n_past", [(1, 0), (1, 18), (3, 5), (11, 2)])
def test_flash_attn(path, rng, any_batch_native, n_tok, n_past, threads):
    """FLASH_ATTN_EXT over the first n_past + T rows of whole caches (standard: per-head K and V;
    MLA: one row per position, q in two parts, V its first L columns), on this thread (0) or
    with its heads shared by a pool of 1 or 3 threads, against float64: causal, scaled."""
    from hybrid._kernels import Pool
    pool = Pool(threads, True) if threads else None
    times = np.zeros((threads, 3), np.int64) if threads else None
    try:
        n_head, d, dv, n_kv, n_ctx = 5, 37, 21, n_past + n_tok, n_past + n_tok + 3
        q = t32(rng.normal(size=(n_tok, n_head, d)))
        k = t32(rng.normal(size=(n_ctx, n_head, d)))
        v = t32(rng.normal(size=(n_ctx, n_head, dv)))
        got = ops.flash_attn(q, k, v, n_past, 0.3, pool=pool, times=times)
        want = ref_attention(q.double().numpy(), k.double().numpy()[:n_kv], v.double().numpy()[:n_kv], n_past, 0.3)
        close(got, want, rtol=1e-5)
        if threads:     # one chunk per head natively; torch's ops as one task of the pool
            assert times[:, 2].sum() == (n_head if path == "native" else 1)
        k_grouped, v_grouped = k[:, :1].contiguous(), v[:, :1].contiguous()         # GQA: 5 heads read 1
        got = ops.flash_attn(q, k_grouped, v_grouped, n_past, 0.3, pool=pool, times=times)
        want = ref_attention(q.double().numpy(), np.repeat(k_grouped.double().numpy()[:n_kv], n_head, 1),
                             np.repeat(v_grouped.double().numpy()[:n_kv], n_head, 1), n_past, 0.3)
        close(got, want, rtol=1e-5)
        L, R = 35, 6
        q_abs, q_full = t32(rng.normal(size=(n_tok, n_head, L))), t32(rng.normal(size=(n_tok, n_head, 10 + R)))
        kv = t32(rng.normal(size=(n_ctx, L + R)))
        got = ops.flash_attn(q_abs, kv, kv[:, :L], n_past, 0.3, q_full[..., 10:], pool=pool, times=times)
        q_cat = np.concatenate([q_abs.double().numpy(), q_full.double().numpy()[..., 10:]], -1)
        want = ref_attention(q_cat, kv.double().numpy()[:n_kv], kv.double().numpy()[:n_kv, :L], n_past, 0.3)
        close(got, want, rtol=1e-5)
    finally:
        if pool is not None:
            pool.close()


def test_large_batches_take_torch(rng, monkeypatch):
    """kq and kqv of a prompt batch above MAX_NATIVE_ATTN_TOKENS: torch's GEMM, same values."""
    monkeypatch.setattr(ops, "_ops", None)                     # any native call would raise
    n_tok, n_head, d = ops.MAX_NATIVE_ATTN_TOKENS + 1, 2, 8
    q, k = t32(rng.normal(size=(n_tok, n_head, d))), t32(rng.normal(size=(n_tok, n_head, d)))
    close(ops.kq(q, k), np.einsum("thd,shd->hts", q.double().numpy(), k.double().numpy()), rtol=1e-6)
    pr = t32(rng.uniform(size=(n_head, n_tok, n_tok)))
    close(ops.kqv(pr, k), np.einsum("hts,shd->thd", pr.double().numpy(), k.double().numpy()), rtol=1e-6)


def test_router_softmax_and_sigmoid(path, rng):
    logits = t32(rng.normal(size=(3, 67)) * 30)
    ld = logits.double().numpy()
    close(ops.softmax(logits), ref_softmax(ld))
    close(ops.sigmoid(logits), ref_sigmoid(ld), rtol=4e-7)


def test_exp_range(path):
    """The native exp's range reduction and its ends: e^-100 and below is 0, large inputs saturate."""
    x = t32(np.concatenate([np.linspace(-120, 120, 2001), [-1e30, 1e30, 0.0, -87.0, 88.0]]))
    close(ops.sigmoid(x), ref_sigmoid(x.double().numpy()), rtol=4e-7)
    tiny = t32(np.linspace(-87, -17, 7001))                    # sigmoid = e^x here: exp's own error
    want = ref_sigmoid(tiny.double().numpy())
    assert (np.abs(ops.sigmoid(tiny).double().numpy() - want) / want).max() < 4e-7
    g = t32(np.linspace(-100, 100, 1001))
    u = t32(np.ones(1001))
    gd = g.double().numpy()
    close(ops.swiglu(g, u), gd * ref_sigmoid(gd), rtol=4e-7)
    row = t32(np.linspace(-80, 10, 333))[None]
    close(ops.softmax(row), ref_softmax(row.double().numpy()), rtol=4e-7)


def test_add_swiglu_and_moe_sums(path, rng):
    a, b = t32(rng.normal(size=(3, 41))), t32(rng.normal(size=(3, 41)))
    bias = t32(rng.normal(size=41))
    ad, bd = a.double().numpy(), b.double().numpy()
    close(ops.add(a, b), ad + bd)
    close(ops.add(a, bias), ad + bias.double().numpy())
    g, u = t32(rng.normal(size=(2, 3, 35)) * 5), t32(rng.normal(size=(2, 3, 35)))
    gd = g.double().numpy()
    close(ops.swiglu(g, u), gd * ref_sigmoid(gd) * u.double().numpy())
    down, w = t32(rng.normal(size=(4, 6, 33))), t32(rng.uniform(size=(4, 6)))
    dd, wd = down.double().numpy(), w.double().numpy()
    close(ops.scale_rows(down, w), dd * wd[..., None])
    close(ops.sum_experts(down), dd.sum(1), rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_elementwise_ops_shared_by_a_pool(path, rng, threads):
    """A prompt's ADD (same shape, and a bias), GLU and MUL of the expert weights, their rows
    shared by a pool in chunks of >= 16K elements (several here, the last short), against
    float64; the torch path runs as one task of the pool."""
    from hybrid._kernels import Pool
    pool, times = Pool(threads, True), np.zeros((threads, 3), np.int64)
    try:
        a, b, bias = t32(rng.normal(size=(37, 1031))), t32(rng.normal(size=(37, 1031))), t32(rng.normal(size=1031))
        ad = a.double().numpy()
        close(ops.add(a, b, pool=pool, times=times), ad + b.double().numpy())
        assert times[:, 2].sum() == (3 if path == "native" else 1)          # 38147 elements: 16K, 16K, 5.4K
        close(ops.add(a, bias, pool=pool, times=times), ad + bias.double().numpy())
        assert times[:, 2].sum() == (3 if path == "native" else 1)          # 16 rows (16496), 16, 5 rows
        g, u = t32(rng.normal(size=(5, 9000)) * 5), t32(rng.normal(size=(5, 9000)))
        gd = g.double().numpy()
        close(ops.swiglu(g, u, pool=pool, times=times), gd * ref_sigmoid(gd) * u.double().numpy())
        down, w = t32(rng.normal(size=(7, 6, 2048))), t32(rng.uniform(size=(7, 6)))
        close(ops.scale_rows(down, w, pool=pool, times=times), down.double().numpy() * w.double().numpy()[..., None])
        assert times[:, 2].sum() == (6 if path == "native" else 1)          # 42 rows of 2048, 8 a chunk
    finally:
        pool.close()


def ref_top_k(sel, k, n_groups=0, n_groups_used=0):
    """As tests/reference_deepseek2.py routes: stable argsort, groups by their two best."""
    out = []
    for row in sel:
        if n_groups > 1:
            groups = row.reshape(n_groups, -1)
            score = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
            keep = np.argsort(-score, kind="stable")[:n_groups_used]
            masked = np.full_like(groups, -np.inf)
            masked[keep] = groups[keep]
            row = masked.reshape(-1)
        out.append(np.argsort(-row, kind="stable")[:k])
    return np.array(out)


def test_top_k(path, rng):
    sel = t32(rng.uniform(size=(5, 64)))
    ids = ops.top_k(sel, 6)
    assert ids.dtype == torch.int64
    np.testing.assert_array_equal(ids.numpy(), ref_top_k(sel.numpy(), 6))
    grouped = ops.top_k(sel, 6, n_groups=8, n_groups_used=3)
    np.testing.assert_array_equal(grouped.numpy(), ref_top_k(sel.numpy(), 6, 8, 3))


def test_top_k_ties_go_to_the_lower_index(monkeypatch):
    """The native path picks ties as the reference's stable sort (torch's order is unspecified)."""
    monkeypatch.setattr(ops, "NATIVE", True)        # (also under HYPROF_OPS=torch)
    sel = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    np.testing.assert_array_equal(ops.top_k(sel, 4).numpy(), [[1, 3, 0, 2]])


@pytest.mark.parametrize("norm,scale", [(False, 0.0), (True, 2.5), (False, 16.0)])
def test_expert_weights(path, rng, norm, scale):
    probs = t32(rng.uniform(size=(3, 64)))
    ids = torch.from_numpy(ref_top_k(probs.numpy(), 6))
    want = np.take_along_axis(probs.double().numpy(), ids.numpy(), 1)
    if norm:
        want = want / want.sum(-1, keepdims=True)
    if scale:
        want = want * scale
    close(ops.expert_weights(probs, ids, norm, scale), want)


def stored_rows(rng, qtype, n_rows=11, n_cols=256):
    """A token-embedding-like tensor as `hybrid.weights.Weight.data` holds it, and its values
    as gguf-py dequantises them (float64)."""
    values = rng.normal(size=(n_rows, n_cols)).astype(np.float32)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):                   # random bits: every field exercised
        stored = random_k_blocks(qtype, n_rows * n_cols // 256, 1.0, rng).reshape(n_rows, -1)
    else:
        stored = quantize(values, qtype)
    data = torch.from_numpy(stored)
    if qtype == T.BF16:
        data = data.view(torch.bfloat16)
    return data, gguf_dequantize(stored, qtype).astype(np.float64)


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("n_tok,k,n", [(1, 2048, 64), (3, 40, 7), (5, 16, 1), (70, 24, 19)])
def test_matmul_f32(path, rng, n_tok, k, n, threads):
    """The router's matmul on its float32 weight, widths on and off the 16-lane blocks, rows on and
    off the chunks of 8, more tokens than a chunk's 64, on this thread (0) or shared by a pool."""
    from hybrid._kernels import Pool
    pool = Pool(threads, True) if threads else None
    times = np.zeros((threads, 3), np.int64) if threads else None
    try:
        x, w = rng.standard_normal((n_tok, k)), rng.standard_normal((n, k))
        got = ops.matmul_f32(t32(x), t32(w), pool=pool, times=times)
        close(got, t32(x).double().numpy() @ t32(w).double().numpy().T, rtol=1e-5)
        if threads:     # one chunk per 8 rows natively; torch's matmul as one task of the pool
            assert times[:, 2].sum() == (-(-n // 8) if path == "native" else 1)
    finally:
        if pool is not None:
            pool.close()


def test_argmax(path, rng):
    """The greedy token: the largest logit, the first of equal ones (as NumPy's argmax)."""
    x = rng.standard_normal(102400).astype(np.float32)
    assert ops.argmax(t32(x)) == int(np.argmax(x))
    x[[7, 500, 90000]] = x.max() + 1
    assert ops.argmax(t32(x)) == 7
    assert ops.argmax(t32(x.reshape(2, -1))) == int(np.argmax(x[51200:]))      # the last row
    x[[70001, 70002, 90000]] = x.max() + 1
    assert ops.argmax(t32(x)) == 70001


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL, T.Q4_K, T.Q5_K,
                                   T.Q6_K, T.IQ4_XS])
def test_get_rows(path, rng, qtype):
    data, values = stored_rows(rng, qtype)
    ids = torch.tensor([3, 0, 10, 3])
    close(ops.get_rows(data, int(qtype), 256, ids), values[ids.numpy()], rtol=0, scale=1)


def test_get_rows_of_other_types_dequantise_in_torch(rng, monkeypatch):
    monkeypatch.setattr(ops, "_ops", None)                     # any native call would raise
    data, values = stored_rows(rng, T.Q4_1)
    close(ops.get_rows(data, int(T.Q4_1), 256, torch.tensor([7, 1])), values[[7, 1]], rtol=1e-7)


def test_non_contiguous_and_other_dtypes_take_torch(rng, monkeypatch):
    """Views that are not C-contiguous, float64, int32 ids: the torch path, same values."""
    monkeypatch.setattr(ops, "_ops", None)                     # any native call would raise
    x = t32(rng.normal(size=(8, 6))).T                         # [6, 8], transposed
    w = t32(rng.normal(size=8))
    close(ops.rms_norm(x, w, 1e-6), ref_rms_norm(x.double().numpy(), w.double().numpy(), 1e-6))
    close(ops.add(x, x), 2 * x.double().numpy())
    close(ops.softmax(x), ref_softmax(x.double().numpy()))
    xd = x.double()
    assert ops.swiglu(xd, xd).dtype == torch.float64
    probs = t32(rng.uniform(size=(2, 8)))
    ids = torch.tensor([[1, 0], [2, 7]]).T                     # non-contiguous int64
    want = np.take_along_axis(probs.double().numpy(), ids.numpy(), 1)
    close(ops.expert_weights(probs, ids, False, 0.0), want)
    close(ops.expert_weights(probs, ids.int(), False, 0.0), want)
    q = t32(rng.normal(size=(2, 3, 5))).transpose(1, 2)        # [2, 5, 3]: rows not contiguous
    k = t32(rng.normal(size=(4, 5, 3)))
    close(ops.kq(q, k), np.einsum("thd,shd->hts", q.double().numpy(), k.double().numpy()), rtol=1e-6)
    pr = t32(rng.uniform(size=(5, 4, 2))).transpose(1, 2)      # [5, 2, 4]
    close(ops.kqv(pr, k), np.einsum("hts,shd->thd", pr.double().numpy(), k.double().numpy()), rtol=1e-6)
    cache = torch.zeros(6, 5, 3, dtype=torch.float64)
    ops.append_kv(cache, 1, q)
    close(cache[1:3].float(), q.double().numpy(), rtol=0, scale=1)
    table = cos_sin(rng, 4, 1)
    pos = torch.tensor([3, 1], dtype=torch.int32)
    close(ops.rope(q, table, pos, 1), np.concatenate([q.double().numpy()[..., :1],
                                                      ref_rope(q.double().numpy()[..., 1:], *rows_of(table, pos))], -1))


def addr(a: np.ndarray) -> int:
    return a.ctypes.data


F4, ID = np.zeros(64, np.float32), np.zeros(8, np.int64)


@pytest.mark.parametrize("call", [
    lambda: _ops.add(addr(F4), 10, addr(F4), 3, addr(F4)),                        # b does not repeat over a
    lambda: _ops.add(addr(F4), 10, 0, 10, addr(F4)),                              # null address
    lambda: _ops.add(addr(F4), -1, addr(F4), 1, addr(F4)),                        # negative size
    lambda: _ops.add(addr(F4), 10, addr(F4)),                                     # missing argument
    lambda: _ops.rms_norm(addr(F4), 2, 5, 3, 5, addr(F4), 1e-6, addr(F4)),        # columns past the row
    lambda: _ops.rope(addr(F4), 2, 6, 0, 6, 3, 4, 1, addr(F4), addr(F4), addr(ID), 8, 0, addr(F4)),
    lambda: _ops.rope(addr(F4), 3, 6, 0, 6, 2, 4, 2, addr(F4), addr(F4), addr(ID), 8, 0, addr(F4)),  # tokens of 2
    lambda: _ops.rope(addr(F4), 2, 6, 0, 6, 2, 4, 1, addr(F4), addr(F4), addr(np.array([0, 8])), 8, 0, addr(F4)),
    lambda: _ops.softmax(addr(F4), 3, 4, 1.0, 2, 0, addr(F4)),                     # 3 rows, tokens of 2
    lambda: _ops.softmax(addr(F4), 3, 0, 1.0, 0, 0, addr(F4)),                     # rows of no columns
    lambda: _ops.append_kv(3, addr(F4), 4, 2, 1, addr(F4), 8, 0, 8, 0, 0, 0, 0),   # positions 3, 4 of 4
    lambda: _ops.append_kv(0, addr(F4), 4, 2, 1, addr(F4), 6, 0, 6, 0, 2, 0, 2),   # a tail at address 0
    lambda: _ops.kq(addr(F4), 4, 4, 4, 0, 0, 0, 2, 1, 1, addr(F4), 6, 0, 1, 3, addr(F4)),  # a q_pe at address 0
    lambda: _ops.kqv(addr(F4), 1, 1, -3, addr(F4), 4, 0, 1, 4, addr(F4)),          # negative size
    lambda: _ops.kqv(addr(F4), 1, 3, 2, addr(F4), 4, 0, 2, 4, addr(F4)),           # 3 heads, groups of 2
    lambda: _ops.flash_attn(0, addr(F4), 4, 4, 2, 0, 0, 0, 2, addr(F4), 4, 0, addr(F4), 4, 0, 4, 1, 1, 1, 1.0,
                            addr(F4), None, None),                                  # a q_pe at address 0
    lambda: _ops.flash_attn(0, addr(F4), 4, 4, 4, 0, 0, 0, 0, addr(F4), 4, 0, addr(F4), 4, 0, 4, 1, 1, 1, 1.0,
                            addr(F4), None, np.zeros(3, np.int64)),                 # times without a pool
    lambda: _ops.flash_attn(0, addr(F4), 4, 4, 4, 0, 0, 0, 0, addr(F4), 4, 0, addr(F4), 4, 0, 4, 1, 1, 1, 1.0,
                            addr(F4), "pool", None),                                # not a Pool
    lambda: _ops.top_k(addr(F4), 1, 12, 13, 0, 0, addr(ID)),                       # k > columns
    lambda: _ops.top_k(addr(F4), 1, 12, 2, 5, 2, addr(ID)),                        # groups do not divide
    lambda: _ops.get_rows(addr(F4), 2, 18, 2, 32, addr(np.array([2])), 1, addr(F4)),   # row 2 of 2
    lambda: _ops.get_rows(addr(F4), 2, 18, 8, 32, addr(np.array([0])), 1, addr(F4)),   # Q8_0 rows are 34 bytes
    lambda: _ops.get_rows(addr(F4), 2, 20, 3, 32, addr(np.array([0])), 1, addr(F4)),   # Q4_1: not native
    lambda: _ops.expert_weights(addr(F4), 1, 4, addr(np.array([0, 4])), 2, 0, 0.0, addr(F4)),  # expert 4 of 4
])
def test_bad_calls_raise(call):
    """What the arguments themselves show is checked in C: an error, never a stray access."""
    with pytest.raises((ValueError, IndexError, TypeError)):
        call()


@pytest.mark.parametrize("native", [True, False])
def test_out_reuses_its_memory(rng, monkeypatch, native):
    """An op node's `Out` hands back the same memory while the shape stays, regrows (by doubling)
    when it changes, and leaves outputs over KEEP_BYTES unkept; values are right each time."""
    monkeypatch.setattr(ops, "NATIVE", native)
    out = ops.Out()
    a, b = t32(rng.normal(size=(1, 40))), t32(rng.normal(size=(1, 40)))
    first = ops.add(a, b, out=out)
    close(first, a.double().numpy() + b.double().numpy())
    second = ops.add(b, b, out=out)
    close(second, 2 * b.double().numpy())
    if native:
        assert second.data_ptr() == first.data_ptr()
        for n_kv in range(41, 60):                                 # a softmax row growing by one each time
            x = t32(rng.normal(size=(2, 1, n_kv)))
            close(ops.softmax(x, out=out), ref_softmax(x.double().numpy()))
        assert out.flat.numel() == 164                             # 40, 82 (2 x 41), doubled: 164
    big = t32(rng.normal(size=(ops.KEEP_BYTES // 4 + 1,)))
    close(ops.add(big, big, out=out), 2 * big.double().numpy())
    assert out.tensor is None or out.tensor.numel() < big.numel()


def test_greedy_follows_the_logits_it_is_given(rng):
    """`ops.Greedy` works out the row once per logits tensor: new contents of the same tensor,
    and another tensor, give their own argmax."""
    greedy = ops.Greedy()
    logits = t32(rng.normal(size=(2, 50)))
    for _ in range(3):
        assert greedy(logits) == int(np.argmax(logits.numpy()[-1]))
        logits.copy_(t32(rng.normal(size=(2, 50))))
    other = t32(rng.normal(size=(1, 70)))
    assert greedy(other) == int(np.argmax(other.numpy()[-1]))
    assert greedy(logits.T.contiguous().T) == int(np.argmax(logits.numpy()[-1]))     # not contiguous: torch
