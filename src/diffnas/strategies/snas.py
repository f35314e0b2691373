"""SNAS (Xie et al., 2019): Gumbel-softmax relaxation with an annealed temperature,
weights and architecture updated in the same backward pass (single level), and an
optional resource term: the expected cost of the sampled ops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.config import require
from diffnas.ops import create_op
from diffnas.registry import UnknownNameError
from diffnas.spaces.base import EdgeSpec
from diffnas.strategies.registry import register_strategy
from diffnas.strategies.single_level import SingleLevelConfig, SingleLevelStrategy


@dataclass
class SnasConfig(SingleLevelConfig):
    relaxation: dict = field(
        default_factory=lambda: {"name": "gumbel", "tau": 1.0, "tau_min": 0.1, "anneal": "exp"}
    )
    cost_weight: float = 0.0  # weight of the resource term (0: off)
    cost_channels: int = 16  # ops are measured (parameter count) at this width

    def __post_init__(self) -> None:
        if self.relaxation.get("name") not in ("gumbel", "hard_gumbel"):
            raise ValueError(
                f"snas needs a Gumbel relaxation, got {self.relaxation.get('name')!r}"
            )
        require(math.isfinite(self.cost_weight) and self.cost_weight >= 0,
                "search.strategy.cost_weight", "finite and >= 0", self.cost_weight)
        if self.cost_channels < 1:  # (its type is checked with the config)
            raise ValueError(f"snas cost_channels must be >= 1, got {self.cost_channels}")


def op_costs(edges: Sequence[EdgeSpec], C: int) -> torch.Tensor:
    """Parameter count of each candidate op of each edge at width ``C`` and the edge's
    stride (a strided ``skip_connect`` is a FactorizedReduce with weights), divided by the
    largest: shape ``(len(edges), len(candidates))``."""
    cache: dict[tuple[str, int], float] = {}

    def count(name: str, stride: int) -> float:
        if (name, stride) not in cache:
            with torch.device("meta"):  # shapes only: no memory, and no draw from the RNG
                op = create_op(name, C, stride, affine=False)
            cache[(name, stride)] = float(sum(p.numel() for p in op.parameters()))
        return cache[(name, stride)]

    counts = torch.tensor([[count(n, e.stride) for n in e.candidates] for e in edges])
    return counts / counts.max() if counts.max() > 0 else counts


@register_strategy("snas")
class SnasStrategy(SingleLevelStrategy):
    Config = SnasConfig

    @staticmethod
    def _costs(config: SnasConfig, arch_params: ArchParams) -> dict[str, torch.Tensor]:
        """The per-edge op costs of each group; {} where the space's ops are not the
        convolutional ones and no resource term is asked for."""
        try:  # counted with the convolutional ops' registry
            return {g: op_costs(arch_params.edges[g], config.cost_channels)
                    for g in arch_params.groups()}
        except UnknownNameError as exc:
            if config.cost_weight > 0:
                raise ValueError(
                    "snas cost_weight counts the parameters of convolutional ops (darts_cnn, "
                    f"nb201 spaces); this space's ops are not among them ({exc}): set "
                    "cost_weight: 0, or use a latency penalty (docs/latency.md)") from exc
            return {}  # graph or recurrent ops: no resource term asked for

    @classmethod
    def check_setup(cls, config: SnasConfig, arch_params: ArchParams, epochs: int) -> None:
        if config.cost_weight > 0:
            cls._costs(config, arch_params)

    def __init__(self, config: SnasConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        # (none without a resource term: cost_channels then changes nothing)
        self.costs = self._costs(config, self.arch_params) if config.cost_weight > 0 else {}

    def extra_loss(self, arch_weights: ArchWeights) -> tuple[torch.Tensor | None, dict]:
        """cost_weight * sum over edges of sum_k w_k cost_k (the sampled ops' cost)."""
        if self.config.cost_weight == 0:
            return None, {"tau": self.relaxation.tau}
        cost = sum(
            (arch_weights[g] * c.to(arch_weights[g])).sum() for g, c in self.costs.items()
        )
        stats = {"cost": float(cost.detach()), "tau": self.relaxation.tau}
        return self.config.cost_weight * cost, stats
