"""Random search: uniformly random distinct cells until the budget is spent."""

from __future__ import annotations

import numpy as np

from diffnas.nasbench.oracle import QueryOracle
from diffnas.nasbench.strategies.base import QueryStrategy, query_random, register_query_strategy


@register_query_strategy("random")
class RandomSearch(QueryStrategy):
    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        query_random(oracle, rng, oracle.remaining)
