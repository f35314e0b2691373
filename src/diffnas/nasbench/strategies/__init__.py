"""Query-based search strategies on NAS-Bench-201. Importing registers the built-ins."""

from diffnas.nasbench.strategies import (  # noqa: F401  (registration)
    comparator,
    ctnas,
    evolution,
    gcn,
    nao,
    random_search,
    reinforce,
)
from diffnas.nasbench.strategies.base import (
    QUERY_STRATEGIES,
    QueryStrategy,
    QueryStrategyConfig,
    create_query_strategy,
    list_query_strategies,
    register_query_strategy,
)

__all__ = [
    "QUERY_STRATEGIES", "QueryStrategy", "QueryStrategyConfig", "create_query_strategy",
    "list_query_strategies", "register_query_strategy",
]
