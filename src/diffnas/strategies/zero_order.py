"""ZARTS (Wang et al., 2022): the architecture updated from loss evaluations only.

The architecture objective ``f(alpha) = L_val(w, alpha)`` (or, with ``unroll``, at the
weights after one virtual SGD step on the training batch) is evaluated at perturbed
alphas under ``torch.no_grad``; no gradient with respect to alpha is ever formed.

Estimators (functions on one flat vector, so they are tested on toy losses):
- ``rs``: random search: the best of ``samples`` Gaussian perturbations (standard
  deviation ``mu`` per coordinate), taken only when it lowers ``f``.
- ``mgs``: multi-point Gaussian smoothing: ``g = 1/n sum (f(x + mu u) - f(x)) / mu * u``,
  fed to the architecture optimizer as its gradient.
- ``gld``: gradientless descent: directions on the sphere at radii ``mu, mu/2, ...``;
  the best point is taken when it lowers ``f``.
``rs`` and ``gld`` set alpha directly: the architecture optimizer serves ``mgs`` only.
Random directions come from torch's global RNG, so a seed fixes them and resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffnas.config import require
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.hypergrad import grads, trainable
from diffnas.strategies.registry import register_strategy

Objective = Callable[[torch.Tensor], float]


def mgs_estimate(f: Objective, x: torch.Tensor, mu: float, samples: int) -> torch.Tensor:
    """Gaussian-smoothing gradient estimate of ``f`` at ``x`` (forward differences)."""
    f0 = f(x)
    g = torch.zeros_like(x)
    for _ in range(samples):
        u = torch.randn_like(x)
        g += (f(x + mu * u) - f0) / mu * u
    return g / samples


def rs_step(f: Objective, x: torch.Tensor, mu: float, samples: int) -> torch.Tensor:
    """The best of ``samples`` points ``x + mu u`` if better than ``x``, else ``x``."""
    best, f_best = x, f(x)
    for _ in range(samples):
        cand = x + mu * torch.randn_like(x)
        fc = f(cand)
        if fc < f_best:
            best, f_best = cand, fc
    return best


def gld_step(f: Objective, x: torch.Tensor, mu: float, samples: int) -> torch.Tensor:
    """Gradientless descent: unit directions at radii ``mu / 2**i``; the best if better."""
    best, f_best = x, f(x)
    for i in range(samples):
        u = torch.randn_like(x)
        cand = x + (mu / 2**i) * u / u.norm()
        fc = f(cand)
        if fc < f_best:
            best, f_best = cand, fc
    return best


ESTIMATORS = ("rs", "mgs", "gld")


@dataclass
class ZeroOrderConfig(StrategyConfig):
    estimator: str = "mgs"  # rs | mgs | gld
    samples: int = 4  # loss evaluations per alpha step (besides f(alpha))
    mu: float = 0.1  # mgs: smoothing scale; rs: std per coordinate; gld: largest radius
    unroll: bool = False  # evaluate at w' = w - lr grad_w L_train(w, alpha) (ZARTS's w*)

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"zero_order estimator must be one of {ESTIMATORS}, "
                             f"got {self.estimator!r}")
        require(math.isfinite(self.mu), "search.strategy.mu", "finite", self.mu)
        if self.samples < 1 or self.mu <= 0:
            raise ValueError(f"zero_order needs samples >= 1 and mu > 0, got "
                             f"samples={self.samples}, mu={self.mu}")


@register_strategy("zero_order")
class ZeroOrderStrategy(SearchStrategy):
    Config = ZeroOrderConfig
    # losses and unrolled weight gradients are averaged over ranks, and the random
    # directions come from torch's RNG, synchronised across ranks
    data_parallel = True

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in self.alphas()])

    def _assign(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            i = 0
            for p in self.alphas():
                p.copy_(flat[i: i + p.numel()].view_as(p))
                i += p.numel()

    def objective_at(self, train_batch: Batch, val_batch: Batch) -> Objective:
        """``f(alpha)``: the validation loss plus the architecture penalties at a candidate
        alpha (no alpha gradient). Call it inside ``relaxation.fixed_noise()``: a
        stochastic relaxation then compares every candidate on the same noise."""
        def f(flat: torch.Tensor) -> float:
            saved = self._flat()
            self._assign(flat)
            try:
                with torch.no_grad():
                    aw = self.arch_weights()
                params = None
                if self.config.unroll:
                    named = trainable(self)  # a frozen weight stays as it is
                    loss, _ = self.loss(train_batch, aw)
                    g_w = self.average_grads(grads(loss, list(named.values())))
                    params = {n: (p - self.lr * g).detach()
                              for (n, p), g in zip(named.items(), g_w, strict=True)}
                with torch.no_grad():
                    val = self.mean_over_ranks(self.loss(val_batch, aw, params=params)[0])
                    return float(self.add_penalty(val, aw, {}))
            finally:
                self._assign(saved)
        return f

    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        if val_batch is None:
            raise ValueError("zero_order needs a validation batch (bilevel search)")
        c = self.config
        f_any = self.objective_at(train_batch, val_batch)
        x = self._flat()
        # a stream that carries state (language models' hidden state) keeps that of the
        # pass at the current alpha, as in DARTS, not the last (perturbed) candidate's
        state = getattr(val_batch, "state", None)
        carried: list[Any] = []

        def f(flat: torch.Tensor) -> float:
            value = f_any(flat)
            if state is not None and not carried and torch.equal(flat, x):
                carried.append(state.pending)
            return value

        with self.relaxation.fixed_noise():
            if c.estimator == "mgs":
                g = mgs_estimate(f, x, c.mu, c.samples)
            else:
                new = (rs_step if c.estimator == "rs" else gld_step)(f, x, c.mu, c.samples)
        if c.estimator == "mgs":
            self.a_optimizer.zero_grad(set_to_none=True)
            parts = torch.split(g, [p.numel() for p in self.alphas()])
            self.set_alpha_grads([t.view_as(p) for t, p in zip(parts, self.alphas(), strict=True)])
            self.a_optimizer.step()
        else:
            self._assign(new)
        if carried:
            state.pending = carried[0]
        with torch.no_grad():
            aw = self.arch_weights()
        stats = self.weight_step(train_batch, aw)
        stats["alpha_move"] = float((self._flat() - x).norm())
        return stats
