"""The interface of query-based search strategies and what they share.

A strategy spends an :class:`~diffnas.nasbench.oracle.QueryOracle`'s budget; the runner
then takes the queried cell with the best validation accuracy. Strategies see only the
oracle (validation accuracy), never the benchmark table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffnas.config import from_dict
from diffnas.nasbench.encoding import (
    NUM_EDGES,
    NUM_OPS,
    Cell,
    all_cells_array,
    code_of,
    random_cell,
)
from diffnas.nasbench.oracle import QueryOracle
from diffnas.registry import Registry


@dataclass
class QueryStrategyConfig:
    def require(self, strategy: str, checks: list[tuple[str, bool, str]]) -> None:
        """Raise for the first ``(setting, ok, rule)`` that is not ok, naming it (a
        setting out of range would otherwise fail after queries were spent, or be quietly
        read as something else)."""
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{strategy}.{name} must be {rule}, got "
                                 f"{getattr(self, name)!r}")


class QueryStrategy(ABC):
    """``search(oracle, rng)`` queries cells until the budget is spent (or it gives up)."""

    Config: ClassVar[type] = QueryStrategyConfig
    name: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        self.config = config

    @abstractmethod
    def search(self, oracle: QueryOracle, rng: np.random.Generator) -> None:
        """Query cells through ``oracle``; ``rng`` is the only source of randomness
        (torch-based strategies seed their generators from it)."""

    def choose(self, oracle: QueryOracle) -> tuple[Cell, float]:
        """The queried cell the search reports, with its validation accuracy: the most
        accurate by default; a strategy that searched another objective (REINFORCE with a
        latency-aware reward) reports the best by that objective."""
        return oracle.best()

    def describe_choice(self, cell: Cell) -> dict[str, float]:
        """Figures of the reported cell for its outcome beyond the table's (none by
        default; a latency-aware search: its predicted latency)."""
        return {}


QUERY_STRATEGIES: Registry[type[QueryStrategy]] = Registry("query strategy")


def register_query_strategy(name: str) -> Callable[[type[QueryStrategy]], type[QueryStrategy]]:
    """Class decorator: register a query strategy under ``name``."""
    def deco(cls: type[QueryStrategy]) -> type[QueryStrategy]:
        cls.name = name
        return QUERY_STRATEGIES.register(name)(cls)

    return deco


def create_query_strategy(name: str, settings: dict | None = None) -> QueryStrategy:
    cls = QUERY_STRATEGIES.get(name)
    return cls(from_dict(cls.Config, settings or {}, f"strategy[{name}]"))


def list_query_strategies() -> list[str]:
    return QUERY_STRATEGIES.names()


# --- shared helpers -------------------------------------------------------------------------
def query_random(oracle: QueryOracle, rng: np.random.Generator, n: int,
                 max_tries: int = 100_000) -> list[tuple[Cell, float]]:
    """Query up to ``n`` new uniformly random cells. Every strategy starts with this, so
    with one seed all strategies share their first random cells (a paired comparison).
    Cells are drawn until an unseen one comes up; when ``max_tries`` draws were not enough
    (few cells left unseen), the rest come in random order from the unseen ones."""
    out = []
    tries = 0
    while len(out) < n and not oracle.exhausted and tries < max_tries:
        tries += 1
        cell = random_cell(rng)
        if not oracle.seen(cell):
            out.append((cell, oracle.query(cell)))
    if len(out) < n and not oracle.exhausted:
        cells = all_cells_array()
        for code in rng.permutation(np.flatnonzero(unseen_mask(oracle))):
            if len(out) >= n or oracle.exhausted:
                break
            cell = tuple(int(i) for i in cells[code])
            out.append((cell, oracle.query(cell)))
    return out


def unseen_mask(oracle: QueryOracle) -> np.ndarray:
    mask = np.ones(len(all_cells_array()), dtype=bool)
    mask[oracle.seen_codes()] = False
    return mask


def candidate_pool(oracle: QueryOracle, rng: np.random.Generator, size: int,
                   neighbours_of: int) -> np.ndarray:
    """Codes of unseen cells to rank: every one-edge mutation of the ``neighbours_of``
    best queried cells, plus ``size`` uniformly random unseen cells (``size <= 0``: every
    unseen cell of the space). Sorted, without duplicates."""
    unseen = unseen_mask(oracle)
    if size <= 0 or size >= unseen.sum():
        return np.flatnonzero(unseen)
    picked = rng.choice(np.flatnonzero(unseen), size=size, replace=False)
    near = []
    cells, accs = oracle.data()
    for cell in cells[np.argsort(-accs, kind="stable")[:neighbours_of]]:
        for e in range(NUM_EDGES):
            for op in range(NUM_OPS):
                if op != cell[e]:
                    m = cell.copy()
                    m[e] = op
                    near.append(code_of(tuple(m)))
    pool = np.union1d(picked, np.array(near, dtype=np.int64))
    return pool[unseen[pool]]


def query_top(oracle: QueryOracle, codes: np.ndarray, scores: np.ndarray, k: int) -> int:
    """Query the ``k`` cells of ``codes`` with the highest ``scores`` (higher is better;
    ties by lower code), skipping seen ones. Returns how many were queried."""
    codes = np.asarray(codes, dtype=np.int64)
    order = np.lexsort((codes, -np.asarray(scores, dtype=np.float64)))
    cells = all_cells_array()
    done = 0
    for code in codes[order]:
        if done >= k or oracle.exhausted:
            break
        cell = tuple(int(i) for i in cells[code])
        if not oracle.seen(cell):
            oracle.query(cell)
            done += 1
    return done


def round_size(batch: int, growth: float, oracle: QueryOracle) -> int:
    """Cells to query in the next round: ``batch``, or ``growth`` times the cells queried
    so far when larger (fewer refits at large budgets)."""
    return max(batch, int(growth * oracle.used))


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def seeded_model(gen: torch.Generator, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a predictor whose initial weights depend only on ``gen`` (the run's seed),
    leaving torch's global RNG untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return build()


def standardize(y: np.ndarray) -> np.ndarray:
    return (y - y.mean()) / (y.std() + 1e-8)
