"""A CTNAS-style comparator (after Chen et al., 2021, "Contrastive Neural Architecture
Search with Neural Architecture Comparators"): a siamese GCN predicts the probability
that a candidate beats a baseline cell. It is trained on pairs of queried cells; each
round the candidates most likely to beat the current baseline are queried, and the
baseline is updated to the best cell found so far. (CTNAS samples candidates with a
policy rewarded by the comparator; here the candidates are a random pool of unseen cells
plus the one-edge neighbours of the best cells, ranked by the comparator.)"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.graph import GraphEncoder, graph_tensors
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import register_query_strategy
from diffnas.nasbench.strategies.predictor import (
    RankingConfig,
    RankingSearch,
    RoundLoss,
    space_graphs,
)


@dataclass
class ComparatorConfig(RankingConfig):
    pairs: int = 512  # random ordered pairs per Adam step

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pairs < 1:
            raise ValueError(f"comparator needs pairs >= 1, got {self.pairs}")


class Comparator(nn.Module):
    """logit P(a beats b) = g(a, b) - g(b, a): antisymmetric by construction."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.encoder = GraphEncoder(hidden, layers)
        self.g = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def compare(self, ea: torch.Tensor, eb: torch.Tensor) -> torch.Tensor:
        ab = self.g(torch.cat([ea, eb, ea - eb], -1))
        ba = self.g(torch.cat([eb, ea, eb - ea], -1))
        return (ab - ba).squeeze(-1)


@register_query_strategy("comparator")
class ComparatorSearch(RankingSearch):
    """Trained on random ordered pairs of queried cells (which is better); candidates
    ranked by the probability that they beat the best cell queried so far."""

    Config = ComparatorConfig
    config: ComparatorConfig

    def build_model(self) -> nn.Module:
        return Comparator(self.config.hidden, self.config.layers)

    def round_loss(self, cells: np.ndarray, accs: np.ndarray, gen: torch.Generator) -> RoundLoss:
        graphs = graph_tensors(cells)
        acc = torch.from_numpy(accs)
        n, pairs = len(cells), self.config.pairs

        def loss(model: nn.Module) -> torch.Tensor | None:
            i = torch.randint(n, (pairs,), generator=gen)
            j = torch.randint(n, (pairs,), generator=gen)
            keep = acc[i] != acc[j]
            i, j = i[keep], j[keep]
            if len(i) == 0:
                return None  # every queried cell ties: nothing to learn this round
            emb = model.encoder(*graphs)
            return nn.functional.binary_cross_entropy_with_logits(
                model.compare(emb[i], emb[j]), (acc[i] > acc[j]).float())

        return loss

    def scores(self, model: nn.Module, codes: np.ndarray, oracle: QueryOracle) -> np.ndarray:
        baseline, _ = oracle.best()
        emb_all = model.encoder(*space_graphs(codes))
        emb_base = model.encoder(*graph_tensors(np.array([baseline])))
        return model.compare(emb_all, emb_base.expand_as(emb_all)).double().numpy()
