"""The search-space interface: what can be chosen, and how to build networks from it."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from diffnas.genotype.genotype import Genotype, GenotypeError


@dataclass(frozen=True)
class EdgeSpec:
    """One searchable edge: candidate ops applied to node ``src``, summed into ``dst``.

    ``label`` is stable across runs (``normal/n2/e0`` = cell type, target node, source).
    """

    label: str
    cell: str
    src: int
    dst: int
    candidates: tuple[str, ...]
    stride: int = 1  # of the edge's ops (2 on a DARTS reduction cell's edges from its inputs)


@dataclass(frozen=True)
class DataShape:
    """What a space needs to know about the data to build networks."""

    in_channels: int = 3
    resolution: int = 32
    num_classes: int = 10


def check_network_ops(ops: Sequence[str], C: int) -> None:
    """Hold a plugin's ops among ``ops`` to the op contract as a retrained cell network of
    ``C`` channels builds them (stages of C, 2C and 4C, affine), before the search: an op
    that fits the search's counts but not the retraining's (a GroupNorm of 8 groups, C=36)
    would otherwise fail once retraining starts. (The search's counts: ``check_edge_ops``.)"""
    from diffnas.config import ConfigError
    from diffnas.ops import check_op_contract

    try:
        for op in ops:
            check_op_contract(op, (C, 2 * C, 4 * C), affine=True)
    except ValueError as exc:
        raise ConfigError(f"retrain.network (C={C}, the retrained network's cells): {exc}"
                          ) from None


class SearchSpace(ABC):
    """A space declares edges and candidate ops, builds the supernet (which receives
    relaxed architecture weights as a forward argument) and fixed networks."""

    name: ClassVar[str]
    Config: ClassVar[type]  # dataclass of this space's settings
    default_discretizer: ClassVar[str] = "darts"
    #: the engine that searches and retrains it (engine/engines.py): "image"
    #: (engine/image.py), "language_model" (engine/lm.py), "graph" (engine/graph.py) or
    #: one a plugin registered; a space subclassing darts_rnn's or gnn's class inherits
    #: their engine
    engine: ClassVar[str] = "image"

    def __init__(self, config: Any, shape: DataShape) -> None:
        self.config = config
        self.shape = shape

    @abstractmethod
    def edges(self) -> list[EdgeSpec]:
        """All searchable edges, in alpha-row order within each cell type."""

    def edge_groups(self) -> dict[str, list[EdgeSpec]]:
        """Edges grouped by cell type (one alpha tensor per group)."""
        groups: dict[str, list[EdgeSpec]] = {}
        for e in self.edges():
            groups.setdefault(e.cell, []).append(e)
        return groups

    @abstractmethod
    def build_supernet(self) -> nn.Module:
        """The over-parameterised network: ``forward(x, arch_weights)``."""

    @abstractmethod
    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        """A fixed network from a genotype (``overrides``: the space's network settings)."""

    def network_settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Every setting ``build_network(**overrides)`` builds with: each one the overrides
        leave unset (None) taken from the space's own config, as ``build_network`` does. So
        ``channels_last`` set in ``search.space`` and the same value set in
        ``retrain.network`` give equal settings (latency records compare these). A space
        without a ``NetworkConfig`` class returns the overrides as given."""
        cls = getattr(self, "NetworkConfig", None)
        if cls is None:
            return dict(overrides)
        from diffnas.config import from_dict

        n = from_dict(cls, dict(overrides), "retrain.network")
        out = {}
        for f in dataclasses.fields(n):
            v = getattr(n, f.name)
            out[f.name] = getattr(self.config, f.name, None) if v is None else v
        return out

    def concat(self, group: str) -> tuple[int, ...]:
        """Nodes whose outputs form the cell output (default: every intermediate node)."""
        return tuple(sorted({e.dst for e in self.edge_groups()[group]}))

    def concat_candidates(self, group: str) -> tuple[int, ...]:
        """Nodes a genotype's concat may list (default: the input and intermediate nodes;
        all have the cell's channels and resolution unless a space says otherwise)."""
        return tuple(range(max(self.concat(group)) + 1))

    def inputs_per_node(self) -> int:
        """How many incoming edges each intermediate node keeps after discretization."""
        return 2

    def validate(self, genotype: Genotype) -> None:
        """Raise :class:`GenotypeError` when ``genotype`` does not fit this space."""
        if genotype.space != self.name:
            raise GenotypeError(f"genotype is for space {genotype.space!r}, not {self.name!r}")
        groups = self.edge_groups()
        names = {c.name for c in genotype.cells}
        if names != set(groups):
            raise GenotypeError(f"genotype cells {sorted(names)} != space cells {sorted(groups)}")
        k = self.inputs_per_node()
        for cell in genotype.cells:
            allowed = {(e.src, e.dst): e.candidates for e in groups[cell.name]}
            nodes = sorted({e.dst for e in groups[cell.name]})
            ends = {e.dst for e in cell.edges}
            if ends and min(ends) != nodes[0]:  # a cell with another number of inputs
                raise GenotypeError(
                    f"cell {cell.name!r}: the genotype's intermediate nodes start at node "
                    f"{min(ends)} ({min(ends)} cell input(s)), the space's at node {nodes[0]} "
                    f"({nodes[0]} input(s)): a cell with another number of inputs")
            if ends and max(ends) > nodes[-1]:  # a genotype of a bigger cell
                raise GenotypeError(
                    f"cell {cell.name!r}: the genotype's edges end at {len(ends)} "
                    f"intermediate node(s), the space has {len(nodes)} (no node "
                    f"{max(ends)}): build the space with the genotype's number of nodes "
                    f"(search.space.nodes={len(ends)})")
            seen: set[tuple[int, int]] = set()
            for e in cell.edges:
                if (e.src, e.dst) not in allowed:
                    raise GenotypeError(
                        f"cell {cell.name!r}: no edge from node {e.src} to node {e.dst} in "
                        f"space {self.name!r}"
                    )
                if e.op not in allowed[(e.src, e.dst)]:
                    raise GenotypeError(
                        f"cell {cell.name!r}: unknown op {e.op!r} on edge {e.src}->{e.dst}; "
                        f"candidates: {', '.join(allowed[(e.src, e.dst)])}"
                    )
                if (e.src, e.dst) in seen:
                    raise GenotypeError(
                        f"cell {cell.name!r}: edge {e.src}->{e.dst} is listed twice"
                    )
                seen.add((e.src, e.dst))
            for n in nodes:
                got = len(cell.inputs_of(n))
                if got == 0 and ends and n > max(ends):  # a genotype of a smaller cell
                    raise GenotypeError(
                        f"cell {cell.name!r}: the genotype's edges end at {len(ends)} "
                        f"intermediate node(s), the space has {len(nodes)} (node {n} has no "
                        f"inputs): build the space with the genotype's number of nodes "
                        f"(search.space.nodes={len(ends)})")
                if got != k:
                    raise GenotypeError(
                        f"cell {cell.name!r}: node {n} has {got} inputs, expected {k}"
                    )
            self._validate_concat(cell.name, cell.concat)

    def _validate_concat(self, group: str, concat: tuple[int, ...]) -> None:
        """Non-empty, no node twice (it would silently widen the output), and only nodes
        the cell can concatenate (:meth:`concat_candidates`)."""
        if not concat:
            raise GenotypeError(f"cell {group!r}: concat is empty; list the nodes whose "
                                "outputs form the cell output")
        twice = sorted(i for i, n in Counter(concat).items() if n > 1)
        if twice:
            raise GenotypeError(f"cell {group!r}: concat lists node(s) {twice} more than once")
        ok = self.concat_candidates(group)
        bad = [i for i in concat if i not in ok]
        if bad:
            raise GenotypeError(
                f"cell {group!r}: concat refers to node(s) {bad} that space {self.name!r} "
                f"cannot concatenate here; allowed: {list(ok)}"
            )
