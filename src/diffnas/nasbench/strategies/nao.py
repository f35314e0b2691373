"""Neural Architecture Optimization (Luo et al., 2018), compact: an LSTM encoder maps the
6 op tokens of a cell to a sequence of embeddings, a predictor maps their mean to
accuracy, and an LSTM decoder maps the embeddings back to tokens. Trained jointly
(``trade_off`` * prediction MSE + (1 - ``trade_off``) * reconstruction cross-entropy) on
the queried cells; then the best cells' embeddings move up the predictor's gradient,
with a growing step size until they decode to unseen cells, which are queried."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, Cell, code_of
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    query_random,
    register_query_strategy,
    round_size,
    seeded_model,
    standardize,
    torch_generator,
)


@dataclass
class NaoConfig(QueryStrategyConfig):
    initial: int = 20
    batch: int = 10  # new cells per round (at least)
    growth: float = 0.2  # ... or this fraction of the cells queried so far, if more
    seeds: int = 10  # best cells whose embeddings are optimized (at least batch)
    embed: int = 16
    hidden: int = 32
    epochs: int = 30  # Adam steps per round (warm-started)
    lr: float = 5e-3
    trade_off: float = 0.8
    step_sizes: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16, 32, 64)

    def __post_init__(self) -> None:
        if self.initial < 2 or self.batch < 1 or self.seeds < 1:
            raise ValueError("nao needs initial >= 2, batch >= 1 and seeds >= 1")
        if not 0 <= self.trade_off <= 1:
            raise ValueError(f"nao trade_off must be in [0, 1], got {self.trade_off}")


class Nao(nn.Module):
    def __init__(self, embed: int, hidden: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(NUM_OPS, embed)
        self.positions = nn.Parameter(torch.zeros(NUM_EDGES, embed))
        self.encoder = nn.LSTM(embed, hidden, batch_first=True)
        self.predictor = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, NUM_OPS)

    def encode(self, cells: torch.Tensor) -> torch.Tensor:
        h, _ = self.encoder(self.tokens(cells) + self.positions)
        return nn.functional.normalize(h, dim=-1)

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        return self.predictor(emb.mean(1)).squeeze(-1)

    def decode(self, emb: torch.Tensor) -> torch.Tensor:
        h, _ = self.decoder(emb)
        return self.out(h)  # (n, 6, ops) logits


@register_query_strategy("nao")
class NaoSearch(QueryStrategy):
    Config = NaoConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        query_random(oracle, rng, c.initial)
        gen = torch_generator(rng)
        model = seeded_model(gen, lambda: Nao(c.embed, c.hidden))
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, foreach=True)
        while not oracle.exhausted:
            cells, accs = oracle.data()
            x = torch.from_numpy(cells)
            y = torch.from_numpy(standardize(accs)).float()
            model.train()
            for _ in range(c.epochs):
                opt.zero_grad(set_to_none=True)
                emb = model.encode(x)
                mse = nn.functional.mse_loss(model.predict(emb), y)
                rec = nn.functional.cross_entropy(model.decode(emb).reshape(-1, NUM_OPS),
                                                  x.reshape(-1))
                (c.trade_off * mse + (1 - c.trade_off) * rec).backward()
                opt.step()
            k = round_size(c.batch, c.growth, oracle)
            new = self._propose(model, oracle, cells, accs, max(k, c.seeds))
            if not new:  # nothing new decodes: fall back to random cells
                if not query_random(oracle, rng, min(k, oracle.remaining)):
                    break
                continue
            for cell in new[: min(k, oracle.remaining)]:
                oracle.query(cell)

    def _propose(self, model: Nao, oracle: QueryOracle, cells: np.ndarray,
                 accs: np.ndarray, seeds: int) -> list[Cell]:
        """Move the best cells' embeddings up the predicted accuracy; decode new cells,
        ranked by the prediction for the decoded cell."""
        c = self.config
        model.eval()
        top = cells[np.argsort(-accs, kind="stable")[:seeds]]
        emb = model.encode(torch.from_numpy(top)).detach().requires_grad_(True)
        grad = torch.autograd.grad(model.predict(emb).sum(), emb)[0]
        found: dict[int, Cell] = {}
        pending = list(range(len(top)))
        with torch.no_grad():
            for eta in c.step_sizes:
                if not pending:
                    break
                dec = model.decode(emb[pending] + eta * grad[pending]).argmax(-1).numpy()
                still = []
                for row, i in zip(dec, pending, strict=True):
                    cell = tuple(int(v) for v in row)
                    if oracle.seen(cell) or code_of(cell) in found:
                        still.append(i)
                    else:
                        found[code_of(cell)] = cell
                pending = still
            if not found:
                return []
            new = list(found.values())
            scores = model.predict(model.encode(torch.tensor(new))).numpy()
        return [new[i] for i in np.argsort(-scores, kind="stable")]
