"""A relaxation plugin (docs/extending.md, "A relaxation"): softmax at a temperature,
``search.strategy.relaxation: {name: softmax_t, tau: 0.5}``."""

import torch

from diffnas.arch import ArchWeights, Relaxation, register_relaxation


@register_relaxation("softmax_t")
class TemperatureSoftmax(Relaxation):
    """softmax(alpha / tau) per edge: tau < 1 sharpens the mix, tau > 1 flattens it."""

    def __init__(self, tau: float = 1.0) -> None:  # keywords = the config section's keys
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        return ArchWeights({g: torch.softmax(a / self.tau, dim=-1) for g, a in logits.items()})
