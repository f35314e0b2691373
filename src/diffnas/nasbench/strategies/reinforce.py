"""REINFORCE (Williams, 1992) as NAS-Bench-201's baseline: a categorical policy per edge,
reward = validation accuracy / 100, an exponential moving-average baseline.

The first ``initial`` episodes are the seeded random cells every strategy starts with
(:func:`~diffnas.nasbench.strategies.base.query_random`, so a paired comparison shares
them): uniform cells are samples of the initial, uniform policy, so they make one batch
policy-gradient step at that policy, with the batch's mean reward as the baseline. Then
one sampled episode per step, as in the benchmark's code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, Cell
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    query_random,
    register_query_strategy,
)


@dataclass
class ReinforceConfig(QueryStrategyConfig):
    lr: float = 5.0  # plain gradient ascent on the policy logits (reward = acc / 100)
    baseline_decay: float = 0.9  # b <- decay * b + (1 - decay) * reward
    initial: int = 10  # first episodes: the shared seeded random cells (0: none)
    max_steps_factor: int = 20  # give up after this many samples per query of budget
    # MnasNet reward acc * (latency / target) ** w, latency from a fitted nb201 predictor
    # (diffnas.hardware, docs/latency.md); None = plain accuracy reward. The target is the
    # user's latency budget: required with a predictor (a default 1 ms lay below the
    # fitted latencies of any CPU predictor, so every cell was penalised)
    latency_predictor: str | None = None
    latency_target_ms: float | None = None
    # MnasNet's exponent: one for both sides of the target, or (at or under, above):
    # (0, -1) is the hard constraint
    latency_w: float | tuple[float, float] = -0.07

    def __post_init__(self) -> None:
        if self.initial < 0:
            raise ValueError(f"reinforce needs initial >= 0, got {self.initial}")
        self.require("reinforce", [
            ("lr", self.lr > 0, "> 0"),
            ("baseline_decay", 0 <= self.baseline_decay < 1, "in [0, 1)"),
            ("max_steps_factor", self.max_steps_factor >= 1, ">= 1"),
            ("latency_target_ms", self.latency_target_ms is None
             or self.latency_target_ms > 0, "> 0")])
        if self.latency_predictor is not None and self.latency_target_ms is None:
            raise ValueError("reinforce.latency_predictor needs reinforce.latency_target_ms, "
                             "your latency budget in ms (choose it within the fitted "
                             "latencies: latency_ms_range in the predictor's .json report)")


@register_query_strategy("reinforce")
class Reinforce(QueryStrategy):
    Config = ReinforceConfig

    def __init__(self, config: ReinforceConfig) -> None:
        super().__init__(config)
        self._latency: Callable[[Cell], float] | None = None  # the predictor, loaded once

    def latency(self) -> Callable[[Cell], float] | None:
        """The predicted latency of a cell (ms), or None without a latency predictor."""
        if self.config.latency_predictor is not None and self._latency is None:
            from diffnas.hardware.penalty import cell_latency_fn

            self._latency = cell_latency_fn(self.config.latency_predictor)
        return self._latency

    def reward(self, cell: Cell, acc: float) -> float:
        """What the policy ascends: ``acc / 100``, or with a latency predictor the MnasNet
        reward ``acc / 100 * (latency / target) ** w``."""
        c, latency = self.config, self.latency()
        if latency is None:
            return acc / 100.0
        from diffnas.hardware.penalty import mnasnet_reward

        return mnasnet_reward(acc / 100.0, latency(cell), c.latency_target_ms, c.latency_w)

    def choose(self, oracle: QueryOracle) -> tuple[Cell, float]:
        """With a latency predictor, the queried cell of the highest reward (first found on
        ties): the objective searched, where the most accurate cell may be several times
        over the latency target."""
        if self.latency() is None:
            return super().choose(oracle)
        return max(oracle.history, key=lambda item: self.reward(*item))

    def describe_choice(self, cell: Cell) -> dict[str, float]:
        latency = self.latency()
        return {} if latency is None else {"predicted_latency_ms": float(latency(cell))}

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        logits = np.zeros((NUM_EDGES, NUM_OPS))

        def policy() -> np.ndarray:
            p = np.exp(logits - logits.max(1, keepdims=True))
            return p / p.sum(1, keepdims=True)

        def log_prob_grad(cell: Cell, p: np.ndarray) -> np.ndarray:
            # d log pi(cell) / d logits = onehot(cell) - p, per edge.
            grad = -p
            grad[np.arange(NUM_EDGES), cell] += 1.0
            return grad

        start = query_random(oracle, rng, c.initial)
        baseline = None
        if start:
            p = policy()
            rewards = [self.reward(cell, acc) for cell, acc in start]
            baseline = float(np.mean(rewards))
            logits += c.lr * sum((r - baseline) * log_prob_grad(cell, p)
                                 for (cell, _), r in zip(start, rewards, strict=True))
        steps = len(start)
        while not oracle.exhausted and steps < c.max_steps_factor * oracle.budget:
            steps += 1
            p = policy()
            cell = tuple(int(rng.choice(NUM_OPS, p=p[e])) for e in range(NUM_EDGES))
            reward = self.reward(cell, oracle.query(cell))
            advantage = 0.0 if baseline is None else reward - baseline
            baseline = reward if baseline is None else (
                c.baseline_decay * baseline + (1 - c.baseline_decay) * reward)
            logits += c.lr * advantage * log_prob_grad(cell, p)
