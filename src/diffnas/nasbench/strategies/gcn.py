"""A graph convolutional accuracy predictor (after Wen et al., 2020, "Neural Predictor for
Neural Architecture Search"): after ``initial`` random cells, repeatedly fit a GCN
regressor to the queried (cell, validation accuracy) pairs, rank unseen candidate cells
(a random pool plus the best cells' one-edge neighbours) by its prediction and query the
top ``batch``."""

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
    standardize,
    torch_generator,
)


@dataclass
class GcnConfig(QueryStrategyConfig):
    initial: int = 20  # random cells before the first fit
    batch: int = 10  # cells queried per round (at least)
    growth: float = 0.2  # ... or this fraction of the cells queried so far, if more
    pool: int = 2000  # random unseen cells ranked per round (0 = the whole space)
    neighbours_of: int = 5  # plus every one-edge mutation of this many best cells
    hidden: int = 64
    layers: int = 3
    epochs: int = 30  # full-batch Adam steps per round (the model is warm-started)
    lr: float = 3e-3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.initial < 2 or self.batch < 1:
            raise ValueError("gcn needs initial >= 2 and batch >= 1")


class GcnPredictor(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.encoder = GraphEncoder(hidden, layers)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, A_f: torch.Tensor, A_b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(A_f, A_b, X)).squeeze(-1)


@register_query_strategy("gcn")
class GcnPredictorSearch(QueryStrategy):
    Config = GcnConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        query_random(oracle, rng, c.initial)
        gen = torch_generator(rng)
        model = seeded_model(gen, lambda: GcnPredictor(c.hidden, c.layers))
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                               foreach=True)
        space = space_graph_tensors()
        while not oracle.exhausted:
            cells, accs = oracle.data()
            graphs = graph_tensors(cells)
            y = torch.from_numpy(standardize(accs)).float()
            model.train()
            for _ in range(c.epochs):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.mse_loss(model(*graphs), y)
                loss.backward()
                opt.step()
            model.eval()
            codes = candidate_pool(oracle, rng, c.pool, c.neighbours_of)
            with torch.no_grad():
                scores = model(*(t[codes] for t in space)).double().numpy()
            if query_top(oracle, codes, scores, round_size(c.batch, c.growth, oracle)) == 0:
                break
