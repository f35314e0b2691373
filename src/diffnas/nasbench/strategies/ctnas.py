"""CTNAS (Chen et al., CVPR 2021, "Contrastive Neural Architecture Search with Neural
Architecture Comparators") as a query-based strategy on NAS-Bench-201.

What follows the paper (Algorithm 1) and its released code (chenyaofo/CTNAS):

- a neural architecture comparator (NAC): the siamese GCN :class:`~diffnas.nasbench.
  strategies.comparator.Comparator`, logit of P(a beats b), trained with binary
  cross-entropy on ordered pairs of labelled (queried) cells;
- a policy trained with REINFORCE whose reward for a sampled cell a is the comparator's
  probability that a beats the *baseline cell* b, ``sigmoid(NAC(a, b))``, plus an entropy
  bonus (coefficient 5e-4 as in the released code); Adam with betas (0.5, 0.999);
- the curriculum baseline update: sample K (10) cells from the policy, compare every pair
  with the NAC, and make the cell with the highest mean probability of beating the others
  the new baseline (the first baseline is a sample of the uniform initial policy);
- data exploration: pairs of cells sampled from the policy, labelled by the NAC itself;
  the most confident half is kept and, accumulated over rounds, mixed into the NAC's
  training batches (``explore_ratio`` explored pairs per labelled pair; 1.0 in the code).

What differs, because here every label costs a query of the oracle's budget while the
paper trains the NAC once on a fixed labelled set (423 NAS-Bench-101 cells) and runs 10,000
policy steps:

- the labelled set grows: after the shared ``initial`` random cells (the start every
  strategy shares), each round (1) fits the NAC (``epochs`` warm-started Adam steps, as
  the ``comparator`` strategy does), (2) runs ``policy_steps`` REINFORCE steps of
  ``policy_batch`` samples against the current baseline, (3) updates the baseline, (4)
  queries the ``round_size`` (k) unseen cells among ``proposals`` policy samples that the
  NAC rates most likely to beat the new baseline; when the policy has concentrated and
  fewer than ``choice`` * k unseen samples appear, the most probable unseen cells under the
  policy fill the list up to that, so the NAC still chooses (with ``choice`` 1 the list
  was filled to k only, and from about 60 queries on it decided nothing: every proposal
  was queried), (5) explores new pseudo-labelled pairs;
- the policy is a categorical distribution per edge (6 x 5 logits), not the paper's LSTM
  controller: the paper's LSTM serves NAS-Bench-101's variable graphs (node count, inputs,
  ops); NAS-Bench-201 is six independent 5-way choices, for which NAS-Bench-201's own
  REINFORCE baseline (and :mod:`~diffnas.nasbench.strategies.reinforce`) use this policy.
  With a few hundred steps instead of 10,000 its learning rate is larger (0.05, not 2e-4),
  and no weight decay pulls the logits back to uniform;
- an optional moving-average reward baseline (``reward_baseline_decay``; default off, as
  in the released code, where the baseline *cell* already centres the reward near 0.5);
- explored pairs whose two cells were both queried are dropped (their true order is
  labelled data already), also pairs explored in an earlier round once both their cells
  have been queried since, and confidence is |p - 0.5|, so confident "a loses to b" pairs
  are kept as well as "a beats b" ones. The released code scores one orientation of each
  pair and keeps the top p, i.e. only pairs labelled 1; a deliberate change here, for
  labels of both kinds;
- the result is the queried cell with the best validation accuracy (this package's
  protocol), not the NAC's pick among the history of baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, all_cells_array
from diffnas.nasbench.graph import space_graph_tensors
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    query_random,
    query_top,
    register_query_strategy,
    round_size,
    seeded_model,
    torch_generator,
    unseen_mask,
)
from diffnas.nasbench.strategies.comparator import Comparator
from diffnas.nasbench.strategies.predictor import space_graphs

# code = sum(op_e * 5 ** (5 - e)): the base-5 number of a cell (encoding.code_of)
_PLACE = NUM_OPS ** torch.arange(NUM_EDGES - 1, -1, -1)


@dataclass
class CtnasConfig(QueryStrategyConfig):
    initial: int = 20  # shared random cells before the first fit
    batch: int = 10  # cells queried per round (at least) ...
    growth: float = 0.2  # ... or this fraction of the cells queried so far, if more
    # the comparator (NAC): as the ``comparator`` strategy
    hidden: int = 64
    layers: int = 3
    epochs: int = 30  # warm-started Adam steps per round
    lr: float = 3e-3
    weight_decay: float = 1e-4
    pairs: int = 512  # labelled ordered pairs per Adam step
    # the policy
    policy_steps: int = 50  # REINFORCE steps per round
    policy_batch: int = 10  # sampled cells per step
    policy_lr: float = 0.05
    entropy_coeff: float = 5e-4
    reward_baseline_decay: float | None = None  # EMA of the reward subtracted (None: off)
    # the curriculum and the queries
    candidates: int = 10  # K cells sampled to pick the next baseline
    proposals: int = 200  # policy samples per round from which the queries are picked
    # the NAC picks a round's k queries from at least choice * k unseen cells (the policy's
    # most probable unseen cells fill up the samples), so it still chooses once the policy
    # has concentrated; 1: only when fewer than k unseen samples remain
    choice: int = 4
    # data exploration
    explore: int = 100  # confident pseudo-labelled pairs added per round (0: off)
    explore_ratio: float = 1.0  # explored pairs per labelled pair in a NAC step

    def __post_init__(self) -> None:
        positive = ("batch", "hidden", "layers", "epochs", "pairs", "policy_steps",
                    "policy_batch", "proposals", "choice")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ctnas.{name} must be >= 1, got {getattr(self, name)}")
        checks = [
            ("initial", self.initial >= 2, ">= 2 (the comparator needs a pair)"),
            ("candidates", self.candidates >= 2, ">= 2 (the baseline is judged by pairs)"),
            ("growth", self.growth >= 0, ">= 0"),
            ("lr", self.lr > 0, "> 0"),
            ("policy_lr", self.policy_lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("entropy_coeff", self.entropy_coeff >= 0, ">= 0"),
            ("explore", self.explore >= 0, ">= 0"),
            ("explore_ratio", self.explore_ratio >= 0, ">= 0"),
            ("reward_baseline_decay", self.reward_baseline_decay is None
             or 0 <= self.reward_baseline_decay < 1, "in [0, 1) or None"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"ctnas.{name} must be {rule}, got {getattr(self, name)!r}")


class EdgePolicy(nn.Module):
    """A categorical distribution over the ops of each edge, independent across edges."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(NUM_EDGES, NUM_OPS))

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, -1)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``(n, 6)`` op indices."""
        with torch.no_grad():
            return torch.multinomial(self.probs(), n, replacement=True, generator=gen).T

    def log_prob(self, cells: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.logits, -1)
        return logp.gather(1, cells.T).sum(0)

    def entropy(self) -> torch.Tensor:
        logp = torch.log_softmax(self.logits, -1)
        return -(logp.exp() * logp).sum()


def codes_of(cells: torch.Tensor) -> torch.Tensor:
    return (cells * _PLACE).sum(-1)


def beats(nac: nn.Module, emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """P(a beats b) for rows of embeddings (b broadcast when it is one row)."""
    return torch.sigmoid(nac.compare(emb_a, emb_b.expand_as(emb_a)))


def policy_learning(policy: EdgePolicy, opt: torch.optim.Optimizer, rewards: torch.Tensor,
                    steps: int, batch: int, entropy_coeff: float, gen: torch.Generator,
                    decay: float | None = None, ema: float | None = None) -> float | None:
    """REINFORCE on ``rewards`` (one per cell code): ``steps`` steps of ``batch`` samples,
    loss = -mean((r - b) log pi(a)) - entropy_coeff * H(pi). ``b`` is 0, or with ``decay``
    the moving average ``ema`` of the batch-mean reward (returned, updated)."""
    for _ in range(steps):
        cells = policy.sample(batch, gen)
        r = rewards[codes_of(cells)]
        advantage = r if decay is None or ema is None else r - ema
        if decay is not None:
            m = float(r.mean())
            ema = m if ema is None else decay * ema + (1 - decay) * m
        loss = -(advantage * policy.log_prob(cells)).mean() - entropy_coeff * policy.entropy()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ema


def curriculum_winner(nac: nn.Module, emb: torch.Tensor) -> int:
    """Index of the row of ``emb`` with the highest mean probability of beating the
    others (the paper's baseline update); the first such row on ties."""
    k = len(emb)
    i, j = torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")
    p = beats(nac, emb[i.reshape(-1)], emb[j.reshape(-1)]).reshape(k, k)
    p.fill_diagonal_(0.0)
    return int(np.argmax(p.sum(1).double().numpy()))


def explore_pairs(nac: nn.Module, emb_all: torch.Tensor, policy: EdgePolicy, n: int,
                  seen: np.ndarray, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Data exploration: 2n cells sampled from the policy, each paired with another of the
    sample; pairs of two different cells, not both queried, labelled by the NAC; the ``n``
    most confident kept. Returns codes ``a``, ``b`` and labels (1.0: a beats b)."""
    a = codes_of(policy.sample(2 * n, gen))
    b = a[torch.randperm(len(a), generator=gen)]
    seen_t = torch.from_numpy(seen)
    keep = (a != b) & ~(seen_t[a] & seen_t[b])
    a, b = a[keep], b[keep]
    p = beats(nac, emb_all[a], emb_all[b])
    top = torch.argsort(-(p - 0.5).abs(), stable=True)[:n]
    return a[top], b[top], (p[top] > 0.5).float()


@register_query_strategy("ctnas")
class Ctnas(QueryStrategy):
    """Rounds of: fit the NAC -> REINFORCE against the baseline cell -> curriculum baseline
    update -> query the policy's proposals the NAC prefers -> explore (module docstring)."""

    Config = CtnasConfig
    config: CtnasConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        query_random(oracle, rng, c.initial)
        gen = torch_generator(rng)
        nac = seeded_model(gen, lambda: Comparator(c.hidden, c.layers))
        nac_opt = torch.optim.Adam(nac.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                   foreach=True)
        policy = EdgePolicy()
        policy_opt = torch.optim.Adam(policy.parameters(), lr=c.policy_lr, betas=(0.5, 0.999))
        baseline = int(codes_of(policy.sample(1, gen))[0])  # uniform initial policy
        explored: list[tuple[torch.Tensor, ...]] = []
        ema = None
        while not oracle.exhausted:
            self.fit_nac(nac, nac_opt, oracle, explored, gen)
            with torch.no_grad():
                emb_all = nac.encoder(*space_graph_tensors())
                rewards = beats(nac, emb_all, emb_all[baseline])
            ema = policy_learning(policy, policy_opt, rewards, c.policy_steps, c.policy_batch,
                                  c.entropy_coeff, gen, c.reward_baseline_decay, ema)
            k = round_size(c.batch, c.growth, oracle)
            with torch.no_grad():
                pick = codes_of(policy.sample(c.candidates, gen))
                baseline = int(pick[curriculum_winner(nac, emb_all[pick])])
                codes = self.proposals(policy, oracle, gen, k)
                scores = beats(nac, emb_all[codes], emb_all[baseline]).double().numpy()
            if query_top(oracle, codes.numpy(), scores, k) == 0:
                break
            if c.explore > 0 and not oracle.exhausted:
                with torch.no_grad():
                    explored.append(explore_pairs(nac, emb_all, policy, c.explore,
                                                  ~unseen_mask(oracle), gen))

    def proposals(self, policy: EdgePolicy, oracle: QueryOracle, gen: torch.Generator,
                  k: int) -> torch.Tensor:
        """Unseen cells among ``proposals`` policy samples, topped up to ``choice * k``
        (when the space has that many) with the most probable unseen cells under the
        policy, for the NAC to pick ``k`` of."""
        unseen = torch.from_numpy(unseen_mask(oracle))
        codes = torch.unique(codes_of(policy.sample(self.config.proposals, gen)))
        codes = codes[unseen[codes]]
        want = self.config.choice * k
        if len(codes) < want:
            with torch.no_grad():
                logp = policy.log_prob(torch.tensor(all_cells_array()))
            free = unseen.clone()
            free[codes] = False
            extra = free.nonzero().squeeze(1)
            order = torch.argsort(-logp[extra], stable=True)[:want - len(codes)]
            codes = torch.cat([codes, extra[order]])
        return codes

    def fit_nac(self, nac: nn.Module, opt: torch.optim.Optimizer, oracle: QueryOracle,
                explored: list[tuple[torch.Tensor, ...]], gen: torch.Generator) -> None:
        """``epochs`` Adam steps of binary cross-entropy on random labelled pairs of
        queried cells, plus ``explore_ratio`` as many random explored pairs."""
        c = self.config
        cells, accs = oracle.data()
        acc = torch.from_numpy(accs)
        labelled = codes_of(torch.from_numpy(cells))
        if explored:
            ea, eb, elab = (torch.cat(t) for t in zip(*explored, strict=True))
            # a pair explored in an earlier round whose two cells have both been queried
            # since: its true order is labelled data now, its pseudo-label may contradict it
            seen = ~torch.from_numpy(unseen_mask(oracle))
            still = ~(seen[ea.long()] & seen[eb.long()])
            ea, eb, elab = ea[still], eb[still], elab[still]
        else:
            ea = eb = elab = torch.zeros(0)
        n_explore = int(c.explore_ratio * c.pairs) if len(ea) else 0
        # every cell a step may touch, encoded once per step: queried first, then explored
        codes, inverse = torch.unique(torch.cat([labelled, ea.long(), eb.long()]),
                                      return_inverse=True)
        graphs = space_graphs(codes.numpy())
        n = len(labelled)
        pos_l, pos_a, pos_b = inverse[:n], inverse[n:n + len(ea)], inverse[n + len(ea):]
        nac.train()
        for _ in range(c.epochs):
            i = torch.randint(n, (c.pairs,), generator=gen)
            j = torch.randint(n, (c.pairs,), generator=gen)
            keep = acc[i] != acc[j]
            i, j = i[keep], j[keep]
            left, right, target = pos_l[i], pos_l[j], (acc[i] > acc[j]).float()
            if n_explore:
                e = torch.randint(len(ea), (n_explore,), generator=gen)
                left = torch.cat([left, pos_a[e]])
                right = torch.cat([right, pos_b[e]])
                target = torch.cat([target, elab[e]])
            if len(target) == 0:
                break  # every queried cell ties and nothing is explored: nothing to learn
            emb = nac.encoder(*graphs)
            loss = nn.functional.binary_cross_entropy_with_logits(
                nac.compare(emb[left], emb[right]), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        nac.eval()
