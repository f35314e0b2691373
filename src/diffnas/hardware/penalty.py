"""The differentiable latency term and the MnasNet reward.

``latency`` penalty (registered with the strategies' penalty hook): ``lam * predicted
latency / reference latency`` of the relaxed architecture, added to the alpha objective of
any relaxation-based strategy. ``input: weights`` feeds the relaxed weights the strategy
uses (softmax for DARTS, Gumbel samples for SNAS/GDAS, a reparameterised estimate of the
expected latency); ``input: probs`` feeds ``softmax(alpha)``, the expected one-hot of the
sampling distribution: SNAS's resource constraint ``E[cost(Z)]`` (exact for an additive
cost, a first-order approximation through the MLP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from diffnas.hardware.predictor import LatencyPredictor
from diffnas.strategies.base import register_penalty


@register_penalty("latency")
class LatencyPenalty(nn.Module):
    """``lam * latency(w) / ref``; ``ref`` is the predictor's training-set mean unless
    ``normalize`` is false (then the penalty is in ms)."""

    def __init__(self, predictor: str | LatencyPredictor, lam: float = 0.1,
                 input: str = "weights", normalize: bool = True) -> None:
        super().__init__()
        if input not in ("weights", "probs"):
            raise ValueError(f"latency penalty input must be 'weights' or 'probs', got {input!r}")
        if lam < 0:
            raise ValueError(f"latency penalty lam must be >= 0, got {lam}")
        self.predictor = (predictor if isinstance(predictor, LatencyPredictor)
                          else LatencyPredictor.load(predictor))
        for p in self.predictor.parameters():
            p.requires_grad_(False)
        self.predictor.eval()
        self.lam, self.input = float(lam), input
        self.scale = 1.0 / self.predictor.ref_ms if normalize else 1.0

    def latency(self, arch_weights: Any, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted latency (ms) of the relaxed architecture."""
        if self.input == "probs":
            return self.predictor({g: torch.softmax(a, dim=-1) for g, a in logits.items()})
        return self.predictor(arch_weights)

    def forward(self, arch_weights: Any, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lam * self.scale * self.latency(arch_weights, logits)


def mnasnet_reward(acc: float, latency: float, target: float,
                   w: float | tuple[float, float] = -0.07) -> float:
    """MnasNet (Tan et al., 2019): ``acc * (latency / target) ** w``. ``w`` may be a pair
    ``(alpha, beta)``: alpha applies at or under the target, beta above (``(0, -1)`` is
    the hard constraint; ``-0.07`` both sides the paper's soft one)."""
    if latency <= 0 or target <= 0:
        raise ValueError(f"latency and target must be positive, got {latency}, {target}")
    if isinstance(w, (tuple, list)):
        w = w[0] if latency <= target else w[1]
    return float(acc) * (float(latency) / float(target)) ** float(w)


def cell_latency_fn(predictor: str | LatencyPredictor) -> Callable[[Sequence[int]], float]:
    """``latency(op_indices) -> ms`` for a space with one cell type (e.g. ``nb201``): the
    predictor applied to the one-hot of the op index per edge. For query-based searches
    (REINFORCE with :func:`mnasnet_reward`)."""
    p = predictor if isinstance(predictor, LatencyPredictor) else LatencyPredictor.load(predictor)
    if len(p.shapes) != 1:
        raise ValueError(f"cell_latency_fn needs a one-cell-type predictor, got {list(p.shapes)}")
    (group, (edges, ops)), = p.shapes.items()
    cache: dict[tuple[int, ...], float] = {}

    def latency(cell: Sequence[int]) -> float:
        key = tuple(int(i) for i in cell)
        if len(key) != edges or not all(0 <= i < ops for i in key):
            raise ValueError(f"cell {key} does not fit the predictor ({edges} edges, {ops} ops)")
        if key not in cache:
            w = torch.nn.functional.one_hot(torch.tensor(key), ops).float()
            with torch.no_grad():
                cache[key] = float(p({group: w}))
        return cache[key]

    return latency
