"""Single-level DARTS: weights and architecture updated together from one batch.

No train/validation split (``uses_validation = False``): one loss on the training batch,
one backward pass, then both optimizers step. Subclasses add an extra loss on the relaxed
weights (SNAS's resource term) through :meth:`extra_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffnas.arch.relax import ArchWeights
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.registry import register_strategy


@dataclass
class SingleLevelConfig(StrategyConfig):
    pass


@register_strategy("single_level")
class SingleLevelStrategy(SearchStrategy):
    """One batch, one loss, ``w`` and ``alpha`` both step along its gradient."""

    Config = SingleLevelConfig
    uses_validation = False
    data_parallel = True
    first_order = True

    def extra_loss(self, arch_weights: ArchWeights) -> tuple[torch.Tensor | None, dict]:
        """An additional differentiable loss on the relaxed weights (none here)."""
        return None, {}

    def step(self, train_batch: Batch, val_batch: Batch | None = None) -> dict[str, float]:
        if val_batch is not None:
            raise ValueError(f"{self.name} trains on one stream; it got a validation batch")
        self.w_optimizer.zero_grad(set_to_none=True)
        self.a_optimizer.zero_grad(set_to_none=True)
        aw = self.arch_weights()
        loss, stats = self.loss(train_batch, aw, regularize=True)  # one loss for both
        loss = self.add_penalty(loss, aw, stats)  # configured penalties (e.g. latency)
        extra, extra_stats = self.extra_loss(aw)
        (loss if extra is None else loss + extra).backward()
        self.average_weight_grads()
        nn.utils.clip_grad_norm_(self.supernet.parameters(), self.config.w_optim.grad_clip)
        # alpha grads go through set_alpha_grads so data-parallel runs average them
        self.set_alpha_grads([
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self.alphas()
        ])
        self.w_optimizer.step()
        self.a_optimizer.step()
        stats.update(extra_stats)
        return stats
