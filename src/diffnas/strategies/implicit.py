"""iDARTS (Zhang et al., 2021): the hypergradient by the implicit function theorem.

At a (near) optimum ``w*(alpha)`` of the training loss,

    dL_val/dalpha = grad_alpha L_val - d2L_train/(dalpha dw) [d2L_train/dw2]^-1 grad_w L_val,

with the inverse Hessian-vector product approximated by the truncated Neumann series
``H^-1 v ~ eta * sum_{k<K} (I - eta H)^k v`` (exact as K grows when ``||I - eta H|| < 1``).
The weight decay of the weight optimizer is part of the inner objective, so ``H``
includes ``weight_decay * I``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffnas.config import require_float32
from diffnas.ops import twice_differentiable
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.hypergrad import grads as _grads
from diffnas.strategies.hypergrad import trainable
from diffnas.strategies.registry import register_strategy

Tensors = Sequence[torch.Tensor]


def neumann_inverse_hvp(
    hvp: Callable[[list[torch.Tensor]], Tensors], v: Tensors, K: int, eta: float
) -> list[torch.Tensor]:
    """``eta * sum_{k=0}^{K-1} (I - eta H)^k v`` with ``hvp(p) = H p``: K Hessian products
    are not needed, K-1 are."""
    if K < 1:
        raise ValueError(f"the Neumann series needs K >= 1 terms, got {K}")
    term = [t.detach().clone() for t in v]
    total = [t.clone() for t in term]
    for _ in range(K - 1):
        hp = hvp(term)
        term = [t - eta * h for t, h in zip(term, hp, strict=True)]
        total = [a + t for a, t in zip(total, term, strict=True)]
    return [eta * a for a in total]


def _vjp(outs: Tensors, inputs: Tensors, vs: Tensors, **kw) -> list[torch.Tensor]:
    """sum_i vs_i . d outs_i / d inputs, skipping outputs with no graph (the zero
    gradients of weights the loss did not use)."""
    pairs = [(o, v) for o, v in zip(outs, vs, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    return _grads([o for o, _ in pairs], inputs, grad_outputs=[v for _, v in pairs], **kw)


def implicit_hypergrad(
    train_loss: torch.Tensor, val_loss: torch.Tensor, w: Tensors, alphas: Tensors,
    K: int, eta: float, weight_decay: float = 0.0,
    average: Callable[[list[torch.Tensor]], list[torch.Tensor]] = list,
) -> list[torch.Tensor]:
    """The IFT hypergradient from two scalar losses built with graphs through ``w`` and
    ``alphas`` (``train_loss`` is differentiated twice). ``average``: every gradient and
    Hessian product is passed through it (data parallel: the mean over ranks, so each is
    the global batch's)."""
    g = average(_grads(val_loss, [*alphas, *w]))
    g_alpha, v = g[: len(alphas)], g[len(alphas):]
    gw = _grads(train_loss, w, create_graph=True)

    def hvp(p: list[torch.Tensor]) -> list[torch.Tensor]:
        hp = average(_vjp(gw, w, p, retain_graph=True))
        return [h + weight_decay * x for h, x in zip(hp, p, strict=True)]

    p = neumann_inverse_hvp(hvp, v, K, eta)
    mixed = average(_vjp(gw, alphas, p, retain_graph=False))
    return [ga - m for ga, m in zip(g_alpha, mixed, strict=True)]


def implicit(s: SearchStrategy, train_batch: Batch, val_batch: Batch, K: int = 5,
             eta: float | None = None) -> tuple[list[torch.Tensor], dict]:
    """Hypergradient rule (see ``hypergrad.py``): IFT at the current weights; ``eta``
    defaults to the weight optimizer's current learning rate."""
    w = list(trainable(s).values())  # a frozen weight is a constant
    arch_weights = s.arch_weights()
    val_loss, stats = s.loss(val_batch, arch_weights)
    val_loss = s.add_penalty(val_loss, arch_weights, stats)  # depends on alpha only
    with twice_differentiable():  # differentiated twice below
        train_loss, _ = s.loss(train_batch, s.arch_weights())
    grads = implicit_hypergrad(train_loss, val_loss, w, s.alphas(), K,
                               s.lr if eta is None else eta, s.config.w_optim.weight_decay,
                               average=s.average_grads)
    return grads, stats


@dataclass
class ImplicitConfig(StrategyConfig):
    K: int = 5  # Neumann terms (K-1 Hessian-vector products per alpha step)
    eta: float | None = None  # Neumann step size; None: the current weight learning rate

    def __post_init__(self) -> None:
        if self.K < 1:
            raise ValueError(f"implicit K must be >= 1, got {self.K}")
        if self.eta is not None and self.eta <= 0:
            raise ValueError(f"implicit eta must be positive, got {self.eta}")
        if self.eta is not None:  # the Neumann terms are float32 tensors times eta
            require_float32(self, ("eta",), "search.strategy")


@register_strategy("implicit")
class ImplicitStrategy(SearchStrategy):
    """Alpha step by the IFT hypergradient on (train, val), then a weight step."""

    Config = ImplicitConfig
    data_parallel = True  # every gradient and Hessian product averaged over ranks

    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        if val_batch is None:
            raise ValueError("implicit needs a validation batch (bilevel search)")
        self.a_optimizer.zero_grad(set_to_none=True)
        with self.relaxation.fixed_noise():  # one sampled architecture for both losses
            grads, val_stats = implicit(self, train_batch, val_batch, self.config.K,
                                        self.config.eta)
        self.set_alpha_grads(grads)
        self.a_optimizer.step()
        stats = self.weight_step(train_batch, self.arch_weights())
        stats.update({f"val_{k}": v for k, v in val_stats.items()})
        return stats
