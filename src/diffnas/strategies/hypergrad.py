"""Hypergradient rules: how a bilevel strategy computes d L_val / d alpha.

Each rule is a function ``(strategy, train_batch, val_batch) -> (grads, val_stats)`` with
one gradient per architecture tensor, so DARTS-like strategies compose them freely.
Under data parallelism a rule returns this rank's share of the alpha gradient
(``set_alpha_grads`` averages it over ranks); quantities that must be global inside a rule
(the virtual step's weight gradient, the vector v) go through ``s.average_grads``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch

from diffnas.ops import twice_differentiable
from diffnas.strategies.base import Batch, SearchStrategy

#: how the unrolled rule takes the mixed second derivative (see :func:`unrolled`)
HESSIAN_MODES = ("fd", "fd_forward", "exact")


def grads(out: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
          **kw) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for the inputs the graph did not use: the
    weights of the ops a hard Gumbel sample left out (GDAS), or of RNN ops not yet grown."""
    got = torch.autograd.grad(out, list(inputs), allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs, strict=True)]


def trainable(s: SearchStrategy) -> dict[str, torch.nn.Parameter]:
    """The supernet's weights the weight step trains, by name. A weight the user froze
    (``requires_grad`` False) is a constant of the hypergradient, as it is of the weight
    optimizer (which steps and decays only weights with a gradient)."""
    return {n: p for n, p in s.supernet.named_parameters() if p.requires_grad}


def first_order(s: SearchStrategy, train_batch: Batch, val_batch: Batch
                ) -> tuple[list[torch.Tensor], dict]:
    """DARTS first order: grad_alpha (L_val(w, alpha) + penalties(alpha)) at the current
    weights."""
    arch_weights = s.arch_weights()
    with frozen(s.supernet.parameters()):  # only alpha's gradient is taken
        loss, stats = s.loss(val_batch, arch_weights)
    loss = s.add_penalty(loss, arch_weights, stats)
    return grads(loss, s.alphas()), stats


