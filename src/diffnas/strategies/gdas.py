"""GDAS (Dong & Yang, 2019): DARTS's bilevel loop with hard Gumbel sampling.

Each forward pass samples one op per edge (Gumbel-argmax); the one-hot weight carries
the Gumbel-softmax gradient (straight-through), and the relaxation's ``active`` indices
make the supernet compute only the sampled op of every edge. The temperature falls
linearly from 10 to 0.1 over the run (the paper's schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffnas.strategies.darts import DartsConfig, DartsStrategy
from diffnas.strategies.registry import register_strategy


@dataclass
class GdasConfig(DartsConfig):
    relaxation: dict = field(
        default_factory=lambda: {"name": "hard_gumbel", "tau": 10.0, "tau_min": 0.1,
                                 "anneal": "linear"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.relaxation.get("name") != "hard_gumbel":
            raise ValueError(
                f"gdas samples one op per edge: its relaxation must be 'hard_gumbel', got "
                f"{self.relaxation.get('name')!r} (use strategy 'darts' for that relaxation)"
            )


@register_strategy("gdas")
class GdasStrategy(DartsStrategy):
    """Alpha step on the validation batch, weight step on the training batch, each with
    a fresh hard sample (the composition: DARTS + the ``hard_gumbel`` relaxation)."""

    Config = GdasConfig
