"""Search strategies. Importing this package registers the built-in strategies."""

from diffnas.strategies import (  # noqa: F401  (registration)
    darts,
    few_shot,
    gdas,
    implicit,
    mean_shift,
    random_labels,
    single_level,
    snas,
    zero_order,
)
from diffnas.strategies.base import SearchStrategy, StrategyConfig
from diffnas.strategies.objective import ClassificationObjective, Objective
from diffnas.strategies.registry import (
    STRATEGIES,
    create_strategy,
    list_strategies,
    register_strategy,
    require_data_parallel,
    strategy_class,
    strategy_config,
)

__all__ = [
    "STRATEGIES",
    "ClassificationObjective",
    "Objective",
    "SearchStrategy",
    "StrategyConfig",
    "create_strategy",
    "list_strategies",
    "register_strategy",
    "require_data_parallel",
    "strategy_class",
    "strategy_config",
]
