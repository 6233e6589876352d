"""SLA against softmax attention and the plain einsum formulation.

* :func:`sla_op_speed`: ``slab.ops.linear_attention`` vs the einsum reference at one shape (issue 8:
  B=8, 3 heads, N=3136, head_dim 32, float32), forward and forward + backward, plus the memory-bandwidth
  bound of reading q, k, v once and writing the output once (bandwidth measured with a large copy).
* :func:`attention_by_tokens`: latency of SLA (fast op), softmax (``F.scaled_dot_product_attention``)
  and the einsum form as the token count grows (196 ... 12544), forward only, with a plot.
* :func:`sla_gpu_by_tokens`: on a CUDA GPU, the SLA op's torch and Triton paths against softmax
  (SDPA) by token count in float16 / bfloat16, forward and forward + backward (issue 16); on a machine
  without one it returns why it was skipped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.linear_attention import linear_attention
from ..ops.naive import linear_attention_reference
from .timing import compare

__all__ = ["copy_bandwidth", "sla_op_speed", "attention_by_tokens", "plot_attention_by_tokens", "sla_gpu_by_tokens"]


def copy_bandwidth(megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` of a large buffer (read + write counted)."""
    n = megabytes * (1 << 20) // 4
    src, dst = torch.randn(n), torch.empty(n)
    t = compare({"copy": lambda: dst.copy_(src)}, repeats=repeats)["copy"]
    return 2 * n * 4 / t.robust


