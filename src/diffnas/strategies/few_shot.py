"""Few-shot NAS (Zhao et al., 2021): split the one-shot supernet on the ops of chosen
edges into sub-supernets.

For ``split_epoch`` epochs the strategy trains the one-shot supernet (DARTS first order).
It then makes one sub-supernet per combination of ops on the ``split_edges``: each is a
copy of the trained supernet and its alphas whose split edges are fixed to their op (the
relaxed weight row is one-hot and constant), and each is fine-tuned by DARTS first order.
Sub-supernets take the batches in turn (round robin), so the total cost stays that of one
supernet. After every epoch the sub-supernet with the lowest mean validation loss is
exported: its alphas (split rows made near one-hot at the fixed op) and weights are copied
into this strategy's, so the run's genotype is the best across sub-supernets (see
:meth:`FewShotStrategy.export` for a winning ``none``).
"""

from __future__ import annotations

import collections
import copy
import itertools
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights, Relaxation
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.darts import DartsConfig, DartsStrategy
from diffnas.strategies.hypergrad import first_order
from diffnas.strategies.registry import register_strategy

log = logging.getLogger("diffnas")


class FixedOpRelaxation(Relaxation):
    """Wraps a relaxation; rows ``fixed[group][row] = op`` become a constant one-hot."""

    def __init__(self, inner: Relaxation, fixed: dict[str, dict[int, int]]) -> None:
        self.inner = inner
        self.fixed = fixed
        self.stochastic = inner.stochastic
        self.hard = inner.hard

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        aw = self.inner(logits)
        weights = dict(aw.weights)
        active = None if aw.active is None else {g: a.clone() for g, a in aw.active.items()}
        for g, rows in self.fixed.items():
            w = weights[g].clone()
            for row, op in rows.items():
                w[row] = torch.nn.functional.one_hot(
                    torch.tensor(op), w.shape[-1]).to(w)
                if active is not None:
                    active[g][row] = op
            weights[g] = w
        return ArchWeights(weights, active)

    def fixed_noise(self):
        return self.inner.fixed_noise()

    def set_epochs(self, epochs: int) -> None:
        self.inner.set_epochs(epochs)

    def end_epoch(self) -> None:
        self.inner.end_epoch()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


#: validation batches (the epoch's last) every sub-supernet is scored on at an epoch's end
SCORE_BATCHES = 4


@dataclass
class FewShotConfig(StrategyConfig):
    split_edges: list[str] = field(default_factory=list)  # edge labels; []: the first edge
    split_epoch: int | None = None  # one-shot epochs before the split; None: epochs // 2
    max_subnets: int = 64  # guard against an explosion of op combinations


