"""REINFORCE (Williams, 1992) as NAS-Bench-201's baseline: a categorical policy per edge,
reward = validation accuracy / 100, an exponential moving-average baseline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    register_query_strategy,
)


@dataclass
class ReinforceConfig(QueryStrategyConfig):
    lr: float = 5.0  # plain gradient ascent on the policy logits (reward = acc / 100)
    baseline_decay: float = 0.9  # b <- decay * b + (1 - decay) * reward
    max_steps_factor: int = 20  # give up after this many samples per query of budget
    # MnasNet reward acc * (latency / target) ** w, latency from a fitted nb201 predictor
    # (diffnas.hardware, docs/latency.md); None = plain accuracy reward
    latency_predictor: str | None = None
    latency_target_ms: float = 1.0
    latency_w: float = -0.07


@register_query_strategy("reinforce")
class Reinforce(QueryStrategy):
    Config = ReinforceConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        logits = np.zeros((NUM_EDGES, NUM_OPS))
        baseline = None
        steps = 0
        latency = None
        if c.latency_predictor is not None:
            from diffnas.hardware.penalty import cell_latency_fn, mnasnet_reward

            latency = cell_latency_fn(c.latency_predictor)
        while not oracle.exhausted and steps < c.max_steps_factor * oracle.budget:
            steps += 1
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            cell = tuple(int(rng.choice(NUM_OPS, p=p[e])) for e in range(NUM_EDGES))
            reward = oracle.query(cell) / 100.0
            if latency is not None:
                reward = mnasnet_reward(reward, latency(cell), c.latency_target_ms, c.latency_w)
            advantage = 0.0 if baseline is None else reward - baseline
            baseline = reward if baseline is None else (
                c.baseline_decay * baseline + (1 - c.baseline_decay) * reward)
            # d log pi(cell) / d logits = onehot(cell) - p, per edge.
            grad = -p
            grad[np.arange(NUM_EDGES), cell] += 1.0
            logits += c.lr * advantage * grad
