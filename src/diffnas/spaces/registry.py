"""Registry of search spaces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffnas.config import ConfigError, from_dict
from diffnas.registry import Registry
from diffnas.spaces.base import DataShape, SearchSpace

SPACES: Registry[type[SearchSpace]] = Registry("search space")


def register_space(name: str) -> Callable[[type[SearchSpace]], type[SearchSpace]]:
    """Class decorator: register a search space under ``search.space.name``."""
    def deco(cls: type[SearchSpace]) -> type[SearchSpace]:
        cls.name = name
        return SPACES.register(name)(cls)

    return deco


def space_config(section: dict) -> Any:
    """Validate a config section ``{name: ..., **settings}``; returns the space's config."""
    section = dict(section)
    cls = SPACES.get(section.pop("name", "darts_cnn"))
    return from_dict(cls.Config, section, f"search.space[{cls.name}]")


def network_config(section: dict, network: dict) -> Any:
    """Validate ``retrain.network`` against the ``NetworkConfig`` dataclass of the space
    ``section`` names (the settings its ``build_network`` reads); ``None`` for a space that
    declares no such class (its ``build_network`` alone can check them)."""
    cls = SPACES.get(section.get("name", "darts_cnn"))
    net_cls = getattr(cls, "NetworkConfig", None)
    if net_cls is None:
        return None
    net = from_dict(net_cls, network, "retrain.network")
    if hasattr(net, "check_against"):  # settings that depend on the search space's own
        net.check_against(space_config(section))
    return net


def space_engine(section: dict) -> str:
    """The engine of the space a ``search.space`` section names (``image``,
    ``language_model``, ``graph`` or one a plugin registered: ``engine/engines.py``):
    what decides which search and retraining code runs, for built-in spaces and plugins
    alike."""
    from diffnas.engine.engines import list_engines

    engine = getattr(SPACES.get(section.get("name", "darts_cnn")), "engine", "image")
    if engine not in list_engines():
        raise ConfigError(f"space {section.get('name')!r} declares engine {engine!r}, which "
                          f"is not registered; the engines: {', '.join(list_engines())} "
                          "(engine/engines.py: register_engine)")
    return engine


def create_space(section: dict, shape: DataShape | None = None) -> SearchSpace:
    """Build the space named by ``section['name']`` with its settings."""
    cls = SPACES.get(section.get("name", "darts_cnn"))
    return cls(space_config(section), shape or DataShape())


def list_spaces() -> list[str]:
    return SPACES.names()