@register_strategy("few_shot")
class FewShotStrategy(SearchStrategy):
    Config = FewShotConfig
    # the one-shot phase and the sub-supernets (DARTS first order) average their gradients;
    # the choice of the best sub-supernet averages the validation losses
    data_parallel = True

    @staticmethod
    def _split_rows(config: FewShotConfig, arch_params: ArchParams) -> list[tuple[str, int]]:
        """(group, row) of each edge to split, refusing unknown edges."""
        labels = {e.label: (g, i) for g, es in arch_params.edges.items()
                  for i, e in enumerate(es)}
        chosen = config.split_edges or [next(iter(labels))]
        unknown = [lb for lb in chosen if lb not in labels]
        if unknown:
            raise ValueError(f"few_shot split_edges {unknown} are not edges of the space; "
                             f"edges: {', '.join(labels)}")
        repeated = sorted({lb for lb in chosen if chosen.count(lb) > 1})
        if repeated:  # each copy would multiply the sub-supernets by the op count again
            raise ValueError(f"few_shot split_edges names {repeated} more than once")
        return [labels[lb] for lb in chosen]

    @staticmethod
    def _split_epoch(config: FewShotConfig, epochs: int) -> int:
        return config.split_epoch if config.split_epoch is not None else epochs // 2

    @classmethod
    def check_setup(cls, config: FewShotConfig, arch_params: ArchParams, epochs: int) -> None:
        rows = cls._split_rows(config, arch_params)
        n = math.prod(len(arch_params.candidates(g)) for g, _ in rows)
        if n > config.max_subnets:
            raise ValueError(f"few_shot would make {n} sub-supernets (> max_subnets="
                             f"{config.max_subnets}); split fewer edges")
        split_at = cls._split_epoch(config, epochs)
        if config.split_epoch is None and epochs < 2:
            raise ValueError(f"few_shot needs search.epochs >= 2 (one-shot epochs, then the "
                             f"sub-supernets'; split_epoch defaults to epochs // 2), got "
                             f"{epochs}")
        if not 1 <= split_at < epochs:
            raise ValueError(f"few_shot split_epoch must be in [1, epochs), got {split_at} "
                             f"with epochs={epochs}")

    def __init__(self, config: FewShotConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)  # check_setup first
        self.split_rows = self._split_rows(config, self.arch_params)
        self.split_at = self._split_epoch(config, self.epochs)
        self.epoch = 0
        self.turn = 0
        self.subnets: list[DartsStrategy] = []
        self.fixed: list[dict[str, dict[int, int]]] = []
        self.val_loss: list[list[float]] = []
        # the epoch's last validation batches, on which every sub-supernet is scored at
        # its end (a batch a turn saw is not one the others saw); epoch ends are where
        # checkpoints are taken, so nothing held here needs saving
        self.held: collections.deque = collections.deque(maxlen=SCORE_BATCHES)

    def supernets(self) -> list[torch.nn.Module]:
        """The supernet (exported into each epoch) and, after the split, the sub-supernets."""
        return [self.supernet, *(sub.supernet for sub in self.subnets)]

    def weight_optimizers(self) -> list[torch.optim.Optimizer]:
        """The one-shot optimizer and, after the split, the sub-supernets' (which step)."""
        return [self.w_optimizer, *(sub.w_optimizer for sub in self.subnets)]

    def combos(self) -> list[dict[str, dict[int, int]]]:
        """One ``{group: {row: op}}`` per sub-supernet."""
        ranges = [range(len(self.arch_params.candidates(g))) for g, _ in self.split_rows]
        out = []
        for ops in itertools.product(*ranges):
            fixed: dict[str, dict[int, int]] = {}
            for (g, row), op in zip(self.split_rows, ops, strict=True):
                fixed.setdefault(g, {})[row] = op
            out.append(fixed)
        return out

    def split(self) -> None:
        """Make the sub-supernets from the current (trained) supernet and alphas."""
        c = self.config
        cfg = DartsConfig(w_optim=copy.deepcopy(c.w_optim), a_optim=copy.deepcopy(c.a_optim),
                          relaxation=dict(c.relaxation), edge_norm=c.edge_norm, order=1,
                          penalties=copy.deepcopy(c.penalties))
        self.subnets, self.fixed = [], self.combos()
        for fixed in self.fixed:
            sub = DartsStrategy(cfg, copy.deepcopy(self.supernet),
                                copy.deepcopy(self.arch_params), self.objective, self.epochs)
            # the one-shot schedules go on: the cosine learning rate and a temperature anneal
            # over the whole run instead of restarting at the split
            sub.w_scheduler.load_state_dict(self.w_scheduler.state_dict())
            for group in sub.w_optimizer.param_groups:
                group["lr"] = self.lr
            sub.relaxation = FixedOpRelaxation(copy.deepcopy(self.relaxation), fixed)
            self.subnets.append(sub)
        self.val_loss = [[] for _ in self.subnets]

    @property
    def lr(self) -> float:
        return self.subnets[0].lr if self.subnets else super().lr

    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        if val_batch is None:
            raise ValueError("few_shot needs a validation batch (bilevel search)")
        if not self.subnets:  # one-shot phase: DARTS first order
            self.a_optimizer.zero_grad(set_to_none=True)
            with self.relaxation.fixed_noise():
                grads, val_stats = first_order(self, train_batch, val_batch)
            self.set_alpha_grads(grads)
            self.a_optimizer.step()
            stats = self.weight_step(train_batch, self.arch_weights())
            stats.update({f"val_{k}": v for k, v in val_stats.items()})
            return stats
        i = self.turn % len(self.subnets)
        self.turn += 1
        stats = self.subnets[i].step(train_batch, val_batch)
        self.val_loss[i].append(stats["val_loss"])
        if getattr(val_batch, "state", None) is None:  # (a stream's state is not reusable)
            self.held.append(val_batch)
        return stats

    @torch.no_grad()
    def scores(self) -> list[float]:
        """Each sub-supernet's mean validation loss on the same batches: the epoch's last
        ``SCORE_BATCHES`` (RNG and BN running statistics untouched). Every sub-supernet
        starts from the same random state, so a stochastic relaxation (Gumbel) compares
        them under the same noise. Without held batches, the losses of each one's own
        turns (a sub-supernet with no turn this epoch: inf)."""
        if not self.held:
            return [sum(v) / len(v) if v else math.inf for v in self.val_loss]
        device = self.alphas()[0].device
        cuda = device.type == "cuda"
        buffers = [{n: b.clone() for n, b in sub.supernet.named_buffers()}
                   for sub in self.subnets]
        out = []
        try:  # measuring changes neither the RNG nor BN's running statistics
            with torch.random.fork_rng(devices=[device] if cuda else []):
                cpu_state = torch.get_rng_state()
                cuda_state = torch.cuda.get_rng_state(device) if cuda else None
                for sub in self.subnets:  # common random numbers
                    torch.set_rng_state(cpu_state)
                    if cuda_state is not None:
                        torch.cuda.set_rng_state(cuda_state, device)
                    out.append(sum(float(sub.loss(b, sub.arch_weights())[0])
                                   for b in self.held) / len(self.held))
            return out
        finally:
            for sub, saved in zip(self.subnets, buffers, strict=True):
                for n, b in sub.supernet.named_buffers():
                    b.copy_(saved[n])

    def best(self) -> int:
        """The sub-supernet with the lowest validation loss on the epoch's last batches
        (:meth:`scores`; averaged over data-parallel ranks, so every rank picks the
        same)."""
        local = torch.tensor(self.scores(), dtype=torch.float64, device=self.alphas()[0].device)
        means = self.mean_over_ranks(local).tolist()
        return min(range(len(means)), key=lambda i: (means[i], i))

    def export(self, i: int) -> None:
        """Copy sub-supernet ``i`` (alphas, weights) into self, its fixed ops made dominant.

        A fixed row keeps the sub-supernet's logits (those of the one-shot phase, shrunk a
        little by Adam's weight decay: a constant one-hot row gets a zero gradient) and its
        fixed op is raised 10 above them, so the
        relaxed weight is near one-hot while the other ops keep their ranking. That ranking
        matters when the fixed op is ``none``: the DARTS rule never picks ``none`` and may
        still have to keep the edge (a node with only k inputs), and then it takes the op
        the one-shot phase ranked first, not an arbitrary one; where the node has more
        inputs the edge's tiny weight drops it, as the winning sub-supernet has it."""
        sub = self.subnets[i]
        self.arch_params.load_state_dict(sub.arch_params.state_dict())
        self.supernet.load_state_dict(sub.supernet.state_dict())
        with torch.no_grad():
            for g, rows in self.fixed[i].items():
                for row, op in rows.items():
                    logits = self.arch_params[g][row]
                    logits[op] = logits.max() + 10.0

    def describe(self, i: int) -> str:
        """Sub-supernet ``i``'s fixed ops, by edge label: ``normal/n2/e0=sep_conv_3x3``."""
        return ", ".join(f"{self.arch_params.edges[g][row].label}="
                         f"{self.arch_params.candidates(g)[op]}"
                         for g, rows in self.fixed[i].items() for row, op in rows.items())

    def end_epoch(self) -> None:
        self.epoch += 1
        if not self.subnets:
            super().end_epoch()
            if self.epoch == self.split_at:
                self.split()
            return
        with warnings.catch_warnings():  # a sub-supernet may not have stepped this epoch
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for sub in self.subnets:
                sub.end_epoch()
        self.relaxation.end_epoch()  # the exported alphas are measured at the subs' temperature
        best = self.best()
        self.export(best)
        log.info("few_shot: sub-supernet %d of %d (%s) had the lowest validation loss; its "
                 "alphas and weights are the search's now", best + 1, len(self.subnets),
                 self.describe(best))
        self.val_loss = [[] for _ in self.subnets]
        self.held.clear()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "turn": self.turn,
                "val_loss": self.val_loss, "subnets": [s.state_dict() for s in self.subnets]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self.turn = state["epoch"], state["turn"]
        self.subnets = []
        if state["subnets"]:
            self.split()
            for sub, s in zip(self.subnets, state["subnets"], strict=True):
                sub.load_state_dict(s)
        self.val_loss = [list(v) for v in state["val_loss"]]