@contextlib.contextmanager
def frozen(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Parameters with ``requires_grad`` off while a forward pass records: its graph then
    holds no path to them, so backward computes no weight gradient (a compiled graph
    would compute them all otherwise) and the memory savers keep nothing for one."""
    thawed = [p for p in params if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def virtual_step(s: SearchStrategy, train_batch: Batch) -> dict[str, torch.Tensor]:
    """w' = w - xi * (momentum * buf + c * grad_w L_train(w, alpha) + wd * w), exactly the
    update the weight optimizer (SGD with momentum and weight decay, after the weight
    step's gradient clipping: ``c = min(1, grad_clip / ||grad||)``) would make, with xi its
    current learning rate. ``L_train`` is the plain loss, as in every architecture pass (and
    DARTS's recurrent architect): with an objective's regularizers (AR/TAR) the weight step
    itself descends the regularized loss, so w' differs from it by those terms' gradient.
    Returned detached, keyed by parameter name."""
    return _virtual_step(s, train_batch, alpha_grads=False)[0]


def _virtual_step(
    s: SearchStrategy, train_batch: Batch, alpha_grads: bool
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None, float]:
    """:func:`virtual_step`, and with ``alpha_grads`` also grad_alpha L_train(w, alpha)
    from the same backward pass (this rank's share); also the clip factor ``c``."""
    named = trainable(s)
    arch_weights = s.arch_weights()
    loss, _ = s.loss(train_batch, arch_weights if alpha_grads else arch_weights.detach())
    wrt = list(named.values()) + (s.alphas() if alpha_grads else [])
    got = grads(loss, wrt)
    g_w = s.average_grads(got[: len(named)])
    d_alpha = got[len(named):] if alpha_grads else None
    w = s.config.w_optim
    xi = s.lr
    out = {}
    with torch.no_grad():
        coef = clip_factor(g_w, w.grad_clip)
        for (name, p), g in zip(named.items(), g_w):
            buf = s.w_optimizer.state.get(p, {}).get("momentum_buffer")
            moment = torch.zeros_like(p) if buf is None else w.momentum * buf
            out[name] = p - xi * (moment + coef * g + w.weight_decay * p)
    return out, d_alpha, coef


def clip_factor(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` scales ``grads`` by (1 when their
    total L2 norm is within ``max_norm``)."""
    total = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads))
    return min(1.0, float(max_norm / (total + 1e-6)))


def mixed_hvp_fd(
    s: SearchStrategy, batch: Batch, vector: dict[str, torch.Tensor], r: float = 1e-2,
    at_w: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """d2 L_train / (d alpha d w) @ vector by the central difference of the paper:
    (grad_alpha L(w + eps v) - grad_alpha L(w - eps v)) / (2 eps), eps = r / ||v||.
    Given ``at_w`` = grad_alpha L(w) (on the same batch), the forward difference
    (grad_alpha L(w + eps v) - at_w) / eps instead: one pass fewer, error O(eps)
    instead of O(eps^2)."""
    named = trainable(s)
    norm = torch.sqrt(sum((v * v).sum() for v in vector.values()))
    if norm == 0:  # the product with a zero vector (eps = r / 0 would make NaN weights)
        return [torch.zeros_like(a) for a in s.alphas()]
    eps = r / norm
    result = []
    for sign in (1.0,) if at_w is not None else (1.0, -1.0):
        params = {n: (p.detach() + sign * eps * vector[n]) for n, p in named.items()}
        loss, _ = s.loss(batch, s.arch_weights(), params=params)
        result.append(grads(loss, s.alphas()))
    if at_w is not None:
        return [(gp - g0) / eps for gp, g0 in zip(result[0], at_w, strict=True)]
    return [(gp - gn) / (2 * eps) for gp, gn in zip(*result)]


def mixed_hvp_exact(
    s: SearchStrategy, batch: Batch, vector: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """The same product by double backward: grad_alpha (grad_w L_train . v)."""
    named = trainable(s)
    with twice_differentiable():
        loss, _ = s.loss(batch, s.arch_weights())
    gw = grads(loss, list(named.values()), create_graph=True)
    dot = sum((g * vector[n]).sum() for g, n in zip(gw, named) if g.requires_grad)
    return grads(dot, s.alphas())


def unrolled(
    s: SearchStrategy,
    train_batch: Batch,
    val_batch: Batch,
    hessian: str = "fd",
    fd_radius: float = 1e-2,
) -> tuple[list[torch.Tensor], dict]:
    """DARTS second order: grad_alpha L_val(w', alpha) - xi * c * d2L_train/(dalpha dw) v,
    v = grad_w' L_val(w', alpha), with w' one virtual weight step and ``c`` its gradient
    clip factor (held constant, as DARTS's RNN architect does; 1 unless the clip bites),
    plus the gradient of the strategy's penalties, which depend on alpha only.

    ``fd_radius`` is the paper's 0.01 (the weights move by that much in L2 norm). On a
    ReLU network the two perturbed points can straddle activation kinks, so the central
    difference is only an approximation; ``hessian="exact"`` avoids it at the price of a
    double backward. ``hessian="fd_forward"`` reuses the virtual step's backward pass for
    grad_alpha L_train(w) and takes the forward difference: 4 passes instead of 5 per
    search step (alpha and weight step), at O(eps) instead of O(eps^2) truncation error."""
    if hessian not in HESSIAN_MODES:
        raise ValueError(f"unknown hessian mode {hessian!r}; use one of {HESSIAN_MODES}")
    forward = hessian == "fd_forward"
    w_prime, at_w, coef = _virtual_step(s, train_batch, alpha_grads=forward)
    w_prime = {n: t.requires_grad_(True) for n, t in w_prime.items()}
    arch_weights = s.arch_weights()
    loss, stats = s.loss(val_batch, arch_weights, params=w_prime)
    loss = s.add_penalty(loss, arch_weights, stats)  # penalties depend on alpha only
    alphas = s.alphas()
    got = grads(loss, alphas + list(w_prime.values()))
    d_alpha, d_w = got[: len(alphas)], got[len(alphas) :]
    vector = {n: g.detach() for n, g in zip(w_prime, s.average_grads(d_w))}  # global v
    if hessian == "exact":
        hvp = mixed_hvp_exact(s, train_batch, vector)
    else:
        hvp = mixed_hvp_fd(s, train_batch, vector, r=fd_radius, at_w=at_w)
    return [da - s.lr * coef * h for da, h in zip(d_alpha, hvp)], stats
