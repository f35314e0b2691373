"""Neural Architecture Optimization (Luo et al., 2018), compact: an LSTM encoder maps the
6 op tokens of a cell to 6 unit-norm embeddings (one per token), a predictor maps their
normalized mean (the architecture embedding) to accuracy, and an attention decoder maps
them back to tokens: an LSTM cell whose hidden and cell states start at the architecture
embedding, that reads the previous token and at every step attends over the 6 per-token
embeddings (Luong-style, as in the paper's released code). Trained jointly
(``trade_off`` * prediction MSE + (1 - ``trade_off``) * reconstruction cross-entropy, the
decoder fed the true previous tokens) on the queried cells; then the best cells'
per-token embeddings move up the predictor's gradient (e + eta * d pred / d e), with a
growing step size eta until the decoder, attending over the moved embeddings, decodes
them (greedily) to unseen cells, which are queried."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, Cell, code_of
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    query_random,
    register_query_strategy,
    round_size,
    standardize,
)
from diffnas.nasbench.strategies.predictor import PredictorConfig, PredictorSearch, RoundLoss


@dataclass
class NaoConfig(PredictorConfig):
    seeds: int = 10  # best cells whose embeddings are optimized (at least batch)
    embed: int = 16
    hidden: int = 32
    lr: float = 5e-3
    trade_off: float = 0.8
    step_sizes: tuple[float, ...] = (0.5, 1, 2, 4, 8, 16, 32, 64)
    # Renormalize the moved embeddings to unit norm, as NAO's released code does (the
    # paper's update has no renormalization; on NB-201 it measured worse, docs/nb201.md).
    renormalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.seeds < 1:
            raise ValueError(f"nao needs seeds >= 1, got {self.seeds}")
        if not 0 <= self.trade_off <= 1:
            raise ValueError(f"nao trade_off must be in [0, 1], got {self.trade_off}")
        self.require("nao", [
            ("embed", self.embed >= 1, ">= 1"), ("hidden", self.hidden >= 1, ">= 1"),
            ("step_sizes", len(self.step_sizes) > 0 and all(s > 0 for s in self.step_sizes),
             "a non-empty list of positive steps")])


class Nao(nn.Module):
    """Encoder, predictor and attention decoder, after NAO's released code: the encoder's
    per-token outputs are unit vectors; the architecture embedding is their normalized
    mean; the predictor reads the architecture embedding; the decoder LSTM starts with
    both its hidden and its cell state at the architecture embedding and at every step
    attends over the per-token outputs (dot-product scores, softmax over the 6 positions,
    then ``tanh(W [output; context])``, Luong-style) before predicting the token."""

    def __init__(self, embed: int, hidden: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(NUM_OPS, embed)
        self.positions = nn.Parameter(torch.zeros(NUM_EDGES, embed))
        self.encoder = nn.LSTM(embed, hidden, batch_first=True)
        self.predictor = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.dec_tokens = nn.Embedding(NUM_OPS + 1, embed)  # + a start token
        self.decoder = nn.LSTMCell(embed, hidden)
        self.attend = nn.Linear(2 * hidden, hidden)
        self.out = nn.Linear(hidden, NUM_OPS)

    def encode(self, cells: torch.Tensor) -> torch.Tensor:
        """(n, 6) op indices -> (n, 6, hidden) per-token outputs, each of unit norm."""
        h, _ = self.encoder(self.tokens(cells) + self.positions)
        return nn.functional.normalize(h, dim=-1)

    @staticmethod
    def pool(emb: torch.Tensor) -> torch.Tensor:
        """The architecture embedding: the normalized mean of the per-token outputs."""
        return nn.functional.normalize(emb.mean(1), dim=-1)

    @staticmethod
    def move(emb: torch.Tensor, grad: torch.Tensor, eta: float,
             renormalize: bool = False) -> torch.Tensor:
        """The search step on the per-token outputs: ``emb + eta * grad`` (with
        ``renormalize``, back to unit norm as encoded outputs are)."""
        moved = emb + eta * grad
        return nn.functional.normalize(moved, dim=-1) if renormalize else moved

    def predict(self, emb: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.pool(emb)).squeeze(-1)

    def decode(self, emb: torch.Tensor, cells: torch.Tensor | None = None, *,
               attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(n, 6, ops) logits (and with ``attention`` the (n, 6, 6) weights, step x
        encoder position). Step t reads token t-1 (the true one from ``cells`` when
        given, for training; else the greedy choice) and attends over ``emb``."""
        h = self.pool(emb)
        c = h
        prev = torch.full(emb.shape[:1], NUM_OPS, dtype=torch.long, device=emb.device)
        logits, weights = [], []
        for t in range(NUM_EDGES):
            h, c = self.decoder(self.dec_tokens(prev) + self.positions[t], (h, c))
            w = torch.softmax(torch.einsum("nh,nlh->nl", h, emb), -1)
            context = torch.einsum("nl,nlh->nh", w, emb)
            step = self.out(torch.tanh(self.attend(torch.cat([h, context], -1))))
            logits.append(step)
            weights.append(w)
            prev = step.argmax(-1) if cells is None else cells[:, t]
        if attention:
            return torch.stack(logits, 1), torch.stack(weights, 1)
        return torch.stack(logits, 1)


@register_query_strategy("nao")
class NaoSearch(PredictorSearch):
    Config = NaoConfig
    config: NaoConfig

    def build_model(self) -> nn.Module:
        return Nao(self.config.embed, self.config.hidden)

    def round_loss(self, cells: np.ndarray, accs: np.ndarray, gen: torch.Generator) -> RoundLoss:
        x = torch.from_numpy(cells)
        y = torch.from_numpy(standardize(accs)).float()
        t = self.config.trade_off

        def loss(model: nn.Module) -> torch.Tensor:
            emb = model.encode(x)
            mse = nn.functional.mse_loss(model.predict(emb), y)
            rec = nn.functional.cross_entropy(model.decode(emb, x).reshape(-1, NUM_OPS),
                                              x.reshape(-1))
            return t * mse + (1 - t) * rec

        return loss

    def query_round(
        self, model: nn.Module, oracle: QueryOracle, rng: np.random.Generator,
        cells: np.ndarray, accs: np.ndarray,
    ) -> int:
        c = self.config
        k = round_size(c.batch, c.growth, oracle)
        new = self._propose(model, oracle, cells, accs, max(k, c.seeds))
        if not new:  # nothing new decodes: fall back to random cells
            return len(query_random(oracle, rng, min(k, oracle.remaining)))
        new = new[: min(k, oracle.remaining)]
        for cell in new:
            oracle.query(cell)
        return len(new)

    def _propose(self, model: Nao, oracle: QueryOracle, cells: np.ndarray,
                 accs: np.ndarray, seeds: int) -> list[Cell]:
        """Move the best cells' per-token embeddings up the predicted accuracy; decode
        new cells (the decoder attends over the moved embeddings and starts from their
        pooled mean), ranked by the prediction for the decoded cell."""
        c = self.config
        top = cells[np.argsort(-accs, kind="stable")[:seeds]]
        emb = model.encode(torch.from_numpy(top)).detach().requires_grad_(True)
        grad = torch.autograd.grad(model.predict(emb).sum(), emb)[0]
        found: dict[int, Cell] = {}
        pending = list(range(len(top)))
        with torch.no_grad():
            for eta in c.step_sizes:
                if not pending:
                    break
                moved = model.move(emb[pending], grad[pending], eta, c.renormalize)
                dec = model.decode(moved).argmax(-1).numpy()
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
