"""Genotypes: the discrete architecture a search returns, as plain, frozen data.

A genotype lists, per cell type, the kept edges ``(op, src, dst)`` and the nodes whose
outputs are concatenated. It round-trips through JSON and through text (``str``): the
original DARTS form ``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=[2, 3, 4, 5],
...)`` where that form can say it, a generic ``Genotype(space=..., cells={...})`` otherwise.
Parsing is strict: node numbers are ints, unknown keys and repeated edges are errors.
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


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (``json`` keeps the last: a second
    ``"normal"`` cell would silently replace the first)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise GenotypeError(f"malformed genotype JSON: key(s) {', '.join(map(repr, twice))} "
                            "given twice in one object")
    return dict(pairs)


@dataclass(frozen=True)
class Edge:
    """One kept edge: ``op`` applied to node ``src``, summed into node ``dst``."""

    op: str
    src: int
    dst: int


def cell_title(name: str) -> str:
    """How reports name a cell type: "normal cell", "recurrent cell", and for a space whose
    one cell type is called ``cell`` (gnn), "cell" rather than "cell cell"."""
    return name if name == "cell" or name.endswith(" cell") else f"{name} cell"


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
        """Parse :meth:`to_dict` output strictly: node numbers must be ints (a float or a
        string is a typo, not a node), cells have exactly the keys ``edges`` and ``concat``,
        and an edge ``(src, dst)`` appears once."""
        if not isinstance(d, dict) or set(d) != {"space", "cells"}:
            raise GenotypeError("expected an object with exactly the keys 'space' and 'cells'")
        if not isinstance(d["space"], str) or not isinstance(d["cells"], dict):
            raise GenotypeError("malformed genotype: 'space' must be a string and 'cells' an "
                                "object {cell name: {edges, concat}}")
        cells = []
        for name, c in d["cells"].items():
            if not isinstance(c, dict) or set(c) != {"edges", "concat"}:
                got = sorted(c) if isinstance(c, dict) else type(c).__name__
                raise GenotypeError(f"malformed genotype: cell {name!r} needs exactly the keys "
                                    f"'edges' and 'concat', got {got}")
            edges = []
            for entry in _as_list(c["edges"], f"cell {name!r} edges"):
                if not (isinstance(entry, list | tuple) and len(entry) == 3):
                    raise GenotypeError(f"malformed genotype: cell {name!r}: edge {entry!r} "
                                        "must be [op, src, dst]")
                op, src, dst = entry
                if not isinstance(op, str):
                    raise GenotypeError(f"malformed genotype: cell {name!r}: edge {entry!r}: "
                                        "the op must be a name")
                edges.append(Edge(op, _node(src, name, entry), _node(dst, name, entry)))
            concat = tuple(_node(i, name, "concat")
                           for i in _as_list(c["concat"], f"cell {name!r} concat"))
            cells.append(_checked_cell(str(name), tuple(edges), concat))
        return cls(d["space"], tuple(cells))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise GenotypeError(f"malformed genotype JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the genotype's JSON to ``path`` atomically (an earlier file stays whole
        if writing fails)."""
        from diffnas.engine.checkpoint import atomic_write_text  # (torch: imported late)

        atomic_write_text(self.to_json() + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> Genotype:
        """Read a genotype file: JSON, or ``Genotype(...)`` text (:func:`from_darts_str`)."""
        p = Path(path)
        if not p.is_file():
            raise GenotypeError(f"genotype file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8-sig").strip()  # (a BOM some editors add)
        except UnicodeDecodeError:
            raise GenotypeError(f"{p}: not a genotype file (binary, not text); give a genotype "
                                "JSON file (e.g. RUN/search/genotype.json) or Genotype(...) "
                                "text") from None
        if not text:
            raise GenotypeError(f"{p} is empty, not a genotype file")
        try:
            if text.startswith(("{", "[")):  # JSON (a list is refused by from_dict)
                return cls.from_json(text)
            return from_darts_str(text)
        except GenotypeError as exc:
            raise GenotypeError(f"{p}: {exc}") from exc

    def __str__(self) -> str:
        return to_darts_str(self)


def _as_list(v: Any, what: str) -> list:
    if not isinstance(v, list | tuple):
        raise GenotypeError(f"malformed genotype: {what} must be a list, got {v!r}")
    return list(v)


def _node(v: Any, cell: str, where: Any) -> int:
    """A node number: a real int (``True`` or ``0.9`` would silently become a node)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise GenotypeError(f"malformed genotype: cell {cell!r}: node {v!r} in {where!r} is not "
                            "an integer")
    return v


def _checked_cell(name: str, edges: tuple[Edge, ...], concat: tuple[int, ...]) -> CellGenotype:
    """A parsed cell, refusing an edge ``(src, dst)`` listed twice (it would silently
    count as two inputs of one node)."""
    seen: set[tuple[int, int]] = set()
    for e in edges:
        if (e.src, e.dst) in seen:
            raise GenotypeError(f"cell {name!r}: edge {e.src}->{e.dst} is listed twice "
                                f"(second: {e.op!r})")
        seen.add((e.src, e.dst))
    return CellGenotype(name, edges, concat)


# --- the original DARTS text form ---------------------------------------------------
# CNN genotypes list two (op, input) pairs per intermediate node, nodes numbered from 2;
# recurrent genotypes list one pair per node, numbered from 1.
_DARTS_LAYOUTS = {
    "darts_cnn": {"cells": ("normal", "reduce"), "per_node": 2, "first": 2},
    "darts_rnn": {"cells": ("recurrent",), "per_node": 1, "first": 1},
}


#: the longest ``range(...)`` a genotype text may give as a concat
MAX_RANGE = 1000


def _literal(node: ast.AST) -> Any:
    """Evaluate a literal field value, allowing ``range(...)`` as a concat. Strict like the
    JSON reader: a dict key given twice is refused (``literal_eval`` keeps the last)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
        if node.keywords:
            raise ValueError("range() takes no keyword arguments")
        r = range(*[_literal(a) for a in node.args])
        if len(r) > MAX_RANGE:  # a cell has a handful of nodes; refuse before expanding
            raise ValueError(f"range of {len(r)} nodes in a concat (at most {MAX_RANGE})")
        return list(r)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Dict):
            keys = [ast.literal_eval(k) for k in sub.keys if isinstance(k, ast.Constant)]
            repeated = sorted({repr(k) for k in keys if keys.count(k) > 1})
            if repeated:
                raise GenotypeError(f"key(s) given twice in a dict: {', '.join(repeated)}")
    return ast.literal_eval(node)


