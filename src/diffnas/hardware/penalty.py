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

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from diffnas.hardware.predictor import LatencyPredictor
from diffnas.spaces.nb201 import NB201_OPS
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
        if isinstance(lam, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                lam = float(lam)
            except ValueError:
                pass
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (
                math.isfinite(lam) and lam >= 0):
            raise ValueError(f"latency penalty lam must be a finite number >= 0, got {lam!r}")
        if not isinstance(normalize, bool):  # the string 'false' would read as true
            raise ValueError(f"latency penalty normalize must be true or false, got "
                             f"{normalize!r}")
        self.predictor = (predictor if isinstance(predictor, LatencyPredictor)
                          else LatencyPredictor.load(predictor))
        for p in self.predictor.parameters():
            p.requires_grad_(False)
        self.predictor.eval()
        self.lam, self.input = float(lam), input
        ref = self.predictor.ref_ms
        if normalize and not (math.isfinite(ref) and ref > 0):  # (a hand-built predictor)
            raise ValueError(f"latency penalty normalize=true divides by the predictor's "
                             f"mean training latency, which is {ref:g} ms; give a predictor "
                             "fitted on measured latencies, or normalize=false")
        self.scale = 1.0 / ref if normalize else 1.0

    def bind(self, arch_params: Any) -> None:
        """Refuse architecture parameters (an :class:`~diffnas.arch.ArchParams`) whose cell
        types, edges or op lists differ from the predictor's: its input columns follow the
        op list of the space it was fitted on, so another order would read the wrong ops."""
        self.predictor.check_edges(arch_params.edges, "the search")

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


def cell_latency_fn(predictor: str | LatencyPredictor,
                    ops: Sequence[str] = NB201_OPS) -> Callable[[Sequence[int]], float]:
    """``latency(op_indices) -> ms`` for a space with one cell type (e.g. ``nb201``): the
    predictor applied to the one-hot of the op per edge. For query-based searches
    (REINFORCE with :func:`mnasnet_reward`). The indices are into ``ops`` (NAS-Bench-201's
    fixed order by default, as its query strategies use) and are mapped to the
    predictor's columns by op name, since a predictor's columns follow the op list of the
    space it was fitted on; edges are in the predictor's (the space's) edge order. A cell
    with an op the predictor was not fitted with is an error naming the op."""
    p = predictor if isinstance(predictor, LatencyPredictor) else LatencyPredictor.load(predictor)
    if len(p.shapes) != 1:
        raise ValueError(f"cell_latency_fn needs a one-cell-type predictor, got {list(p.shapes)}")
    (group, (edges, n_columns)), = p.shapes.items()
    names = p.op_names(group)
    ops = tuple(ops)
    column = {op: names.index(op) for op in ops if op in names}
    cache: dict[tuple[int, ...], float] = {}

    def latency(cell: Sequence[int]) -> float:
        key = tuple(int(i) for i in cell)
        if len(key) != edges or not all(0 <= i < len(ops) for i in key):
            raise ValueError(f"cell {key} does not fit: the predictor has {edges} edges and "
                             f"the indices are into {len(ops)} ops {list(ops)}")
        if key not in cache:
            missing = sorted({ops[i] for i in key if ops[i] not in column})
            if missing:
                raise ValueError(f"cell {key} uses op(s) {missing} that the latency predictor "
                                 f"was not fitted with (its ops: {list(names)}); fit it on a "
                                 "space with these ops")
            w = torch.zeros(edges, n_columns)
            w[torch.arange(edges), torch.tensor([column[ops[i]] for i in key])] = 1.0
            with torch.no_grad():
                cache[key] = float(p({group: w}))
        return cache[key]

    return latency
