"""The query oracle: the only view of the benchmark a query-based search gets.

It answers the search metric (validation accuracy, ``c10valid_valid_200``) of a cell and
counts the budget: each *distinct* cell revealed costs one query (a real search would have
trained it once; asking again is free). Test accuracies are read by the runner only after
the search has returned (see :mod:`diffnas.nasbench.runner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from diffnas.nasbench.encoding import NUM_EDGES, NUM_OPS, Cell, code_of


class BudgetExhausted(RuntimeError):
    """Raised when a strategy asks about a new cell after the budget is spent."""


class QueryOracle:
    """Validation accuracy of cells, with a query budget and the history of answers."""

    def __init__(self, lookup: Callable[[Cell], float], budget: int) -> None:
        if budget < 1:
            raise ValueError(f"the query budget must be >= 1, got {budget}")
        self._lookup = lookup
        self.budget = budget
        self._answers: dict[Cell, float] = {}
        self.history: list[tuple[Cell, float]] = []  # distinct cells, in query order

    @property
    def used(self) -> int:
        return len(self.history)

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0

    def seen(self, cell: Cell) -> bool:
        return tuple(cell) in self._answers

    def seen_codes(self) -> np.ndarray:
        return np.array([code_of(c) for c, _ in self.history], dtype=np.int64)

    def query(self, cell: Cell) -> float:
        """Validation accuracy (percent) of ``cell``; a new cell costs one query."""
        cell = tuple(int(i) for i in cell)
        if len(cell) != NUM_EDGES or not all(0 <= i < NUM_OPS for i in cell):
            # (a -1 would read as another cell's op and be charged as a new cell)
            raise ValueError(f"cell {cell}: expected {NUM_EDGES} op indices in 0..{NUM_OPS - 1}")
        if cell in self._answers:
            return self._answers[cell]
        if self.exhausted:
            raise BudgetExhausted(f"query budget of {self.budget} cells is spent")
        acc = float(self._lookup(cell))
        if not math.isfinite(acc):  # best() would keep a NaN first answer for good
            raise ValueError(f"cell {cell}: the benchmark answered {acc} (not a number); "
                             "check the table's validation column")
        self._answers[cell] = acc
        self.history.append((cell, acc))
        return acc

    def best(self) -> tuple[Cell, float]:
        """The queried cell with the highest validation accuracy (first found on ties)."""
        if not self.history:
            raise RuntimeError("no cell has been queried")
        best = self.history[0]
        for item in self.history[1:]:
            if item[1] > best[1]:
                best = item
        return best

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """``(n, 6)`` op indices and ``(n,)`` accuracies of every queried cell."""
        cells = np.array([c for c, _ in self.history], dtype=np.int64).reshape(-1, 6)
        accs = np.array([a for _, a in self.history], dtype=np.float64)
        return cells, accs
