"""Architecture parameters (alpha): one row of logits per edge, one tensor per cell type.

They live here, never inside the supernet, so weights and architecture parameters are two
disjoint parameter sets with two optimizers.
"""

from __future__ import annotations

import torch
from torch import nn

from diffnas.spaces.base import EdgeSpec, SearchSpace


class ArchParams(nn.Module):
    """Logits keyed by cell type: ``self[group]`` has shape ``(num_edges, num_ops)``.

    Row ``i`` of group ``g`` belongs to ``self.edges[g][i]`` (an :class:`EdgeSpec`).
    """

    def __init__(self, space: SearchSpace, init_std: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.edges: dict[str, list[EdgeSpec]] = space.edge_groups()
        self.logits = nn.ParameterDict()
        for group, edges in self.edges.items():
            n_ops = len(edges[0].candidates)
            if any(len(e.candidates) != n_ops for e in edges):
                raise ValueError(f"edges of group {group!r} must share one candidate list")
            init = init_std * torch.randn(len(edges), n_ops, generator=generator)
            self.logits[group] = nn.Parameter(init)

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.logits[group]

    def groups(self) -> list[str]:
        return list(self.logits.keys())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {g: self.logits[g] for g in self.logits}

    def candidates(self, group: str) -> tuple[str, ...]:
        return self.edges[group][0].candidates

    def by_label(self) -> dict[str, torch.Tensor]:
        """Logit rows keyed by stable edge label (e.g. ``normal/n2/e0``)."""
        return {e.label: self.logits[g][i] for g, es in self.edges.items() for i, e in enumerate(es)}
