"""Objectives: the task loss a strategy minimises, kept apart from strategies and spaces.

An objective maps (network output, batch) to the loss and counts for metrics, so a
strategy never needs to know whether it searches an image classifier or a language model.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F


class Objective(Protocol):
    def inputs(self, batch: Any) -> Any:
        """What the network is called with (besides arch weights)."""

    def __call__(self, output: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (a scalar tensor) and detached metrics (e.g. accuracy)."""


class ClassificationObjective:
    """Cross-entropy on ``(x, y)`` batches; reports accuracy."""

    def inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return batch[0]

    def __call__(
        self, output: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        y = batch[1]
        loss = F.cross_entropy(output, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} (NaN/inf): lower the learning rate?")
        acc = (output.detach().argmax(dim=-1) == y).float().mean().item()
        return loss, {"loss": loss.item(), "acc": acc}
