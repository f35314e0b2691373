"""Regularized (aging) evolution (Real et al., 2019), as in NAS-Bench-201's baseline.

A population of the ``population`` most recent cells; each cycle samples ``sample_size``
members, mutates the best of them on one edge, queries the child and retires the oldest.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from diffnas.nasbench.encoding import mutate
from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import (
    QueryStrategy,
    QueryStrategyConfig,
    query_random,
    register_query_strategy,
)


@dataclass
class EvolutionConfig(QueryStrategyConfig):
    population: int = 10
    sample_size: int = 3
    max_cycles_factor: int = 50  # give up after this many cycles per query of budget

    def __post_init__(self) -> None:
        if self.population < 1 or self.sample_size < 1:
            raise ValueError(f"rea needs population >= 1 and sample_size >= 1, got "
                             f"{self.population}, {self.sample_size}")
        self.require("rea", [("max_cycles_factor", self.max_cycles_factor >= 1, ">= 1")])


@register_query_strategy("rea")
class RegularizedEvolution(QueryStrategy):
    Config = EvolutionConfig

    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        c = self.config
        population = deque(query_random(oracle, rng, c.population))
        cycles = 0
        while not oracle.exhausted and cycles < c.max_cycles_factor * oracle.budget:
            cycles += 1
            # the tournament draws with replacement (Real et al. 2019, Algorithm 1: a
            # sampled candidate "stays in the population")
            picks = rng.integers(len(population), size=c.sample_size)
            parent = max((population[i] for i in sorted(picks)), key=lambda t: t[1])
            child = mutate(parent[0], rng)
            # A child seen before costs nothing and still ages the population.
            population.append((child, oracle.query(child)))
            if len(population) > c.population:
                population.popleft()
