"""A graph convolutional accuracy predictor (after Wen et al., 2020, "Neural Predictor for
Neural Architecture Search"): after ``initial`` random cells, repeatedly fit a GCN
regressor to the queried (cell, validation accuracy) pairs, rank unseen candidate cells
(a random pool plus the best cells' one-edge neighbours) by its prediction and query the
top ``batch``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.graph import GraphEncoder, graph_tensors
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import register_query_strategy, standardize
from diffnas.nasbench.strategies.predictor import (
    RankingConfig,
    RankingSearch,
    RoundLoss,
    space_graphs,
)


class GcnPredictor(nn.Module):
    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.encoder = GraphEncoder(hidden, layers)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, A_f: torch.Tensor, A_b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(A_f, A_b, X)).squeeze(-1)


@register_query_strategy("gcn")
class GcnPredictorSearch(RankingSearch):
    """Full-batch regression of the standardized accuracies; candidates ranked by the
    predicted accuracy."""

    Config = RankingConfig

    def build_model(self) -> nn.Module:
        return GcnPredictor(self.config.hidden, self.config.layers)

    def round_loss(self, cells: np.ndarray, accs: np.ndarray, gen: torch.Generator) -> RoundLoss:
        graphs = graph_tensors(cells)
        y = torch.from_numpy(standardize(accs)).float()
        return lambda model: nn.functional.mse_loss(model(*graphs), y)

    def scores(self, model: nn.Module, codes: np.ndarray, oracle: QueryOracle) -> np.ndarray:
        return model(*space_graphs(codes)).double().numpy()
