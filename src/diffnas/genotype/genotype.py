"""Genotypes: the discrete architecture a search returns, as plain, frozen data.

A genotype lists, per cell type, the kept edges ``(op, src, dst)`` and the nodes whose
outputs are concatenated. It round-trips through JSON and reads the original DARTS text
form ``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5], ...)``.
Whether a genotype fits a space is checked by the space (``SearchSpace.validate``).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class GenotypeError(ValueError):
    """A genotype is malformed or does not fit its space."""


@dataclass(frozen=True)
class Edge:
    """One kept edge: ``op`` applied to node ``src``, summed into node ``dst``."""

    op: str
    src: int
    dst: int


@dataclass(frozen=True)
class CellGenotype:
    name: str
    edges: tuple[Edge, ...]
    concat: tuple[int, ...]

    def inputs_of(self, dst: int) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.dst == dst)

    @property
    def nodes(self) -> tuple[int, ...]:
        """Intermediate nodes in increasing order."""
        return tuple(sorted({e.dst for e in self.edges}))


@dataclass(frozen=True)
class Genotype:
    space: str
    cells: tuple[CellGenotype, ...]

    def cell(self, name: str) -> CellGenotype:
        for c in self.cells:
            if c.name == name:
                return c
        raise GenotypeError(f"genotype has no cell {name!r}; it has {[c.name for c in self.cells]}")

    def count_op(self, op: str, cell: str | None = None) -> int:
        cells = self.cells if cell is None else (self.cell(cell),)
        return sum(e.op == op for c in cells for e in c.edges)

    # --- JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "cells": {
                c.name: {
                    "edges": [[e.op, e.src, e.dst] for e in c.edges],
                    "concat": list(c.concat),
                }
                for c in self.cells
            },
        }

    @classmethod
    def from_dict(cls, d: Any) -> Genotype:
        try:
            if not isinstance(d, dict) or set(d) != {"space", "cells"}:
                raise GenotypeError("expected an object with exactly the keys 'space' and 'cells'")
            cells = []
            for name, c in d["cells"].items():
                edges = tuple(Edge(str(op), int(src), int(dst)) for op, src, dst in c["edges"])
                cells.append(CellGenotype(str(name), edges, tuple(int(i) for i in c["concat"])))
            return cls(str(d["space"]), tuple(cells))
        except GenotypeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GenotypeError(f"malformed genotype: {exc!r}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GenotypeError(f"malformed genotype JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        """Read a genotype file: JSON, or the original DARTS ``Genotype(...)`` text."""
        p = Path(path)
        if not p.is_file():
            raise GenotypeError(f"genotype file not found: {p}")
        text = p.read_text().strip()
        try:
            if text.startswith("{"):
                return cls.from_json(text)
            return from_darts_str(text)
        except GenotypeError as exc:
            raise GenotypeError(f"{p}: {exc}") from exc

    def __str__(self) -> str:
        return to_darts_str(self)


# --- the original DARTS text form ---------------------------------------------------
# CNN genotypes list two (op, input) pairs per intermediate node, nodes numbered from 2;
# recurrent genotypes list one pair per node, numbered from 1.
_DARTS_LAYOUTS = {
    "darts_cnn": {"cells": ("normal", "reduce"), "per_node": 2, "first": 2},
    "darts_rnn": {"cells": ("recurrent",), "per_node": 1, "first": 1},
}


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
        return list(range(*[_literal(a) for a in node.args]))
    return ast.literal_eval(node)


def from_darts_str(text: str) -> Genotype:
    """Parse ``Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=[...])``
    or the recurrent form ``Genotype(recurrent=[...], concat=range(1, 9))``."""
    try:
        expr = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(expr, ast.Call) and getattr(expr.func, "id", None) == "Genotype"):
            raise GenotypeError("expected a call 'Genotype(...)'")
        kwargs = {kw.arg: _literal(kw.value) for kw in expr.keywords}
    except GenotypeError:
        raise
    except (SyntaxError, ValueError) as exc:
        raise GenotypeError(f"malformed DARTS genotype text: {exc}") from exc
    space = "darts_rnn" if "recurrent" in kwargs else "darts_cnn"
    layout = _DARTS_LAYOUTS[space]
    expected = set()
    for name in layout["cells"]:
        expected |= {name, "concat" if space == "darts_rnn" else f"{name}_concat"}
    if set(kwargs) != expected:
        raise GenotypeError(f"DARTS genotype needs fields {sorted(expected)}, got {sorted(kwargs)}")
    cells = []
    for name in layout["cells"]:
        pairs = kwargs[name]
        concat = kwargs["concat" if space == "darts_rnn" else f"{name}_concat"]
        try:
            edges = tuple(
                Edge(str(op), int(src), layout["first"] + i // layout["per_node"])
                for i, (op, src) in enumerate(pairs)
            )
        except (TypeError, ValueError) as exc:
            raise GenotypeError(f"cell {name!r}: expected (op, input) pairs: {exc}") from exc
        cells.append(CellGenotype(name, edges, tuple(int(i) for i in concat)))
    return Genotype(space, tuple(cells))


def to_darts_str(g: Genotype) -> str:
    """Write a genotype in the original DARTS text form when its space has one."""
    if g.space not in _DARTS_LAYOUTS:
        return f"Genotype(space={g.space!r}, cells={g.to_dict()['cells']!r})"
    parts = []
    for c in g.cells:
        pairs = [(e.op, e.src) for e in sorted(c.edges, key=lambda e: e.dst)]
        concat_key = "concat" if g.space == "darts_rnn" else f"{c.name}_concat"
        parts.append(f"{c.name}={pairs!r}, {concat_key}={list(c.concat)!r}")
    return f"Genotype({', '.join(parts)})"
