"""DARTS (Liu et al., 2019): bilevel search, first order or unrolled second order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

from diffnas.config import require
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.hypergrad import HESSIAN_MODES, first_order, unrolled
from diffnas.strategies.registry import register_strategy


@dataclass
class DartsConfig(StrategyConfig):
    order: int = 1  # 1: first order; 2: unrolled second order
    # second order only: "fd" (the paper's central difference), "fd_forward" (a forward
    # difference reusing the virtual step's pass: 4 passes instead of 5) or "exact"
    hessian: str = "fd"
    fd_radius: float = 1e-2  # finite-difference step: eps = fd_radius / ||grad_w' L_val||

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise ValueError(f"search.strategy.order must be 1 or 2, got {self.order}")
        if self.hessian not in HESSIAN_MODES:
            raise ValueError(f"search.strategy.hessian must be one of {HESSIAN_MODES}, "
                             f"got {self.hessian!r}")
        require(math.isfinite(self.fd_radius) and self.fd_radius > 0,
                "search.strategy.fd_radius", "finite and > 0", self.fd_radius)
        if self.order == 1 and self.hessian != "fd":
            raise ValueError(f"hessian={self.hessian!r} only applies to order=2")
        if self.order == 2 and self.w_optim.name != "sgd":
            raise ValueError(f"order=2 unrolls the weights' SGD step (momentum and weight "
                             f"decay included); with w_optim.name={self.w_optim.name} use "
                             "order=1, or implicit for a second-order hypergradient")
        if self.fd_radius != 1e-2 and (self.order == 1 or self.hessian == "exact"):
            raise ValueError(f"fd_radius={self.fd_radius} only applies to a finite-difference "
                             "Hessian (order=2 with hessian fd or fd_forward)")


@register_strategy("darts")
class DartsStrategy(SearchStrategy):
    """Alpha step on the validation batch (by the chosen hypergradient rule), then a
    weight step on the training batch, as in the paper's search loop. With a stochastic
    relaxation the alpha step draws one sample and every pass of its rule uses it (finite
    differences of two different samples would be noise); the weight step draws anew."""

    Config = DartsConfig
    data_parallel = True

    @classmethod
    def declared(cls, config: DartsConfig) -> tuple[bool, bool]:
        # a captured graph replays fixed Python values: no temperature schedule, no sampled
        # ops (GDAS), no penalty settings (tested on a GPU: tests/test_cuda_graph.py)
        # (edge_norm's per-node softmax reads its index lists on the host)
        first = config.order == 1
        return first, (first and config.relaxation.get("name") == "softmax"
                       and not config.penalties and not config.edge_norm)

    def __init__(self, config: DartsConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.first_order, self.graph_safe = self.declared(config)
        self.hypergrad = (
            first_order
            if config.order == 1
            else partial(unrolled, hessian=config.hessian, fd_radius=config.fd_radius)
        )

    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        if val_batch is None:
            raise ValueError(f"{self.name} needs a validation batch (bilevel search)")
        self.a_optimizer.zero_grad(set_to_none=True)
        with self.relaxation.fixed_noise():  # every pass sees the same sampled architecture
            grads, val_stats = self.hypergrad(self, train_batch, val_batch)
        self.set_alpha_grads(grads)
        self.a_optimizer.step()
        stats = self.weight_step(train_batch, self.arch_weights())
        stats.update({f"val_{k}": v for k, v in val_stats.items()})
        return stats
