"""REINFORCE (Williams, 1992) as NAS-Bench-201's baseline: a categorical policy per edge,
reward = validation accuracy / 100, an exponential moving-average baseline.

The first ``initial`` episodes are the seeded random cells every strategy starts with
(:func:`~diffnas.nasbench.strategies.base.query_random`, so a paired comparison shares
them): uniform cells are samples of the initial, uniform policy, so they make one batch
policy-gradient step at that policy, with the batch's mean reward as the baseline. Then
one sampled episode per step, as in the benchmark's code."""

from __future__ import annotations

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
    latency_w: float = -0.07

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

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        logits = np.zeros((NUM_EDGES, NUM_OPS))
        latency = None
        if c.latency_predictor is not None:
            from diffnas.hardware.penalty import cell_latency_fn, mnasnet_reward

            latency = cell_latency_fn(c.latency_predictor)

        def reward_of(cell: Cell, acc: float) -> float:
            if latency is None:
                return acc / 100.0
            return mnasnet_reward(acc / 100.0, latency(cell), c.latency_target_ms, c.latency_w)

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
            rewards = [reward_of(cell, acc) for cell, acc in start]
            baseline = float(np.mean(rewards))
            logits += c.lr * sum((r - baseline) * log_prob_grad(cell, p)
                                 for (cell, _), r in zip(start, rewards, strict=True))
        steps = len(start)
        while not oracle.exhausted and steps < c.max_steps_factor * oracle.budget:
            steps += 1
            p = policy()
            cell = tuple(int(rng.choice(NUM_OPS, p=p[e])) for e in range(NUM_EDGES))
            reward = reward_of(cell, oracle.query(cell))
            advantage = 0.0 if baseline is None else reward - baseline
            baseline = reward if baseline is None else (
                c.baseline_decay * baseline + (1 - c.baseline_decay) * reward)
            logits += c.lr * advantage * log_prob_grad(cell, p)
