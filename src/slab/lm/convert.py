"""Converting a pretrained LLaMA to SLAB-LLaMA without losing it: calibration, then distillation.

A PRepBN model made by :meth:`SlabLlamaForCausalLM.from_llama` starts with every RepBN branch at zero
(the authors' initialisation), so removing the RMSNorms destroys the model and fine-tuning must re-learn
them. Two facts make a better start possible:

* away from the first token, an RMSNorm of a trained LLaMA is close to a per-channel affine map on real
  activations (least-squares fit error 0.5-5 % in SmolLM2-135M), because the per-token RMS varies little;
* the first token of each sequence (the attention sink) has a residual stream ~100x larger than the
  others' (SmolLM2: RMS ~1000 against ~5-30 from layer 12 on). One map cannot serve both, so with
  ``first_token_affine`` that token has a per-channel map of its own and stays out of the BN statistics.

:func:`calibrate_repbn` sets every RepBN, in forward order, to the least-squares map from the converted
model's own activations (earlier norms already replaced, so errors do not compound) to the original
model's RMSNorm outputs. :func:`distillation_loss` then trains the converted model to match the original's
next-token distribution (KL divergence), which is what matters, rather than the text's labels alone.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.norm import PRepBN

__all__ = ["calibrate_repbn", "distillation_loss", "rmsnorm_form", "LeastSquares", "RidgeRefit", "set_fitted_map",
           "local_distill_layer", "residual_bounds", "residual_guard"]


class _Stop(Exception):
    pass


class LeastSquares:
    """Per-channel running sums for ``y ~ s * x + t`` (float64)."""

    def __init__(self):
        self.n = 0.0
        self.sums = None  # sx, sy, sxx, sxy

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        terms = [x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0)]
        self.sums = terms if self.sums is None else [a + b for a, b in zip(self.sums, terms)]
        self.n += x.shape[0]

    def all_reduce(self) -> None:
        """Sum over DDP ranks (each fitted on its own batches)."""
        import torch.distributed as dist
        if self.sums is None or not (dist.is_available() and dist.is_initialized()):
            return
        n = torch.tensor([self.n], dtype=torch.float64, device=self.sums[0].device)
        for t in self.sums + [n]:
            dist.all_reduce(t)
        self.n = float(n)

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(s, t, mean_x, var_x)``; a channel that does not vary keeps ``s = 0``, ``t = mean(y)``."""
        sx, sy, sxx, sxy = (v / self.n for v in self.sums)
        var_x = (sxx - sx * sx).clamp(min=0.0)
        cov = sxy - sx * sy
        s = torch.where(var_x > 1e-12, cov / var_x.clamp_min(1e-12), torch.zeros_like(cov))
        return s, sy - s * sx, sx, var_x


class RidgeRefit:
    """Running sums ``Z^T Z`` and ``Z^T Y`` (float64) to refit a linear layer ``y = W z`` by ridge regression."""

    def __init__(self):
        self.zz = self.zy = None
        self.n = 0

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        z, y = z.double(), y.double()
        zz, zy = z.T @ z, z.T @ y
        self.zz = zz if self.zz is None else self.zz + zz
        self.zy = zy if self.zy is None else self.zy + zy
        self.n += z.shape[0]

    def solve(self, w0: torch.Tensor, ridge: float) -> torch.Tensor:
        """``argmin_W |Z W^T - Y|^2 + lam |W - w0|^2`` with ``lam = ridge * mean(diag(Z^T Z))``: the least-squares
        weight, pulled towards the current one where the calibration tokens do not determine it."""
        lam = ridge * float(self.zz.diagonal().mean())
        eye = torch.eye(self.zz.shape[0], dtype=self.zz.dtype, device=self.zz.device)
        w_t = torch.linalg.solve(self.zz + lam * eye, self.zy + lam * w0.double().T)
        return w_t.T.to(w0.dtype)


def set_fitted_map(norm: PRepBN, main: LeastSquares, first: LeastSquares | None) -> None:
    """Give ``norm.repbn`` the eval map ``x * s + t`` of ``main`` (and the first-token map of ``first``)."""
    repbn = norm.repbn
    bn = repbn.bn
    s, t, mean_x, var_x = main.fit()
    std = torch.sqrt(var_x + bn.eps)  # eval: (x - mean) / std * weight + bias == s x + t
    dt = bn.weight.dtype
    bn.running_mean.copy_(mean_x.to(dt))
    bn.running_var.copy_(var_x.to(dt))
    bn.num_batches_tracked.fill_(1)
    bn.weight.copy_((s * std).to(dt))
    bn.bias.copy_((t + s * mean_x).to(dt))
    repbn.alpha.zero_()
    if getattr(repbn, "first_scale", None) is not None:
        s0, t0 = first.fit()[:2] if first is not None and first.n >= 2 else (s, t)
        repbn.first_scale.copy_(s0.to(dt))
        repbn.first_shift.copy_(t0.to(dt))


