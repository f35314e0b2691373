"""What the predictor-guided query strategies (GCN predictor, comparator, NAO) share: query
``initial`` random cells, then repeat rounds of (fit a model to the queried cells with
warm-started Adam steps) -> (query the cells the model proposes) until the budget is spent.
A strategy supplies the model, its training loss for a round, and how a round proposes
cells; the ranking strategies (GCN, comparator) only how the model scores candidates."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.graph import space_graph_tensors
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    candidate_pool,
    query_random,
    query_top,
    round_size,
    seeded_model,
    torch_generator,
)

RoundLoss = Callable[[nn.Module], "torch.Tensor | None"]


@dataclass
class PredictorConfig(QueryStrategyConfig):
    initial: int = 20  # random cells before the first fit
    batch: int = 10  # cells queried per round (at least)
    growth: float = 0.2  # ... or this fraction of the cells queried so far, if more
    epochs: int = 30  # Adam steps per round (the model is warm-started)
    lr: float = 3e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.initial < 2 or self.batch < 1:
            raise ValueError("a predictor-guided strategy needs initial >= 2 and batch >= 1, "
                             f"got initial={self.initial}, batch={self.batch}")
        self.require("predictor", [
            ("growth", self.growth >= 0, ">= 0"), ("epochs", self.epochs >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"), ("weight_decay", self.weight_decay >= 0, ">= 0")])


class PredictorSearch(QueryStrategy):
    """The round loop; subclasses define :meth:`build_model`, :meth:`round_loss` and
    :meth:`query_round`."""

    config: PredictorConfig

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, built once (its initial weights seeded from the run's seed)."""

    @abstractmethod
    def round_loss(
        self, cells: np.ndarray, accs: np.ndarray, gen: torch.Generator
    ) -> RoundLoss:
        """For this round's queried ``cells`` and validation ``accs``: a function from the
        model to the loss of one Adam step (None: nothing left to fit this round)."""

    @abstractmethod
    def query_round(
        self, model: nn.Module, oracle: QueryOracle, rng: np.random.Generator,
        cells: np.ndarray, accs: np.ndarray,
    ) -> int:
        """Query the cells the fitted ``model`` proposes; how many were queried (0 ends
        the search)."""

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        query_random(oracle, rng, c.initial)
        gen = torch_generator(rng)
        model = seeded_model(gen, self.build_model)
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                               foreach=True)
        while not oracle.exhausted:
            cells, accs = oracle.data()
            loss_of = self.round_loss(cells, accs, gen)
            model.train()
            for _ in range(c.epochs):
                loss = loss_of(model)
                if loss is None:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            if self.query_round(model, oracle, rng, cells, accs) == 0:
                break


@dataclass
class RankingConfig(PredictorConfig):
    pool: int = 2000  # random unseen cells ranked per round (0 = the whole space)
    neighbours_of: int = 5  # plus every one-edge mutation of this many best cells
    hidden: int = 64
    layers: int = 3
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require("predictor", [
            ("pool", self.pool >= 0, ">= 0 (0: the whole space)"),
            ("neighbours_of", self.neighbours_of >= 0, ">= 0"),
            ("hidden", self.hidden >= 1, ">= 1"), ("layers", self.layers >= 1, ">= 1")])


class RankingSearch(PredictorSearch):
    """Each round ranks a candidate pool (random unseen cells plus the best cells'
    one-edge neighbours) by :meth:`scores` and queries the top ``batch``."""

    config: RankingConfig

    @abstractmethod
    def scores(self, model: nn.Module, codes: np.ndarray, oracle: QueryOracle) -> np.ndarray:
        """Higher is better, one per cell code, computed without gradients."""

    def query_round(
        self, model: nn.Module, oracle: QueryOracle, rng: np.random.Generator,
        cells: np.ndarray, accs: np.ndarray,
    ) -> int:
        c = self.config
        codes = candidate_pool(oracle, rng, c.pool, c.neighbours_of)
        with torch.no_grad():
            scores = self.scores(model, codes, oracle)
        return query_top(oracle, codes, scores, round_size(c.batch, c.growth, oracle))


def space_graphs(codes: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Graph tensors of the cells with these codes."""
    return tuple(t[codes] for t in space_graph_tensors())
