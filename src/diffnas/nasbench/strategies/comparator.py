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

from diffnas.nasbench.graph import GraphEncoder, graph_tensors, space_graph_tensors
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    candidate_pool,
    query_random,
    query_top,
    register_query_strategy,
    round_size,
    seeded_model,
    torch_generator,
)


@dataclass
class ComparatorConfig(QueryStrategyConfig):
    initial: int = 20
    batch: int = 10  # cells queried per round (at least)
    growth: float = 0.2  # ... or this fraction of the cells queried so far, if more
    pool: int = 2000  # random unseen cells ranked per round (0 = the whole space)
    neighbours_of: int = 5  # plus every one-edge mutation of this many best cells
    hidden: int = 64
    layers: int = 3
    epochs: int = 30  # Adam steps per round (warm-started)
    pairs: int = 512  # random ordered pairs per step
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.initial < 2 or self.batch < 1 or self.pairs < 1:
            raise ValueError("comparator needs initial >= 2, batch >= 1 and pairs >= 1")


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
class ComparatorSearch(QueryStrategy):
    Config = ComparatorConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        query_random(oracle, rng, c.initial)
        gen = torch_generator(rng)
        model = seeded_model(gen, lambda: Comparator(c.hidden, c.layers))
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                               foreach=True)
        space = space_graph_tensors()
        while not oracle.exhausted:
            cells, accs = oracle.data()
            graphs = graph_tensors(cells)
            acc = torch.from_numpy(accs)
            n = len(cells)
            model.train()
            for _ in range(c.epochs):
                i = torch.randint(n, (c.pairs,), generator=gen)
                j = torch.randint(n, (c.pairs,), generator=gen)
                keep = acc[i] != acc[j]
                i, j = i[keep], j[keep]
                if len(i) == 0:
                    break
                target = (acc[i] > acc[j]).float()
                opt.zero_grad(set_to_none=True)
                emb = model.encoder(*graphs)
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model.compare(emb[i], emb[j]), target)
                loss.backward()
                opt.step()
            baseline, _ = oracle.best()
            model.eval()
            codes = candidate_pool(oracle, rng, c.pool, c.neighbours_of)
            with torch.no_grad():
                emb_all = model.encoder(*(t[codes] for t in space))
                emb_base = model.encoder(*graph_tensors(np.array([baseline])))
                scores = model.compare(emb_all, emb_base.expand_as(emb_all)).double().numpy()
            if query_top(oracle, codes, scores, round_size(c.batch, c.growth, oracle)) == 0:
                break
