"""PRepBN's training mix in Triton (``impl='triton'`` of :func:`slab.ops.prepbn.prepbn_mix`).

On ``x`` ``[M, C]`` (tokens x channels), with per-channel batch statistics ``mean_c``, ``invstd_c`` over the
``M`` tokens and per-token LayerNorm statistics ``mu_m``, ``rstd_m`` over the ``C`` channels:

    y = lam * (xhat_ln * ln_w + ln_b) + keep * (bn_w * xhat_bn + bn_b + alpha * x),   keep = 1 - lam,
    xhat_bn = (x - mean_c) * invstd_c,   xhat_ln = (x - mu_m) * rstd_m.

Forward, two passes over ``x``:

* :func:`_channel_stats_kernel`: per channel, the mean and the sum of squared deviations over the tokens
  (tile by tile, merged with Chan's parallel formula rather than as a raw sum of squares: activations with a
  large mean would cancel catastrophically in ``sum(x^2) - M mean^2``);
* :func:`_mix_forward_kernel`: per block of whole rows, the LN statistics in registers and the output,
  written once.

Backward, for the upstream gradient ``g``, also two passes over ``x`` and ``g``:

* :func:`_grad_channel_sums_kernel`: per channel, ``sum g``, ``sum g xhat_bn``, ``sum g xhat_ln`` and
  ``sum g x``; these are the parameter gradients (``d bn_b = keep sum g``, ``d bn_w = keep sum g xhat_bn``,
  ``d ln_b = lam sum g``, ``d ln_w = lam sum g xhat_ln``, ``d alpha = keep sum g x``) and what ``dx``'s BN
  term needs;
* :func:`_mix_backward_kernel`: per block of rows,
  ``dx = keep bn_w invstd (g - sum g / M - xhat_bn sum g xhat_bn / M) + keep alpha g
  + rstd (gw - mean_c gw - xhat_ln mean_c(gw xhat_ln))`` with ``gw = lam ln_w g`` (row means in registers).

Everything is accumulated in float32 whatever the input dtype; ``y`` and ``dx`` are written in ``x``'s dtype.
Saved for backward: ``x`` as given, and the tiny ``mean``, ``invstd`` ``[C]`` and ``mu``, ``rstd`` ``[M]``.
The reductions over tokens split into chunks written as partial results (combined afterwards: deterministic,
no atomics) when there are too few channel blocks to fill the GPU. Any ``M`` (1 included: the batch variance
is 0, the running variance becomes NaN as with ``torch.native_batch_norm``), any ``C <= MAX_CHANNELS``
(masked to the next power of two), any strides of ``x`` and ``g``.

Not covered (:func:`unsupported` says so and the automatic choice takes the torch path): float64, ``C >
MAX_CHANNELS`` (a row no longer fits one program), a LayerNorm without affine parameters in the mix. What
:func:`slab.ops.prepbn.prepbn_mix` itself never covers (RMSNorm, causal RepBN, masks) is listed there.

Run under ``TRITON_INTERPRET=1`` (set before Triton is imported) the kernels execute on CPU tensors in
Triton's interpreter: how they are tested without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear_attention import _interpreting

__all__ = ["prepbn_mix_triton", "unsupported", "INTERPRETED", "MAX_CHANNELS", "DTYPES"]

INTERPRETED = _interpreting()   # read once, here: it decided how the kernels below were built
MAX_CHANNELS = 8192             # whole rows live in one program (the LN statistics need every channel)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCE_ROWS = 64                # token tile of the passes that reduce over tokens
REDUCE_COLS = 64                # channel tile of those passes
ROW_TILE_ELEMENTS = 4096        # elements per program in the row passes: a few rows of a wide C, more of a narrow
MIN_ROWS_PER_CHUNK = 256        # below this a chunk's partial result costs more than the parallelism gains


# ---------------------------------------------------------------- forward
@triton.jit
def _channel_stats_kernel(x_ptr, mean_ptr, m2_ptr, n_rows, n_cols, rows_per_chunk, sxm, sxc,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean and sum of squared deviations of each channel over one chunk of tokens (grid: channel blocks x
    chunks); written to row ``chunk`` of ``[chunks, C]`` buffers."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_rows)
    col_ok = cols < n_cols
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < end) & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxc, mask=ok, other=0.0)
        x = x.to(tl.float32)
        n_tile = tl.sum(ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(n_tile, 1.0)
        dev = tl.where(ok, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        # Chan et al.: merge (count, mean, m2) with the tile's; exact for any split of the tokens.
        total = count + n_tile
        delta = tile_mean - mean
        weight = n_tile / tl.maximum(total, 1.0)
        mean += delta * weight
        m2 += tile_m2 + delta * delta * count * weight
        count = total
    tl.store(mean_ptr + chunk * n_cols + cols, mean, mask=col_ok)
    tl.store(m2_ptr + chunk * n_cols + cols, m2, mask=col_ok)


@triton.jit
def _mix_forward_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, bn_w_ptr, bn_b_ptr, alpha_ptr, lam_ptr,
                        ln_w_ptr, ln_b_ptr, mu_ptr, rstd_ptr, n_rows, n_cols, ln_eps, sxm, sxc, sym, syc,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_LN: tl.constexpr):
    """``y`` for one block of whole rows, and (with the LN) their ``mu``, ``rstd`` (grid: row blocks)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows64 * sxm + cols[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    bn_w = tl.load(bn_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    bn_b = tl.load(bn_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    # (x - mean) * invstd, not the folded affine x * s + t: with a large invstd (a near-constant channel) the
    # folded form cancels two large terms; here the subtraction is free (the kernel is bound by memory).
    xhat_bn = (x - mean[None, :]) * invstd[None, :]
    y = (1.0 - lam) * (xhat_bn * bn_w[None, :] + bn_b[None, :] + alpha * x)
    if USE_LN:
        mu = tl.sum(x, axis=1) / n_cols
        dev = tl.where(ok, x - mu[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=1) / n_cols + ln_eps)
        ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y += lam * (dev * rstd[:, None] * ln_w[None, :] + ln_b[None, :])
        tl.store(mu_ptr + rows, mu, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tl.store(y_ptr + rows64 * sym + cols[None, :] * syc, y.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- backward
@triton.jit
def _grad_channel_sums_kernel(x_ptr, g_ptr, mean_ptr, invstd_ptr, mu_ptr, rstd_ptr, sums_ptr,
                              n_rows, n_cols, rows_per_chunk, sxm, sxc, sgm, sgc,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_LN: tl.constexpr):
    """Per channel over one chunk of tokens: ``sum g``, ``sum g xhat_bn``, ``sum g xhat_ln``, ``sum g x``, into
    ``sums`` ``[4, chunks, C]`` (grid: channel blocks x chunks)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(1)
    start = chunk * rows_per_chunk
    end = tl.minimum(start + rows_per_chunk, n_rows)
    col_ok = cols < n_cols
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    sum_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xbn = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_xln = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_g_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * sxm + cols[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows64 * sgm + cols[None, :] * sgc, mask=ok, other=0.0).to(tl.float32)
        sum_g += tl.sum(g, axis=0)
        sum_g_x += tl.sum(g * x, axis=0)
        sum_g_xbn += tl.sum(g * (x - mean[None, :]), axis=0)  # times invstd once, below
        if USE_LN:
            mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            sum_g_xln += tl.sum(g * (x - mu[:, None]) * rstd[:, None], axis=0)
    plane = tl.num_programs(1) * n_cols
    out = sums_ptr + chunk * n_cols + cols
    tl.store(out, sum_g, mask=col_ok)
    tl.store(out + plane, sum_g_xbn * invstd, mask=col_ok)
    tl.store(out + 2 * plane, sum_g_xln, mask=col_ok)
    tl.store(out + 3 * plane, sum_g_x, mask=col_ok)


@triton.jit
def _mix_backward_kernel(x_ptr, g_ptr, dx_ptr, mean_ptr, invstd_ptr, bn_w_ptr, sum_g_ptr, sum_g_xbn_ptr,
                         alpha_ptr, lam_ptr, ln_w_ptr, mu_ptr, rstd_ptr, n_rows, n_cols,
                         sxm, sxc, sgm, sgc, sdm, sdc,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, USE_LN: tl.constexpr):
    """``dx`` for one block of whole rows (grid: row blocks)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows64 * sxm + cols[None, :] * sxc, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows64 * sgm + cols[None, :] * sgc, mask=ok, other=0.0).to(tl.float32)
    lam = tl.load(lam_ptr).to(tl.float32)
    keep = 1.0 - lam
    alpha = tl.load(alpha_ptr).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    bn_w = tl.load(bn_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    mean_g = tl.load(sum_g_ptr + cols, mask=col_ok, other=0.0) / n_rows
    mean_g_xbn = tl.load(sum_g_xbn_ptr + cols, mask=col_ok, other=0.0) / n_rows
    xhat_bn = (x - mean[None, :]) * invstd[None, :]
    dx = (keep * bn_w * invstd)[None, :] * (g - mean_g[None, :] - xhat_bn * mean_g_xbn[None, :]) + keep * alpha * g
    if USE_LN:
        mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        ln_w = tl.load(ln_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat_ln = tl.where(ok, (x - mu[:, None]) * rstd[:, None], 0.0)
        gw = g * (lam * ln_w)[None, :]  # zero outside the row (g loads 0 there)
        row_mean_gw = tl.sum(gw, axis=1) / n_cols
        row_mean_gw_xhat = tl.sum(gw * xhat_ln, axis=1) / n_cols
        dx += rstd[:, None] * (gw - row_mean_gw[:, None] - xhat_ln * row_mean_gw_xhat[:, None])
    tl.store(dx_ptr + rows64 * sdm + cols[None, :] * sdc, dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launch
def _row_block(n_cols: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_C, num_warps)`` of the row passes: whole rows, ``ROW_TILE_ELEMENTS`` per program."""
    block_c = max(16, triton.next_power_of_2(n_cols))
    block_m = max(1, min(64, ROW_TILE_ELEMENTS // block_c))
    return block_m, block_c, (4 if block_c <= 1024 else 8)


def _token_chunks(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """``(chunks, rows_per_chunk)`` for the passes that reduce over tokens: enough programs to fill the GPU
    twice over, in chunks of at least ``MIN_ROWS_PER_CHUNK`` tokens; one chunk in the interpreter."""
    if device.type != "cuda" or INTERPRETED:
        return 1, n_rows
    col_blocks = triton.cdiv(n_cols, REDUCE_COLS)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = max(1, min(triton.cdiv(target, col_blocks), n_rows // MIN_ROWS_PER_CHUNK))
    per_chunk = triton.cdiv(triton.cdiv(n_rows, chunks), REDUCE_ROWS) * REDUCE_ROWS
    return triton.cdiv(n_rows, per_chunk), per_chunk


def _chunk_counts(n_rows: int, chunks: int, per_chunk: int, device) -> torch.Tensor:
    """Tokens in each chunk, ``[chunks, 1]`` float32."""
    starts = torch.arange(chunks, dtype=torch.float32, device=device) * per_chunk
    return (float(n_rows) - starts).clamp(max=float(per_chunk)).unsqueeze(1)


def _batch_stats(x: torch.Tensor, chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` ``[M, C]`` over its rows, float32."""
    m, c = x.shape
    chunks, per_chunk = _token_chunks(m, c, x.device) if chunks is None else (chunks, triton.cdiv(m, chunks))
    means = torch.empty(chunks, c, device=x.device, dtype=torch.float32)
    m2s = torch.empty(chunks, c, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(c, REDUCE_COLS), chunks)
    _channel_stats_kernel[grid](x, means, m2s, m, c, per_chunk, *x.stride(), BLOCK_M=REDUCE_ROWS, BLOCK_C=REDUCE_COLS)
    if chunks == 1:
        return means[0], m2s[0] / m
    counts = _chunk_counts(m, chunks, per_chunk, x.device)
    mean = (counts * means).sum(0) / m
    m2 = (m2s + counts * (means - mean).square()).sum(0)   # Chan's merge across chunks
    return mean, m2 / m


def _update_running(running_mean, running_var, mean, var, n_rows: int, momentum: float) -> None:
    """``r = (1 - momentum) r + momentum * stat`` with the unbiased variance, as ``torch.native_batch_norm``."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (n_rows / (n_rows - 1)) if n_rows > 1 else torch.full_like(var, float("nan"))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def _forward(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean, running_var, momentum: float,
             bn_eps: float, ln_eps: float, use_ln: bool, chunks: int | None = None):
    m, c = x.shape
    mean, var = _batch_stats(x, chunks)
    _update_running(running_mean, running_var, mean, var, m, momentum)
    invstd = torch.rsqrt(var + bn_eps)
    y = torch.empty(m, c, device=x.device, dtype=x.dtype)
    mu = torch.empty(m if use_ln else 1, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mu)
    block_m, block_c, warps = _row_block(c)
    _mix_forward_kernel[(triton.cdiv(m, block_m),)](
        x, y, mean, invstd, bn_weight, bn_bias, alpha, lam,
        ln_weight if use_ln else bn_weight, ln_bias if use_ln else bn_bias, mu, rstd, m, c, ln_eps,
        *x.stride(), *y.stride(), BLOCK_M=block_m, BLOCK_C=block_c, USE_LN=use_ln, num_warps=warps)
    return y, mean, invstd, mu, rstd


def _grad_channel_sums(x, grad, mean, invstd, mu, rstd, use_ln: bool, chunks: int | None = None):
    """``sum g``, ``sum g xhat_bn``, ``sum g xhat_ln``, ``sum g x`` per channel, float32 ``[C]`` each."""
    m, c = x.shape
    chunks, per_chunk = _token_chunks(m, c, x.device) if chunks is None else (chunks, triton.cdiv(m, chunks))
    sums = torch.empty(4, chunks, c, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(c, REDUCE_COLS), chunks)
    _grad_channel_sums_kernel[grid](x, grad, mean, invstd, mu, rstd, sums, m, c, per_chunk,
                                    *x.stride(), *grad.stride(), BLOCK_M=REDUCE_ROWS, BLOCK_C=REDUCE_COLS,
                                    USE_LN=use_ln)
    return sums.sum(1).unbind(0)


def _input_grad(x, grad, mean, invstd, bn_weight, sum_g, sum_g_xbn, alpha, lam, ln_weight, mu, rstd, use_ln: bool):
    m, c = x.shape
    dx = torch.empty(m, c, device=x.device, dtype=x.dtype)
    block_m, block_c, warps = _row_block(c)
    _mix_backward_kernel[(triton.cdiv(m, block_m),)](
        x, grad, dx, mean, invstd, bn_weight, sum_g, sum_g_xbn, alpha, lam, ln_weight if use_ln else bn_weight,
        mu, rstd, m, c, *x.stride(), *grad.stride(), *dx.stride(),
        BLOCK_M=block_m, BLOCK_C=block_c, USE_LN=use_ln, num_warps=warps)
    return dx


class _TritonPRepBN(torch.autograd.Function):
    """Forward and backward through the kernels above; saves ``x`` as given and the tiny statistics."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean, running_var,
                momentum: float, bn_eps: float, ln_eps: float, use_ln: bool):
        y, mean, invstd, mu, rstd = _forward(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean,
                                             running_var, momentum, bn_eps, ln_eps, use_ln)
        ctx.use_ln = use_ln
        ctx.save_for_backward(x, ln_weight, bn_weight, alpha, lam, mean, invstd, mu, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, ln_weight, bn_weight, alpha, lam, mean, invstd, mu, rstd = ctx.saved_tensors
        use_ln = ctx.use_ln
        sum_g, sum_g_xbn, sum_g_xln, sum_g_x = _grad_channel_sums(x, grad, mean, invstd, mu, rstd, use_ln)
        lam32 = lam.float()
        keep = 1.0 - lam32
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(x, grad, mean, invstd, bn_weight, sum_g, sum_g_xbn, alpha, lam, ln_weight, mu, rstd,
                             use_ln)
        d_lnw = d_lnb = None
        if ln_weight is not None:
            # Without the LN (lam None) its parameters, passed in only for that, receive exact zeros (DDP).
            d_lnw = (lam32 * sum_g_xln if use_ln else torch.zeros_like(sum_g)).to(ln_weight.dtype)
            d_lnb = (lam32 * sum_g if use_ln else torch.zeros_like(sum_g)).to(ln_weight.dtype)
        d_bnw = (keep * sum_g_xbn).to(bn_weight.dtype)
        d_bnb = (keep * sum_g).to(bn_weight.dtype)
        d_alpha = (keep * sum_g_x.sum()).reshape(alpha.shape).to(alpha.dtype)
        return dx, d_lnw, d_lnb, d_bnw, d_bnb, d_alpha, None, None, None, None, None, None, None


def unsupported(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam) -> tuple[type[Exception], str] | None:
    """``(error class, why)`` when these inputs cannot take the Triton path, None when they can."""
    if x.dim() != 2:
        return ValueError, f"x must be [M, C]; got shape {tuple(x.shape)}"
    if x.dtype not in DTYPES:
        return ValueError, f"x must be one of {', '.join(str(t) for t in DTYPES)}; got {x.dtype}"
    if x.shape[0] < 1:
        return ValueError, "x has no tokens (M = 0)"
    if x.shape[1] > MAX_CHANNELS:
        return ValueError, f"C must be <= {MAX_CHANNELS} (a whole row per program); got {x.shape[1]}"
    if lam is not None and (ln_weight is None or ln_bias is None):
        return ValueError, "the LN branch needs an affine LayerNorm (ln_weight and ln_bias)"
    tensors = [t for t in (ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam) if t is not None]
    if any(t.device != x.device for t in tensors):
        return ValueError, "x and the parameters must be on one device"
    if any(t.shape != (x.shape[1],) for t in (ln_weight, ln_bias, bn_weight, bn_bias) if t is not None):
        return ValueError, f"the LN and BN parameters must be [C] = [{x.shape[1]}]"
    if alpha.numel() != 1 or (lam is not None and lam.numel() != 1):
        return ValueError, "alpha and lam must be scalars (one element)"
    if x.device.type != "cuda" and not INTERPRETED:
        return RuntimeError, (f"the Triton kernels need CUDA tensors (got {x.device.type} tensors); on CPU they run "
                              "only in Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
                              "before the process imports triton (importing slab does)")
    return None


def prepbn_mix_triton(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam, running_mean, running_var,
                      momentum: float, bn_eps: float, ln_eps: float) -> torch.Tensor:
    """:func:`slab.ops.prepbn.prepbn_mix` through the Triton kernels; same arguments and contract.

    ``x`` ``[M, C]`` of float32 / float16 / bfloat16, any strides, ``C <= MAX_CHANNELS``; statistics and
    sums in float32; ``y`` contiguous in ``x``'s dtype.
    """
    problem = unsupported(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam)
    if problem is not None:
        error, why = problem
        raise error(f"prepbn_mix(impl='triton'): {why}")
    use_ln = lam is not None
    lam_t = lam.reshape(()) if use_ln else x.new_zeros((), dtype=torch.float32)
    return _TritonPRepBN.apply(x, ln_weight, ln_bias, bn_weight, bn_bias, alpha, lam_t, running_mean, running_var,
                               float(momentum), float(bn_eps), float(ln_eps), use_ln)
