"""Registry of search strategies."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diffnas.config import from_dict
from diffnas.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from diffnas.arch.params import ArchParams
    from diffnas.strategies.base import SearchStrategy
    from diffnas.strategies.objective import Objective

STRATEGIES: Registry[type] = Registry("strategy")


def register_strategy(name: str) -> Callable[[type], type]:
    """Class decorator: register a strategy class under ``search.strategy.name``. It must
    subclass ``SearchStrategy``, define ``step`` and declare a ``Config`` subclassing
    ``StrategyConfig`` (else a ``TypeError`` naming it)."""
    def deco(cls: type) -> type:
        _check_strategy_class(cls, name)
        cls.name = name
        return STRATEGIES.register(name)(cls)

    return deco


def _check_strategy_class(cls: type, name: str) -> None:
    """Refuse a strategy class that would fail only once a run directory exists."""
    from diffnas.strategies.base import SearchStrategy, StrategyConfig

    what = f"strategy {name!r} ({cls.__module__}.{cls.__qualname__})"
    if not (isinstance(cls, type) and issubclass(cls, SearchStrategy)):
        raise TypeError(f"{what} does not subclass diffnas.strategies.SearchStrategy")
    if cls.step is SearchStrategy.step:
        raise TypeError(f"{what} does not define step(train_batch, val_batch), the update "
                        "it makes each batch (returning a dict of metrics)")
    config = cls.Config
    if not (isinstance(config, type) and issubclass(config, StrategyConfig)):
        raise TypeError(f"{what}: its Config {getattr(config, '__qualname__', config)!r} "
                        "does not subclass StrategyConfig (diffnas.strategies), whose keys "
                        "(w_optim, a_optim, relaxation, penalties, edge_norm) every strategy "
                        "reads")


def strategy_class(section: dict) -> type:
    """The strategy class a ``search.strategy`` section names (``darts`` by default)."""
    return STRATEGIES.get(section.get("name", "darts"))


def strategy_config(section: dict) -> Any:
    """The strategy's config dataclass from a ``search.strategy`` section. A relaxation
    section that names no relaxation sets the strategy's default one
    (``search.strategy.relaxation.tau=5`` on ``gdas`` keeps its ``hard_gumbel``)."""
    section = dict(section)
    cls = STRATEGIES.get(section.pop("name", "darts"))
    relax = section.get("relaxation")
    default = next((f.default_factory for f in dataclasses.fields(cls.Config)
                    if f.name == "relaxation"), dataclasses.MISSING)
    if isinstance(relax, dict) and "name" not in relax and default is not dataclasses.MISSING:
        section["relaxation"] = {**default(), **relax}
    return from_dict(cls.Config, section, f"search.strategy[{cls.name}]")


def check_strategy(section: dict) -> Any:
    """:func:`strategy_config`, plus its relaxation and penalties checked against the
    classes they name (config.validate_components, before a run directory exists)."""
    from diffnas.strategies.base import check_penalties, check_relaxation

    config = strategy_config(section)
    check_relaxation(getattr(config, "relaxation", {"name": "softmax"}))
    check_penalties(getattr(config, "penalties", []))
    return config


def create_strategy(section: dict, supernet: nn.Module, arch_params: ArchParams,
                    objective: Objective, epochs: int) -> SearchStrategy:
    """Build the strategy named by ``section['name']`` over the given parameter sets."""
    cls = strategy_class(section)
    return cls(strategy_config(section), supernet, arch_params, objective, epochs)


def require_data_parallel(section: dict, world_size: int) -> None:
    """Refuse more than one process for a strategy that does not declare
    ``data_parallel`` (not all of its gradients are averaged over ranks)."""
    cls = strategy_class(section)
    if world_size > 1 and not cls.data_parallel:
        raise ValueError(
            f"strategy {cls.name!r} does not run data parallel yet (not all of its gradients "
            "are averaged over ranks; see docs/distributed.md): run it in one process"
        )


def list_strategies() -> list[str]:
    return STRATEGIES.names()
