"""SLA in Triton: fused forward and backward kernels (``impl='triton'`` of :func:`slab.ops.linear_attention`).

Notation per batch-and-head stream: ``qr = relu(q)`` ``[Nq, D]``, ``kr = relu(k)`` ``[Nk, D]``,
``v`` ``[Nk, Dv]``, the state ``S = kr^T v`` ``[D, Dv]`` and key sum ``ks = sum_j kr_j`` ``[D]``.

Forward, ``out_n = (qr_n S) / den_n`` with ``den_n = qr_n . ks + eps``:

* :func:`_state_kernel`: one pass over the keys and values accumulates ``S`` and ``ks`` together
  (ReLU applied on load, float32 accumulators);
* :func:`_output_kernel`: per tile of queries, ``qr S`` and the normaliser (float32), divided and
  written once in the input dtype.

Backward, for an upstream gradient ``g_n`` and ``gd_n = g_n / den_n``, ``c_n = gd_n . out_n``:

* ``d qr_n = gd_n S^T - c_n ks`` and ``dq_n = d qr_n * [q_n > 0]``;
* ``dS = sum_n qr_n^T gd_n``, ``dks = -sum_n c_n qr_n``;
* ``d kr_j = v_j dS^T + dks`` and ``dk_j = d kr_j * [k_j > 0]``; ``dv_j = kr_j dS``.

``c_n`` is computed as ``qr_n . (gd_n S^T) / den_n``: the product ``gd_n S^T`` is needed for ``dq``
anyway, so ``out`` need not be stored or recomputed. Two kernels:

* :func:`_query_grad_kernel`: one pass over the queries and ``g`` writes ``dq`` and accumulates
  ``dS`` and ``dks``;
* :func:`_key_value_grad_kernel`: per tile of keys, ``dk`` and ``dv`` from ``dS`` and ``dks``.

The two passes that reduce over tokens (the state and its gradient) can split the tokens into
chunks, each written as a partial sum and added up afterwards (no atomics, so results are
deterministic): with few streams (batch 1, three heads) one program per stream would leave most of
a GPU idle.

Saved for backward: ``q``, ``k``, ``v`` as given plus the tiny ``S`` and ``ks``; the ReLUs and the
normaliser are recomputed. Inputs may have any strides; outputs and gradients are contiguous.

With ``TRITON_INTERPRET=1`` in the environment before Triton is imported (its own ``tl.sum`` & co. are
decorated then, ours when this module is imported) the kernels run in Triton's interpreter on CPU
tensors: how the tests run without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["linear_attention_triton", "unsupported", "INTERPRETED", "MAX_HEAD_DIM", "DTYPES"]


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


INTERPRETED = _interpreting()  # read once, here: it decided how the kernels below were built
MAX_HEAD_DIM = 128                                  # D and Dv; the state tile is [D, Dv] in one program
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_TOKENS = 64
MIN_TOKENS_PER_CHUNK = 256                          # below this a chunk's partial state costs more than it saves
# Dtypes whose k^T v runs as a half x half dot (exact products, float32 accumulator). The interpreter's
# tl.dot mis-multiplies bfloat16 (numpy has no bfloat16), so there bfloat16 takes the float32 dot.
_HALF_DOT_DTYPES = (torch.float16,) if INTERPRETED else (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- tile helpers
@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, stride_row, stride_col):
    """``[len(rows), len(cols)]`` tile as float32, zero outside ``n_rows`` x ``n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tile = tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _store_tile(ptr, tile, rows, cols, n_rows, n_cols, stride_row, stride_col):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
             tile.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stream_offset(stream, heads, stride_batch, stride_head):
    """Element offset of (batch, head) ``stream``, in int64: batch * stride can pass 2**31."""
    batch = (stream // heads).to(tl.int64)
    head = (stream % heads).to(tl.int64)
    return batch * stride_batch + head * stride_head


@triton.jit
def _chunk_bounds(n_tokens, tokens_per_chunk):
    start = tl.program_id(1) * tokens_per_chunk
    return start, tl.minimum(start + tokens_per_chunk, n_tokens)


# ---------------------------------------------------------------- forward
@triton.jit
def _state_kernel(k_ptr, v_ptr, state_ptr, ksum_ptr, heads, n_keys, head_dim, value_dim, tokens_per_chunk,
                  skb, skh, skn, skd, svb, svh, svn, svd,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HALF_DOT: tl.constexpr):
    """Partial ``S`` ``[D, Dv]`` and ``ks`` ``[D]`` of one token chunk of one stream (grid: streams x chunks)."""
    stream = tl.program_id(0)
    part = stream * tl.num_programs(1) + tl.program_id(1)
    k_ptr += _stream_offset(stream, heads, skb, skh)
    v_ptr += _stream_offset(stream, heads, svb, svh)
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    start, end = _chunk_bounds(n_keys, tokens_per_chunk)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        kr = tl.maximum(_load_tile(k_ptr, rows, cols_d, end, head_dim, skn, skd), 0.0)
        vt = _load_tile(v_ptr, rows, cols_dv, end, value_dim, svn, svd)
        ksum += tl.sum(kr, axis=0)
        if HALF_DOT:  # half x half products are exact in the float32 accumulator: tensor cores, no loss
            state = tl.dot(tl.trans(kr.to(k_ptr.dtype.element_ty)), vt.to(v_ptr.dtype.element_ty), state)
        else:
            state = tl.dot(tl.trans(kr), vt, state, input_precision="ieee")
    _store_tile(state_ptr + part * head_dim * value_dim, state, cols_d, cols_dv, head_dim, value_dim, value_dim, 1)
    tl.store(ksum_ptr + part * head_dim + cols_d, ksum, mask=cols_d < head_dim)


@triton.jit
def _load_state(state_ptr, ksum_ptr, stream, head_dim, value_dim, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``S`` ``[BLOCK_D, BLOCK_DV]`` and ``ks`` ``[BLOCK_D]`` of one stream (float32, zero-padded)."""
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    state = _load_tile(state_ptr + stream * head_dim * value_dim, cols_d, cols_dv, head_dim, value_dim, value_dim, 1)
    ksum = tl.load(ksum_ptr + stream * head_dim + cols_d, mask=cols_d < head_dim, other=0.0)
    return state, ksum


@triton.jit
def _output_kernel(q_ptr, state_ptr, ksum_ptr, out_ptr, heads, n_queries, head_dim, value_dim, eps,
                   sqb, sqh, sqn, sqd, sob, soh, son, sod,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``out = (qr S) / (qr . ks + eps)`` for one tile of queries (grid: streams x query tiles)."""
    stream = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    state, ksum = _load_state(state_ptr, ksum_ptr, stream, head_dim, value_dim, BLOCK_D, BLOCK_DV)
    q_ptr += _stream_offset(stream, heads, sqb, sqh)
    qr = tl.maximum(_load_tile(q_ptr, rows, cols_d, n_queries, head_dim, sqn, sqd), 0.0)
    den = tl.sum(qr * ksum[None, :], axis=1) + eps
    out = tl.dot(qr, state, input_precision="ieee") / den[:, None]
    _store_tile(out_ptr + _stream_offset(stream, heads, sob, soh), out, rows, cols_dv, n_queries, value_dim, son, sod)


# ---------------------------------------------------------------- backward
@triton.jit
def _query_grad_kernel(q_ptr, g_ptr, state_ptr, ksum_ptr, dq_ptr, dstate_ptr, dksum_ptr,
                       heads, n_queries, head_dim, value_dim, eps, tokens_per_chunk,
                       sqb, sqh, sqn, sqd, sgb, sgh, sgn, sgd, sdqb, sdqh, sdqn, sdqd,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       WRITE_DQ: tl.constexpr, REDUCE_DSTATE: tl.constexpr):
    """``dq`` of one query chunk, and its partial ``dS`` and ``dks`` (grid: streams x chunks)."""
    stream = tl.program_id(0)
    part = stream * tl.num_programs(1) + tl.program_id(1)
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    state, ksum = _load_state(state_ptr, ksum_ptr, stream, head_dim, value_dim, BLOCK_D, BLOCK_DV)
    q_ptr += _stream_offset(stream, heads, sqb, sqh)
    g_ptr += _stream_offset(stream, heads, sgb, sgh)
    dq_ptr += _stream_offset(stream, heads, sdqb, sdqh)
    dstate = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    dksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    start, end = _chunk_bounds(n_queries, tokens_per_chunk)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        q = _load_tile(q_ptr, rows, cols_d, end, head_dim, sqn, sqd)
        qr = tl.maximum(q, 0.0)
        den = tl.sum(qr * ksum[None, :], axis=1) + eps
        gd = _load_tile(g_ptr, rows, cols_dv, end, value_dim, sgn, sgd) / den[:, None]
        gd_st = tl.dot(gd, tl.trans(state), input_precision="ieee")          # gd S^T  [BLOCK_N, BLOCK_D]
        c = tl.sum(qr * gd_st, axis=1) / den                                  # gd . out
        if WRITE_DQ:
            dq = tl.where(q > 0, gd_st - c[:, None] * ksum[None, :], 0.0)
            _store_tile(dq_ptr, dq, rows, cols_d, end, head_dim, sdqn, sdqd)
        if REDUCE_DSTATE:
            dstate = tl.dot(tl.trans(qr), gd, dstate, input_precision="ieee")
            dksum -= tl.sum(c[:, None] * qr, axis=0)
    if REDUCE_DSTATE:
        _store_tile(dstate_ptr + part * head_dim * value_dim, dstate, cols_d, cols_dv, head_dim, value_dim,
                    value_dim, 1)
        tl.store(dksum_ptr + part * head_dim + cols_d, dksum, mask=cols_d < head_dim)


@triton.jit
def _key_value_grad_kernel(k_ptr, v_ptr, dstate_ptr, dksum_ptr, dk_ptr, dv_ptr, heads, n_keys, head_dim, value_dim,
                           skb, skh, skn, skd, svb, svh, svn, svd, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                           WRITE_DK: tl.constexpr, WRITE_DV: tl.constexpr):
    """``dk = (v dS^T + dks) * [k > 0]`` and ``dv = kr dS`` for one tile of keys (grid: streams x key tiles)."""
    stream = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d, cols_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dstate, dksum = _load_state(dstate_ptr, dksum_ptr, stream, head_dim, value_dim, BLOCK_D, BLOCK_DV)
    k = _load_tile(k_ptr + _stream_offset(stream, heads, skb, skh), rows, cols_d, n_keys, head_dim, skn, skd)
    if WRITE_DK:
        vt = _load_tile(v_ptr + _stream_offset(stream, heads, svb, svh), rows, cols_dv, n_keys, value_dim, svn, svd)
        dkr = tl.dot(vt, tl.trans(dstate), input_precision="ieee") + dksum[None, :]
        dk = tl.where(k > 0, dkr, 0.0)
        _store_tile(dk_ptr + _stream_offset(stream, heads, sdkb, sdkh), dk, rows, cols_d, n_keys, head_dim,
                    sdkn, sdkd)
    if WRITE_DV:
        dv = tl.dot(tl.maximum(k, 0.0), dstate, input_precision="ieee")
        _store_tile(dv_ptr + _stream_offset(stream, heads, sdvb, sdvh), dv, rows, cols_dv, n_keys, value_dim,
                    sdvn, sdvd)


# ---------------------------------------------------------------- launch
def _block(dim: int) -> int:
    # tl.dot needs every tile side >= 16 on GPUs; masking covers the padding (head_dim 7 -> 16).
    return max(16, triton.next_power_of_2(dim))


def _warps(head_dim: int, value_dim: int) -> int:
    # A [128, 128] float32 state is 64 KiB of registers: spread it over more threads.
    return 8 if max(head_dim, value_dim) > 64 else 4


def _token_chunks(streams: int, n_tokens: int, device: torch.device) -> tuple[int, int]:
    """``(chunks, tokens_per_chunk)`` for the passes that reduce over tokens.

    Enough programs to fill the GPU twice over, but chunks of at least ``MIN_TOKENS_PER_CHUNK``
    tokens; one chunk in the interpreter, where programs run one after another anyway.
    """
    if device.type != "cuda" or INTERPRETED:
        return 1, n_tokens
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(triton.cdiv(target, streams), n_tokens // MIN_TOKENS_PER_CHUNK))
    per_chunk = triton.cdiv(triton.cdiv(n_tokens, chunks), BLOCK_TOKENS) * BLOCK_TOKENS
    return triton.cdiv(n_tokens, per_chunk), per_chunk


def _sum_parts(parts: torch.Tensor, streams: int, chunks: int) -> torch.Tensor:
    """``[streams * chunks, ...]`` partial sums -> ``[streams, ...]`` (a no-op for one chunk)."""
    return parts if chunks == 1 else parts.view(streams, chunks, *parts.shape[1:]).sum(dim=1)


def _kv_state(k: torch.Tensor, v: torch.Tensor, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``S`` ``[B*H, D, Dv]`` and ``ks`` ``[B*H, D]`` in float32."""
    b, h, n, d = k.shape
    dv, streams = v.shape[3], b * h
    chunks, per_chunk = _token_chunks(streams, n, k.device) if chunks is None else (chunks, triton.cdiv(n, chunks))
    state = torch.empty(streams * chunks, d, dv, device=k.device, dtype=torch.float32)
    ksum = torch.empty(streams * chunks, d, device=k.device, dtype=torch.float32)
    half_dot = k.dtype == v.dtype and k.dtype in _HALF_DOT_DTYPES
    _state_kernel[(streams, chunks)](k, v, state, ksum, h, n, d, dv, per_chunk, *k.stride(), *v.stride(),
                                     BLOCK_N=BLOCK_TOKENS, BLOCK_D=_block(d), BLOCK_DV=_block(dv),
                                     HALF_DOT=half_dot, num_warps=_warps(d, dv))
    return _sum_parts(state, streams, chunks), _sum_parts(ksum, streams, chunks)


def _forward(q, k, v, eps: float, chunks: int | None = None):
    b, h, nq, d = q.shape
    dv = v.shape[3]
    state, ksum = _kv_state(k, v, chunks)
    out = torch.empty(b, h, nq, dv, device=q.device, dtype=q.dtype)
    grid = (b * h, triton.cdiv(nq, BLOCK_TOKENS))
    _output_kernel[grid](q, state, ksum, out, h, nq, d, dv, eps, *q.stride(), *out.stride(),
                         BLOCK_N=BLOCK_TOKENS, BLOCK_D=_block(d), BLOCK_DV=_block(dv), num_warps=_warps(d, dv))
    return out, state, ksum


def _query_grads(q, grad, state, ksum, eps: float, write_dq: bool, reduce_dstate: bool, chunks: int | None = None):
    """``dq`` (or None) and ``dS`` ``[B*H, D, Dv]``, ``dks`` ``[B*H, D]`` (or None, None)."""
    b, h, nq, d = q.shape
    dv, streams = grad.shape[3], b * h
    chunks, per_chunk = _token_chunks(streams, nq, q.device) if chunks is None else (chunks, triton.cdiv(nq, chunks))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if write_dq else q.new_empty(1, 1, 1, 1)
    dstate = torch.empty(streams * chunks if reduce_dstate else 1, d, dv, device=q.device, dtype=torch.float32)
    dksum = torch.empty(streams * chunks if reduce_dstate else 1, d, device=q.device, dtype=torch.float32)
    _query_grad_kernel[(streams, chunks)](q, grad, state, ksum, dq, dstate, dksum, h, nq, d, dv, eps, per_chunk,
                                          *q.stride(), *grad.stride(), *dq.stride(),
                                          BLOCK_N=BLOCK_TOKENS, BLOCK_D=_block(d), BLOCK_DV=_block(dv),
                                          WRITE_DQ=write_dq, REDUCE_DSTATE=reduce_dstate, num_warps=_warps(d, dv))
    if not reduce_dstate:
        return (dq if write_dq else None), None, None
    return (dq if write_dq else None), _sum_parts(dstate, streams, chunks), _sum_parts(dksum, streams, chunks)


def _key_value_grads(k, v, dstate, dksum, write_dk: bool, write_dv: bool):
    b, h, nk, d = k.shape
    dv_dim = v.shape[3]
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if write_dk else k.new_empty(1, 1, 1, 1)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if write_dv else v.new_empty(1, 1, 1, 1)
    grid = (b * h, triton.cdiv(nk, BLOCK_TOKENS))
    _key_value_grad_kernel[grid](k, v, dstate, dksum, dk, dv, h, nk, d, dv_dim,
                                 *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
                                 BLOCK_N=BLOCK_TOKENS, BLOCK_D=_block(d), BLOCK_DV=_block(dv_dim),
                                 WRITE_DK=write_dk, WRITE_DV=write_dv, num_warps=_warps(d, dv_dim))
    return (dk if write_dk else None), (dv if write_dv else None)


class _TritonLinearAttention(torch.autograd.Function):
    """Forward and backward through the kernels above; saves q, k, v (as given), ``S`` and ``ks``."""

    @staticmethod
    def forward(ctx, q, k, v, eps: float):
        out, state, ksum = _forward(q, k, v, eps)
        ctx.save_for_backward(q, k, v, state, ksum)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, state, ksum = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad = grad.to(q.dtype)
        dq, dstate, dksum = _query_grads(q, grad, state, ksum, ctx.eps, need_q, need_k or need_v)
        dk = dv = None
        if need_k or need_v:
            dk, dv = _key_value_grads(k, v, dstate, dksum, need_k, need_v)
        return dq, dk, dv, None


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[type[Exception], str] | None:
    """``(error class, why)`` when these inputs cannot take the Triton path, None when they can."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return ValueError, (f"q, k, v must share one dtype of {', '.join(str(t) for t in DTYPES)}; "
                            f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        return ValueError, f"head_dim and value_dim must be <= {MAX_HEAD_DIM}; got {q.shape[3]} and {v.shape[3]}"
    if not (q.device == k.device == v.device):
        return ValueError, f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}"
    if q.device.type != "cuda" and not INTERPRETED:
        return RuntimeError, (f"the Triton kernels need CUDA tensors (got {q.device.type} tensors); on CPU they run "
                              "only in Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
                              "before the process imports triton (importing slab does)")
    return None


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """SLA core through the Triton kernels; same contract as :func:`slab.ops.linear_attention`.

    Args:
        q: ``[B, H, Nq, D]``, k: ``[B, H, Nk, D]`` (before the ReLU kernel), v: ``[B, H, Nk, Dv]``; one dtype of
            float32 / float16 / bfloat16, ``D, Dv <= 128``, any strides.

    Returns:
        ``[B, H, Nq, Dv]`` in the inputs' dtype, contiguous; state and normaliser in float32.
    """
    problem = unsupported(q, k, v)
    if problem is not None:
        error, why = problem
        raise error(f"linear_attention(impl='triton'): {why}")
    return _TritonLinearAttention.apply(q, k, v, float(eps))