def sla_op_speed(batch: int = 8, heads: int = 3, tokens: int = 3136, head_dim: int = 32, repeats: int = 20,
                 max_time: float | None = 60.0) -> dict:
    """Fast SLA vs the einsum reference, forward and forward + backward (float32)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g) for _ in range(3))
    grad = torch.randn(batch, heads, tokens, head_dim, generator=g)
    with torch.no_grad():
        fwd = compare({"einsum": lambda: linear_attention_reference(q, k, v),
                       "fast": lambda: linear_attention(q, k, v)}, repeats=repeats, max_time=max_time)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def step(op):
        def run():
            torch.autograd.grad(op(qg, kg, vg), (qg, kg, vg), grad)
        return run

    fb = compare({"einsum": step(linear_attention_reference), "fast": step(linear_attention)},
                 repeats=max(3, repeats // 2), max_time=max_time)
    bw = copy_bandwidth()
    bytes_moved = 4 * q.numel() * 4  # read q, k, v once, write the output once
    bound = bytes_moved / bw
    return {
        "shape": {"batch": batch, "heads": heads, "tokens": tokens, "head_dim": head_dim},
        "forward_ms": {k_: t.robust * 1e3 for k_, t in fwd.items()},
        "forward_backward_ms": {k_: t.robust * 1e3 for k_, t in fb.items()},
        "speedup_forward": fwd["einsum"].robust / fwd["fast"].robust,
        "speedup_forward_backward": fb["einsum"].robust / fb["fast"].robust,
        "copy_bandwidth_GBps": bw / 1e9,
        "bandwidth_bound_ms": bound * 1e3,
        "fast_forward_vs_bound": fwd["fast"].robust / bound,
    }


def _softmax(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attention_by_tokens(tokens: tuple[int, ...] = (196, 784, 3136, 12544), batch: int = 1, heads: int = 3,
                        head_dim: int = 32, repeats: int = 10, max_time: float | None = 30.0,
                        einsum_max_tokens: int | None = None) -> dict:
    """Forward latency (ms) of SLA, softmax (SDPA) and the einsum form for each token count."""
    rows = []
    for n in tokens:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(3))
        fns = {"SLA (fast)": lambda: linear_attention(q, k, v), "softmax (SDPA)": lambda: _softmax(q, k, v)}
        if einsum_max_tokens is None or n <= einsum_max_tokens:
            fns["SLA (einsum)"] = lambda: linear_attention_reference(q, k, v)
        with torch.no_grad():
            t = compare(fns, repeats=repeats, max_time=max_time)
        row = {"tokens": n, **{name: tm.robust * 1e3 for name, tm in t.items()}}
        row["softmax_over_sla"] = row["softmax (SDPA)"] / row["SLA (fast)"]
        rows.append(row)
    return {"batch": batch, "heads": heads, "head_dim": head_dim, "unit": "ms", "rows": rows}


def attention_modules(tokens: int = 196, widths: tuple[tuple[int, int], ...] = ((192, 3), (384, 6)),
                      batches: tuple[int, ...] = (1, 8), kernel_size: int = 5, repeats: int = 50,
                      compiled: bool = True, max_time: float | None = 30.0) -> dict:
    """Forward latency (ms) of whole attention modules (qkv, attention, proj) at DeiT widths: SLA against softmax
    (SDPA), SLA without its depthwise conv (what the DWC costs), and with ``compiled`` the ``torch.compile`` of
    both (inductor fuses SLA's elementwise passes; needs a C++ compiler on CPU). Rows per width and batch, with
    ``sla_over_softmax`` (eager) and ``compiled_sla_over_softmax`` (compiled SLA over compiled softmax)."""
    from ..layers.attention import SimplifiedLinearAttention, SoftmaxAttention
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"attention_modules needs a square token count (a grid), got {tokens}")
    hw = (side, side)
    rows = []
    for dim, heads in widths:
        torch.manual_seed(dim)
        sla = SimplifiedLinearAttention(dim, heads, hw, kernel_size=kernel_size).eval()
        softmax = SoftmaxAttention(dim, heads, hw).eval()
        no_dwc = SimplifiedLinearAttention(dim, heads, hw, kernel_size=kernel_size).eval()
        no_dwc.local_values = _zero_local  # the same module with the DWC's output replaced by a cheap zero
        candidates = {"SLA": sla, "softmax (SDPA)": softmax, "SLA without DWC": no_dwc}
        if compiled:
            candidates["SLA compiled"] = torch.compile(sla, dynamic=False)
            candidates["softmax compiled"] = torch.compile(softmax, dynamic=False)
        for batch in batches:
            x = torch.randn(batch, tokens, dim)
            fns = {name: (lambda m=m: m(x, hw)) for name, m in candidates.items()}
            with torch.inference_mode():
                t = compare(fns, repeats=repeats, warmup=3, max_time=max_time)
            row = {"dim": dim, "heads": heads, "batch": batch, **{n: tm.robust * 1e3 for n, tm in t.items()}}
            row["sla_over_softmax"] = row["SLA"] / row["softmax (SDPA)"]
            row["dwc_share"] = 1.0 - row["SLA without DWC"] / row["SLA"]
            if compiled:
                row["compiled_sla_over_softmax"] = row["SLA compiled"] / row["softmax compiled"]
                row["compiled_sla_over_eager_softmax"] = row["SLA compiled"] / row["softmax (SDPA)"]
            rows.append(row)
    return {"tokens": tokens, "kernel_size": kernel_size, "threads": torch.get_num_threads(), "unit": "ms",
            "rows": rows}


def _zero_local(v: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Stands in for the DWC branch in :func:`attention_modules`: a zero of the right shape, nearly free."""
    return v.new_zeros(v.shape)


def plot_attention_by_tokens(result: dict, path: str, title: str | None = None) -> str:
    """Log-log plot of latency against token count; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    names = [k for k in rows[0] if k not in ("tokens", "softmax_over_sla")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = [(r["tokens"], r[name]) for r in rows if name in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward latency (ms)")
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator
    ax.xaxis.set_major_locator(FixedLocator([r["tokens"] for r in rows]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([str(r["tokens"]) for r in rows])
    ax.set_title(title or f"attention core, batch {result['batch']}, {result['heads']} heads x {result['head_dim']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- GPU: torch vs Triton vs SDPA
def _gpu_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible: run `slab bench --sections sla_gpu` on a machine with one"
    try:
        from ..ops import triton_linear_attention  # noqa: F401
    except ImportError as e:
        return f"triton cannot be imported: {e}"
    return None


_GPU_CANDIDATES = {"SLA torch": lambda q, k, v: linear_attention(q, k, v, impl="torch"),
                   "SLA triton": lambda q, k, v: linear_attention(q, k, v, impl="triton"),
                   "softmax (SDPA)": _softmax}


def _gpu_row(n: int, dtype: torch.dtype, batch: int, heads: int, head_dim: int, repeats: int,
             max_time: float | None) -> dict:
    """Forward and forward + backward ms of each candidate at one token count, and the Triton error."""
    g = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device="cuda", dtype=dtype) for _ in range(3))
    grad = torch.randn_like(q)
    ops = _GPU_CANDIDATES
    with torch.no_grad():
        fwd = compare({name: (lambda op=op: op(q, k, v)) for name, op in ops.items()},
                      repeats=repeats, max_time=max_time, device="cuda")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def step(op):
        return lambda: torch.autograd.grad(op(qg, kg, vg), (qg, kg, vg), grad)

    fb = compare({name: step(op) for name, op in ops.items()}, repeats=repeats, max_time=max_time, device="cuda")
    ref = linear_attention_reference(q.float(), k.float(), v.float())
    err = (ops["SLA triton"](q, k, v).float() - ref).abs().max().item() / ref.abs().max().item()
    return {"tokens": n, "dtype": str(dtype).removeprefix("torch."),
            "forward_ms": {name: t.robust * 1e3 for name, t in fwd.items()},
            "forward_backward_ms": {name: t.robust * 1e3 for name, t in fb.items()},
            "triton_rel_error_vs_reference": err}


def sla_gpu_by_tokens(tokens: tuple[int, ...] = (196, 784, 3136, 12544), batch: int = 8, heads: int = 3,
                      head_dim: int = 32, dtypes: tuple[str, ...] = ("float16", "bfloat16"), repeats: int = 50,
                      max_time: float | None = 20.0) -> dict:
    """GPU latency (ms) of SLA (``impl='torch'`` and ``'triton'``) and softmax attention (SDPA) by token count.

    Forward and forward + backward for each dtype, timed with a device sync after every call; each row also
    records the Triton output's error relative to the float32 reference. Returns ``{"skipped": why}`` when
    there is no CUDA GPU or no Triton.
    """
    why = _gpu_unavailable()
    if why is not None:
        return {"skipped": why}
    rows = [_gpu_row(n, getattr(torch, dt), batch, heads, head_dim, repeats, max_time) for dt in dtypes for n in tokens]
    return {"batch": batch, "heads": heads, "head_dim": head_dim, "unit": "ms", "gpu": torch.cuda.get_device_name(0),
            "rows": rows}