def from_darts_str(text: str) -> Genotype:
    """Parse ``Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=[...])``,
    the recurrent form ``Genotype(recurrent=[...], concat=range(1, 9))``, or the generic form
    ``Genotype(space=..., cells={...})`` that :func:`to_darts_str` writes for the rest."""
    try:
        expr = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(expr, ast.Call) and getattr(expr.func, "id", None) == "Genotype"):
            raise GenotypeError("expected a call 'Genotype(...)'")
        if expr.args or any(kw.arg is None for kw in expr.keywords):
            raise GenotypeError("expected named fields only: 'Genotype(normal=..., ...)'")
        names = [kw.arg for kw in expr.keywords]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # Python refuses it too; the last one must not silently win
            raise GenotypeError(f"field(s) given twice: {repeated}")
        kwargs = {kw.arg: _literal(kw.value) for kw in expr.keywords}
    except GenotypeError:
        raise
    except (SyntaxError, ValueError, TypeError, OverflowError) as exc:
        raise GenotypeError(f"malformed DARTS genotype text: {exc}") from exc
    if set(kwargs) == {"space", "cells"}:
        return Genotype.from_dict(kwargs)
    space = "darts_rnn" if "recurrent" in kwargs else "darts_cnn"
    layout = _DARTS_LAYOUTS[space]
    expected = set()
    for name in layout["cells"]:
        expected |= {name, "concat" if space == "darts_rnn" else f"{name}_concat"}
    if set(kwargs) != expected:
        raise GenotypeError(f"DARTS genotype needs fields {sorted(expected)}, got {sorted(kwargs)}")
    cells = []
    for name in layout["cells"]:
        edges = []
        for i, pair in enumerate(_as_list(kwargs[name], f"cell {name!r}")):
            if not (isinstance(pair, list | tuple) and len(pair) == 2
                    and isinstance(pair[0], str)):
                raise GenotypeError(f"cell {name!r}: expected (op, input) pairs, got {pair!r}")
            dst = layout["first"] + i // layout["per_node"]
            edges.append(Edge(pair[0], _node(pair[1], name, pair), dst))
        concat_key = "concat" if space == "darts_rnn" else f"{name}_concat"
        concat = tuple(_node(i, name, concat_key) for i in _as_list(kwargs[concat_key], concat_key))
        cells.append(_checked_cell(name, tuple(edges), concat))
    return Genotype(space, tuple(cells))


def _darts_form(g: Genotype) -> str:
    parts = []
    for c in g.cells:
        pairs = [(e.op, e.src) for e in sorted(c.edges, key=lambda e: e.dst)]
        concat_key = "concat" if g.space == "darts_rnn" else f"{c.name}_concat"
        parts.append(f"{c.name}={pairs!r}, {concat_key}={list(c.concat)!r}")
    return f"Genotype({', '.join(parts)})"


def to_darts_str(g: Genotype) -> str:
    """The original DARTS text form when it says exactly ``g``; otherwise the generic form
    ``Genotype(space=..., cells={...})``. The DARTS form numbers nodes implicitly (from 2
    in CNN cells, from 1 in recurrent ones, a fixed count of inputs per node), so e.g. a
    ``two_input`` recurrent cell (nodes from 2) cannot be written in it; either way the
    text reads back as ``g`` with :func:`from_darts_str`."""
    if g.space in _DARTS_LAYOUTS:
        text = _darts_form(g)
        try:
            if from_darts_str(text) == g:
                return text
        except GenotypeError:
            pass
    return f"Genotype(space={g.space!r}, cells={g.to_dict()['cells']!r})"
