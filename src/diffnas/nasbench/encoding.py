"""Cells as six op indices, and the encodings query-based strategies learn from.

A cell is a tuple of 6 ints in ``0..4`` (indices into ``NB201_OPS``, edges in the official
order). Its *code* is the base-5 number of that tuple (``diffnas.spaces.nb201.cell_code``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from diffnas.spaces.nb201 import NB201_EDGES, NB201_OPS, NUM_CELLS

Cell = tuple[int, ...]
NUM_OPS = len(NB201_OPS)
NUM_EDGES = len(NB201_EDGES)
NONE = NB201_OPS.index("none")


def cell_names(cell: Cell) -> tuple[str, ...]:
    """Op names of a cell of op indices; an index outside ``0..NUM_OPS-1`` (``-1`` marks
    an edge not kept in latency records) is a ``ValueError``, not a wrapped-around op."""
    bad = [i for i in cell if not 0 <= i < NUM_OPS]
    if bad:
        raise ValueError(f"op indices must be in 0..{NUM_OPS - 1}, got {bad} in {tuple(cell)}")
    return tuple(NB201_OPS[i] for i in cell)


def code_of(cell: Cell) -> int:
    code = 0
    for i in cell:
        code = code * NUM_OPS + int(i)
    return code


@lru_cache(maxsize=1)
def all_cells_array() -> np.ndarray:
    """``(15625, 6)`` op indices of every cell, row ``c`` = the cell with code ``c``."""
    codes = np.arange(NUM_CELLS)
    digits = [(codes // NUM_OPS ** (NUM_EDGES - 1 - k)) % NUM_OPS for k in range(NUM_EDGES)]
    out = np.stack(digits, axis=1).astype(np.int64)
    out.setflags(write=False)
    return out


def random_cell(rng: np.random.Generator) -> Cell:
    return tuple(int(i) for i in rng.integers(0, NUM_OPS, NUM_EDGES))


def mutate(cell: Cell, rng: np.random.Generator) -> Cell:
    """Change the op of one random edge to a different op (the REA mutation)."""
    edge = int(rng.integers(NUM_EDGES))
    new = int(rng.integers(NUM_OPS - 1))
    new += new >= cell[edge]  # skip the current op
    out = list(cell)
    out[edge] = new
    return tuple(out)


def one_hot(cells: np.ndarray) -> np.ndarray:
    """``(n, 6)`` op indices -> ``(n, 30)`` one-hot."""
    cells = np.asarray(cells, dtype=np.int64)
    out = np.zeros((len(cells), NUM_EDGES, NUM_OPS), dtype=np.float32)
    np.put_along_axis(out, cells[:, :, None], 1.0, axis=2)
    return out.reshape(len(cells), -1)


# --- the cell as a graph of op nodes --------------------------------------------------------
# Nodes: 0 = cell input, 1..6 = the op of each edge, 7 = cell output. Op node k (edge s->d)
# reads the input (s = 0) or every op node ending in s, and feeds every op node starting at
# d, or the output when d = 3. A ``none`` op node is cut off: it contributes nothing.
NUM_NODES = NUM_EDGES + 2
NODE_FEATURES = NUM_OPS + 2  # one-hot: input, output, 5 ops


@lru_cache(maxsize=1)
def _full_adjacency() -> np.ndarray:
    A = np.zeros((NUM_NODES, NUM_NODES), dtype=np.float32)
    out_node = NUM_NODES - 1
    for k, (s, d) in enumerate(NB201_EDGES, start=1):
        if s == 0:
            A[0, k] = 1
        for j, (_s2, d2) in enumerate(NB201_EDGES, start=1):
            if d2 == s:
                A[j, k] = 1
        if d == max(dd for _, dd in NB201_EDGES):
            A[k, out_node] = 1
    return A


def graph_arrays(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 6)`` op indices -> adjacency ``(n, 8, 8)`` (A[i, j] = 1: edge i -> j) and node
    features ``(n, 8, 7)``."""
    cells = np.asarray(cells, dtype=np.int64)
    n = len(cells)
    A = np.broadcast_to(_full_adjacency(), (n, NUM_NODES, NUM_NODES)).copy()
    dead = np.concatenate(
        [np.zeros((n, 1), bool), cells == NONE, np.zeros((n, 1), bool)], axis=1
    )
    A[dead[:, :, None].repeat(NUM_NODES, 2)] = 0
    A[dead[:, None, :].repeat(NUM_NODES, 1)] = 0
    X = np.zeros((n, NUM_NODES, NODE_FEATURES), dtype=np.float32)
    X[:, 0, 0] = 1
    X[:, -1, 1] = 1
    rows = np.arange(n)[:, None]
    X[rows, np.arange(1, NUM_EDGES + 1)[None, :], 2 + cells] = 1
    return A, X
