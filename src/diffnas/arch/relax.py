"""Relaxations turn architecture logits into the weights the supernet mixes ops with."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffnas.registry import Registry


@dataclass
class ArchWeights:
    """Relaxed weights per cell type, shape ``(num_edges, num_ops)``.

    ``active`` is set by hard (sampling) relaxations: the sampled op index per edge, and
    the supernet then computes only that op on each edge.
    """

    weights: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor] | None = field(default=None)

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.weights[group]

    def detach(self) -> ArchWeights:
        act = None if self.active is None else dict(self.active)
        return ArchWeights({g: w.detach() for g, w in self.weights.items()}, act)


class Relaxation:
    """Base class: ``__call__(logits) -> ArchWeights``. Stateless unless it says so."""

    stochastic = False

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


RELAXATIONS: Registry[type[Relaxation]] = Registry("relaxation")


@RELAXATIONS.register("softmax")
class SoftmaxRelaxation(Relaxation):
    """DARTS: softmax over the ops of each edge."""

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        return ArchWeights({g: torch.softmax(a, dim=-1) for g, a in logits.items()})


def create_relaxation(name: str, **kwargs) -> Relaxation:
    return RELAXATIONS.get(name)(**kwargs)