def _layer_inputs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's hidden states and keyword arguments, as ``model`` prepares them."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _run_capturing(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, modules: list[nn.Module], what: str):
    """``(layer output, [each module's input, output, or (input, output)])`` for one call of ``layer``."""
    seen: dict[int, torch.Tensor] = {}

    def hook(mod, args, output):
        pick = {"input": args[0], "output": output, "both": (args[0], output)}[what]
        seen[id(mod)] = tuple(t.detach() for t in pick) if what == "both" else pick.detach()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        out = _layer_output(layer, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, [seen[id(m)] for m in modules]


def _fit_norm(norm: PRepBN, xs: list[torch.Tensor], ys: list[torch.Tensor], keeps) -> dict:
    """Least-squares fit of ``norm``'s RepBN from inputs ``xs`` to targets ``ys`` (one tensor per batch)."""
    fits = (LeastSquares(), LeastSquares())
    for x, y, keep_pair in zip(xs, ys, keeps):
        for fit, keep in zip(fits, keep_pair):
            if keep.any():
                fit.add(_rows(x, keep), _rows(y, keep))
    set_fitted_map(norm, *fits)
    return _fit_report(norm, list(zip(xs, ys)), keeps)


def _apply_fitted(norm: PRepBN, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    return norm(x, None, first=first) if getattr(norm.repbn, "first_scale", None) is not None else norm(x)


def _rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[keep.reshape(-1)].float()


#: The linear layers of a LLaMA decoder layer that ``refit_ridge`` refits, grouped by shared input.
_LINEAR_GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                  "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


@torch.no_grad()
def calibrate_repbn(student: nn.Module, teacher: nn.Module, batches, sequential: bool = True,
                    refit_ridge: float | None = None, refit: tuple[str, ...] = ("qkv", "o", "gate_up", "down"),
                    refit_first_token: bool = True, local_steps: int = 0, local_lr: float = 1e-4) -> list[dict]:
    """Set every PRepBN's RepBN branch of ``student`` to the least-squares fit of ``teacher``'s RMSNorm outputs.

    ``student`` is a ``norm='prepbn'`` SLAB-LLaMA converted from ``teacher`` (a transformers LLaMA with the
    same weights); ``batches`` a list of ``(input_ids, attention_mask or None)``. Norms are fitted in forward
    order, each on the student's activations with every earlier norm already replaced by its fitted map
    (its eval form), against the teacher's RMSNorm outputs on the same tokens. Real tokens only; the first
    token of each sequence is fitted apart when the config has ``first_token_affine``. Leaves the student
    in eval mode with ``lam = 0``. Returns one dict per norm: ``name`` and the relative squared error
    ``fit_error`` of the fitted map on the calibration tokens. ``sequential=False`` fits every norm on the
    teacher's own activations instead (each map is then the best for the original model, but errors compound).

    ``refit_ridge`` (e.g. ``1e-2``) also refits, in forward order, every linear layer of each decoder layer
    (q/k/v, o, gate/up, down) by ridge regression from the student's inputs to the teacher's outputs of the
    same layer: a full matrix can undo part of what a per-channel map cannot (the per-token scale, where it
    correlates with the token's direction). ``ridge`` is relative to the mean diagonal of the inputs' Gram
    matrix and pulls each weight towards its current value.

    ``local_steps`` (e.g. 32) then trains each decoder layer, once its norms are fitted, for that many Adam
    steps (``local_lr``) on the calibration batches: the student layer on its own inputs against the teacher
    layer's output (:func:`local_distill_layer`), so each layer learns to absorb the error of its own maps
    before the next layer is fitted on its output.
    """
    batches = [(ids, mask) for ids, mask in batches]
    if not batches:
        raise ValueError("calibrate_repbn needs at least one batch")
    if refit_ridge is not None and not sequential:
        raise ValueError("refit_ridge needs sequential=True (it refits on the student's own inputs)")
    unknown = set(refit) - set(_LINEAR_GROUPS)
    if unknown:
        raise ValueError(f"refit: unknown groups {sorted(unknown)}; choose from {list(_LINEAR_GROUPS)}")
    student.eval()
    teacher.eval()
    s_state = [_layer_inputs(student, ids, mask) for ids, mask in batches]
    t_state = [_layer_inputs(teacher, ids, mask) for ids, mask in batches]
    keeps = []
    for (ids, mask), (_, kw) in zip(batches, s_state):
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        first = kw.get("first_token")
        if first is None:
            first = torch.zeros_like(real)
            first[:, 0] = True
        keeps.append((real & ~first, real & first))
    if local_steps and not sequential:
        raise ValueError("local_steps needs sequential=True (it trains each layer on the student's own inputs)")
    report = []
    real_rows = [k0 | k1 for k0, k1 in keeps]
    for s_layer, t_layer in zip(student.model.layers, teacher.model.layers):
        s_in = s_state
        s_state, t_state = _calibrate_layer(s_layer, t_layer, s_state, t_state, keeps, report, sequential,
                                            refit_ridge, tuple(refit), refit_first_token)
        if local_steps:
            local_distill_layer(s_layer, s_in, [out for out, _ in t_state], real_rows, local_steps, local_lr)
            s_state = [(_layer_output(s_layer, hs, kw), kw) for hs, kw in s_in]
    final = student.model.norm
    x_final = [hs for hs, _ in s_state] if sequential else [ht for ht, _ in t_state]
    report.append(_fit_norm(final, x_final, [teacher.model.norm(ht) for ht, _ in t_state], keeps))
    names = {id(m): n for n, m in student.named_modules()}
    for r in report:
        r["name"] = names[id(r.pop("module"))]
    return report


def _calibrate_layer(s_layer, t_layer, s_state, t_state, keeps, report, sequential: bool = True,
                     ridge: float | None = None, refit: tuple[str, ...] = (), refit_first_token: bool = True):
    """Fit one decoder layer's two norms (and, with ``ridge``, refit the linear groups named in ``refit``) in the
    order the layer computes them; ``(student state, teacher state)`` after the layer."""
    names = [n for key in (refit if ridge is not None else ()) for n in _LINEAR_GROUPS[key]]
    t_mods = [t_layer.input_layernorm, t_layer.post_attention_layernorm] + [t_layer.get_submodule(n) for n in names]
    t_runs = [_run_capturing(t_layer, ht, tkw, t_mods, "both") for ht, tkw in t_state]
    target = {n: [xy[2 + i][1] for _, xy in t_runs] for i, n in enumerate(names)}
    rows = [k0 | k1 for k0, k1 in keeps] if refit_first_token else [k0 for k0, _ in keeps]

    def refit_stage(keys):
        for key in keys:
            group = _LINEAR_GROUPS[key]
            if group[0] in target:
                linears = [s_layer.get_submodule(n) for n in group]
                _refit_group(linears, _module_inputs(s_layer, s_state, linears[0]), [target[n] for n in group],
                             rows, ridge)

    # the input norm reads the layer input: fit it directly on the student's hidden states
    x_in = [hs for hs, _ in s_state] if sequential else [xy[0][0] for _, xy in t_runs]
    report.append(_fit_norm(s_layer.input_layernorm, x_in, [xy[0][1] for _, xy in t_runs], keeps))
    refit_stage(("qkv", "o"))
    t_state = [(out, tkw) for (out, _), (_, tkw) in zip(t_runs, t_state)]
    post = s_layer.post_attention_layernorm
    if not sequential:  # every norm on the teacher's activations: the student's own are never needed
        report.append(_fit_norm(post, [xy[1][0] for _, xy in t_runs], [xy[1][1] for _, xy in t_runs], keeps))
        return s_state, t_state
    x_post = _module_inputs(s_layer, s_state, post)
    report.append(_fit_norm(post, x_post, [xy[1][1] for _, xy in t_runs], keeps))
    refit_stage(("gate_up", "down"))
    # the layer's output with both norms fitted: the residual stream after attention plus the MLP
    s_state = [(x + s_layer.mlp(_apply_fitted(post, x, first)), kw)
               for x, (_, kw), (_, first) in zip(x_post, s_state, keeps)]
    return s_state, t_state


def _layer_output(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def local_distill_layer(layer: nn.Module, inputs, targets: list[torch.Tensor], rows: list[torch.Tensor],
                        steps: int, lr: float) -> list[float]:
    """Train ``layer`` (eval mode: its norms are the fixed maps they fold to) for ``steps`` Adam steps, one
    calibration batch per step, so that its output on the student's ``inputs`` (``(hidden, kwargs)`` pairs)
    matches the teacher layer's ``targets`` on the real tokens ``rows``. The loss is each token's squared error
    relative to its target's squared norm: tokens count alike whatever their scale (the attention sink's
    residual stream is ~100x the others'). Returns the loss of each step."""
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            i = step % len(inputs)
            (hidden, kwargs), target, keep = inputs[i], targets[i], rows[i]
            out = _layer_output(layer, hidden, kwargs)
            err = (out - target).float().pow(2).sum(-1) / target.float().pow(2).sum(-1).clamp(min=1e-12)
            loss = err[keep].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    layer.zero_grad(set_to_none=True)
    return losses


def _module_inputs(layer: nn.Module, state, module: nn.Module) -> list[torch.Tensor]:
    """``module``'s input in ``layer`` for each ``(hidden, kwargs)`` of ``state`` (the layer stops there)."""
    seen = []

    def grab(mod, args):
        seen.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(grab)
    try:
        for hs, kw in state:
            try:
                layer(hs, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _refit_group(linears: list[nn.Linear], inputs, targets, rows, ridge: float) -> None:
    """Ridge-refit ``linears`` (one shared input) from ``inputs`` to their ``targets`` on the ``rows`` kept."""
    fit = RidgeRefit()
    for i, (z, keep) in enumerate(zip(inputs, rows)):
        fit.add(_rows(z, keep), torch.cat([_rows(t[i], keep) for t in targets], -1))
    weight = fit.solve(torch.cat([lin.weight for lin in linears]), ridge)
    for lin, part in zip(linears, weight.split([lin.out_features for lin in linears])):
        lin.weight.copy_(part)


def _fit_report(norm: PRepBN, pairs, keeps) -> dict:
    """Relative squared error of the fitted eval map on the calibration tokens."""
    err, ref = [0.0, 0.0], [0.0, 0.0]
    for (x, y), group in zip(pairs, keeps):
        sq = (_apply_fitted(norm, x, group[1]) - y).pow(2).sum(-1)
        for i, keep in enumerate(group):
            err[i] += float(sq[keep].sum())
            ref[i] += float(y.pow(2).sum(-1)[keep].sum())
    return {"module": norm, "fit_error": sum(err) / max(sum(ref), 1e-30),
            "fit_error_first": err[1] / max(ref[1], 1e-30), "fit_error_rest": err[0] / max(ref[0], 1e-30)}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over real tokens of ``KL(teacher || student)`` of the next-token distributions (``[B, T, V]``)."""
    t = temperature
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is not None:
        kl = kl[mask.to(torch.bool)]
    return kl.mean() * (t * t)


def rmsnorm_form(model: nn.Module) -> nn.Module:
    """A frozen copy of a PRepBN SLAB-LLaMA with every PRepBN replaced by its RMSNorm branch (``lam = 1``):
    the teacher that :func:`calibrate_repbn` fits a model's own RepBN branches to."""
    teacher = copy.deepcopy(model)
    for layer in teacher.model.layers:
        layer.input_layernorm = layer.input_layernorm.ln
        layer.post_attention_layernorm = layer.post_attention_layernorm.ln
    teacher.model.norm = teacher.model.norm.ln
    teacher.config.first_token_affine = False
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def residual_bounds(teacher: nn.Module, batches, factor: float = 4.0) -> list[float]:
    """Per decoder layer, ``factor`` x the largest absolute value of ``teacher``'s residual stream after that
    layer over ``batches`` (``(input_ids, attention_mask or None)`` pairs): the bounds of :func:`residual_guard`."""
    from .train import forward_batches
    if not factor > 0:
        raise ValueError(f"residual_bounds: factor must be > 0, got {factor}")
    layers = list(teacher.model.layers)
    peaks = [0.0] * len(layers)

    def record(i: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            peaks[i] = max(peaks[i], float(out.detach().abs().max()))
        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        n = forward_batches(teacher, batches)
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise ValueError("residual_bounds needs at least one batch")
    return [factor * p for p in peaks]


@contextlib.contextmanager
def residual_guard(model: nn.Module, bounds: list[float]):
    """While the model trains, clamp each decoder layer's output to ``[-bound, bound]`` (no effect in eval).

    Why: a norm-free LLaMA has no per-token control of scale. A token whose residual stream grows is fed,
    through its per-channel maps, to SwiGLU, whose output grows with the square of its input, so the growth
    feeds itself: in SmolLM2 converted by :func:`calibrate_repbn`, ~5 % of training sequences of 64 tokens
    run away to inf in the last layers, and a batch holding one has a non-finite gradient (fine-tuning in the
    eval form skipped every step). Clamped, such sequences give a large but finite loss, whose gradient teaches
    the model to keep them in range; the eval (and fused) model is untouched."""
    layers = list(model.model.layers)
    if len(bounds) != len(layers):
        raise ValueError(f"residual_guard: {len(bounds)} bounds for {len(layers)} decoder layers")

    def clamp(bound: float):
        def hook(module, args, output):
            if not module.training:
                return output
            if isinstance(output, tuple):
                return (output[0].clamp(-bound, bound),) + tuple(output[1:])
            return output.clamp(-bound, bound)
        return hook

    handles = [layer.register_forward_hook(clamp(b)) for layer, b in zip(layers, bounds)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
