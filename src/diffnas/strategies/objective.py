"""Objectives: the task loss a strategy minimises, kept apart from strategies and spaces.

An objective maps (network output, batch) to the loss and counts for metrics, so a
strategy never needs to know whether it searches an image classifier or a language model.
"""

from __future__ import annotations

import math
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
        acc = (output.detach().argmax(dim=-1) == y).float().mean()
        if graph_capturing(loss):  # checked after replay (engine/cuda_graph.py)
            return loss, {"loss": loss.detach(), "acc": acc}
        check_finite_loss(loss.item())
        return loss, {"loss": loss.item(), "acc": acc.item()}


def graph_capturing(t: torch.Tensor) -> bool:
    """A CUDA graph is being captured on the current stream: no host sync is allowed, so
    metrics stay tensors and finiteness is checked after replay (engine/cuda_graph.py)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def metric(value: torch.Tensor) -> float | torch.Tensor:
    """``value`` as a float for the stats dict, or detached while a CUDA graph is being
    captured (read after replay)."""
    return value.detach() if graph_capturing(value) else value.item()


def check_finite_loss(value: float) -> None:
    """A NaN or infinite loss stops the search with a message that says so."""
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} (NaN/inf): lower the learning rate?")
