"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020).

One cell type (group ``cell``) with 4 nodes and 6 edges; every edge keeps exactly one of
``none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3`` and the cell output is
node 3, so a genotype is 6 ops: 5**6 = 15,625 cells. The discretizer is ``argmax`` (the
benchmark keeps every edge, ``none`` included).

Conversions: :func:`genotype_to_str` / :func:`str_to_genotype` for the official string
``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``, :func:`genotype_to_ops` / :func:`ops_to_genotype`
for the 6-op tuple, and :func:`cell_code` / :func:`code_to_cell` for a base-5 code in
``0..15624`` (a canonical enumeration, *not* the benchmark's index: that order is arbitrary
and comes from the results table, see ``diffnas.nasbench``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diffnas.config import require, require_sizes
from diffnas.genotype import CellGenotype, Edge, Genotype, GenotypeError
from diffnas.ops import OPS
from diffnas.spaces.base import DataShape, EdgeSpec, SearchSpace, check_network_ops
from diffnas.spaces.registry import register_space
from diffnas.supernet.nb201 import NB201_NODES, Nb201Network, Nb201SuperNet, nb201_edges

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
NB201_EDGES = tuple(nb201_edges())  # ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
NUM_CELLS = len(NB201_OPS) ** len(NB201_EDGES)
SPACE_NAME = "nb201"
GROUP = "cell"


@dataclass
class Nb201Config:
    C: int = 16  # channels of the first stage (then 2C, 4C)
    N: int = 5  # cells per stage
    ops: list[str] = field(default_factory=lambda: list(NB201_OPS))
    # edge modifier, e.g. {name: partial_channel, k: 2}
    mixed_op: dict = field(default_factory=dict)
    # NHWC tensors: 1.3-1.5x faster search steps on CPU (benchmarks/README.md); false: NCHW
    channels_last: bool = True

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown} in nb201 ops; known: {OPS.names()}")
        if not self.ops or all(o == "none" for o in self.ops):
            raise ValueError("nb201 ops need at least one op besides 'none'")
        for key in ("C", "N"):
            require(getattr(self, key) >= 1, f"search.space.{key}", ">= 1", getattr(self, key))
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        from diffnas.supernet.modifiers import check_edge_ops

        check_edge_ops(self.mixed_op, self.C, self.ops)  # and a plugin's ops (built-ins: tests)


@dataclass
class Nb201NetworkConfig:
    """Settings of the fixed network; None = the search space's value."""

    C: int | None = None
    N: int | None = None
    auxiliary: bool = False  # accepted so retrain configs work; nb201 has no auxiliary head
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        require_sizes(self, ("C", "N"), "retrain.network")
        if self.auxiliary:
            raise ValueError(
                "nb201 networks have no auxiliary head: set retrain.auxiliary_weight=0"
            )

    def check_against(self, space: Nb201Config) -> None:
        """The space's plugin ops fit the retrained network's channel counts."""
        check_network_ops(space.ops, space.C if self.C is None else self.C)


@register_space(SPACE_NAME)
class Nb201Space(SearchSpace):
    Config = Nb201Config
    NetworkConfig = Nb201NetworkConfig
    default_discretizer = "argmax"

    def __init__(self, config: Nb201Config, shape: DataShape) -> None:
        super().__init__(config, shape)

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)
        return [
            EdgeSpec(f"{GROUP}/n{dst}/e{src}", GROUP, src, dst, ops) for src, dst in NB201_EDGES
        ]

    def concat(self, group: str) -> tuple[int, ...]:
        return (NB201_NODES - 1,)

    def inputs_per_node(self) -> int:
        # Node j keeps all its j inputs, so a top-k rule (the "darts" discretizer) has no
        # meaning here: say so instead of deriving a genotype that does not fit.
        raise ValueError("nb201 nodes keep all their inputs: use the 'argmax' discretizer "
                         "(search.discretizer: argmax or null)")

    def validate(self, genotype: Genotype) -> None:
        """One op per edge, each from the space's candidates; output node 3."""
        if genotype.space != self.name:
            raise GenotypeError(f"genotype is for space {genotype.space!r}, not {self.name!r}")
        names = [c.name for c in genotype.cells]
        if names != [GROUP]:
            raise GenotypeError(f"nb201 genotype needs exactly one cell {GROUP!r}, got {names}")
        cell = genotype.cells[0]
        seen = [(e.src, e.dst) for e in cell.edges]
        if sorted(seen) != sorted(NB201_EDGES):
            raise GenotypeError(
                f"nb201 cell needs each edge {list(NB201_EDGES)} exactly once, got {seen}"
            )
        for e in cell.edges:
            if e.op not in self.config.ops:
                raise GenotypeError(
                    f"unknown op {e.op!r} on edge {e.src}->{e.dst}; candidates: "
                    f"{', '.join(self.config.ops)}"
                )
        if tuple(cell.concat) != self.concat(GROUP):
            raise GenotypeError(
                f"nb201 cell output must be node 3 (concat (3,)), got {cell.concat}"
            )

    def build_supernet(self) -> nn.Module:
        c = self.config
        mixed_op = None
        if c.mixed_op:
            from diffnas.supernet.modifiers import create_mixed_op_factory
            from diffnas.supernet.nb201 import Nb201MixedOp

            mixed_op = create_mixed_op_factory(c.mixed_op, inner=Nb201MixedOp)
        return Nb201SuperNet(
            c.C, c.N, c.ops, self.shape.num_classes, self.shape.in_channels, GROUP, mixed_op,
            channels_last=c.channels_last,
        )

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = self.network_settings(overrides)
        return Nb201Network(genotype.cell(GROUP), n["C"], n["N"], self.shape.num_classes,
                            self.shape.in_channels, n["channels_last"])


# --- conversions --------------------------------------------------------------------------
def ops_to_genotype(ops: tuple[str, ...] | list[str]) -> Genotype:
    """Six op names, in the official edge order, -> genotype."""
    if len(ops) != len(NB201_EDGES):
        raise GenotypeError(f"an nb201 cell has {len(NB201_EDGES)} edges, got {len(ops)} ops")
    for op in ops:
        if op not in NB201_OPS:
            raise GenotypeError(f"unknown nb201 op {op!r}; ops: {', '.join(NB201_OPS)}")
    edges = tuple(Edge(op, src, dst) for op, (src, dst) in zip(ops, NB201_EDGES, strict=True))
    return Genotype(SPACE_NAME, (CellGenotype(GROUP, edges, (NB201_NODES - 1,)),))


def genotype_to_ops(genotype: Genotype) -> tuple[str, ...]:
    """Genotype -> six op names in the official edge order (validated)."""
    if genotype.space != SPACE_NAME:
        raise GenotypeError(f"genotype is for space {genotype.space!r}, not {SPACE_NAME!r}")
    cell = genotype.cell(GROUP)
    by_edge = {(e.src, e.dst): e.op for e in cell.edges}
    if len(cell.edges) != len(NB201_EDGES) or set(by_edge) != set(NB201_EDGES):
        raise GenotypeError(f"nb201 cell needs each edge {list(NB201_EDGES)} exactly once")
    ops = tuple(by_edge[e] for e in NB201_EDGES)
    ops_to_genotype(ops)  # checks op names
    return ops


def ops_to_str(ops: tuple[str, ...] | list[str]) -> str:
    """Six op names -> the official string ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``."""
    if len(ops) != len(NB201_EDGES):
        raise GenotypeError(f"an nb201 cell has {len(NB201_EDGES)} edges, got {len(ops)} ops")
    nodes = []
    for dst in range(1, NB201_NODES):
        nodes.append("|" + "|".join(f"{ops[k]}~{s}" for k, (s, d) in enumerate(NB201_EDGES)
                                    if d == dst) + "|")
    return "+".join(nodes)


def str_to_ops(text: str) -> tuple[str, ...]:
    """The official string -> six op names (strict: every node lists its inputs in order)."""
    parts = text.strip().split("+")
    if len(parts) != NB201_NODES - 1:
        raise GenotypeError(f"nb201 string needs {NB201_NODES - 1} '+'-separated nodes: {text!r}")
    ops: list[str] = []
    for dst, part in enumerate(parts, start=1):
        if not (part.startswith("|") and part.endswith("|")):
            raise GenotypeError(f"node {dst} of {text!r} must look like |op~0|...|")
        items = part[1:-1].split("|")
        if len(items) != dst:
            raise GenotypeError(f"node {dst} of {text!r} needs {dst} inputs, got {len(items)}")
        for src, item in enumerate(items):
            op, sep, idx = item.rpartition("~")
            if not sep or idx != str(src):
                raise GenotypeError(f"node {dst} of {text!r}: expected 'op~{src}', got {item!r}")
            if op not in NB201_OPS:
                raise GenotypeError(f"unknown nb201 op {op!r} in {text!r}; known: "
                                    f"{', '.join(NB201_OPS)}")
            ops.append(op)
    # The string lists node by node, which is exactly NB201_EDGES order.
    return tuple(ops)


def genotype_to_str(genotype: Genotype) -> str:
    return ops_to_str(genotype_to_ops(genotype))


def str_to_genotype(text: str) -> Genotype:
    return ops_to_genotype(str_to_ops(text))


def cell_code(ops: tuple[str, ...] | list[str]) -> int:
    """Base-5 code of a cell (edge 0 most significant): a canonical 0..15624 enumeration."""
    code = 0
    for op in ops:
        code = code * len(NB201_OPS) + NB201_OPS.index(op)
    return code


def code_to_cell(code: int) -> tuple[str, ...]:
    if not 0 <= code < NUM_CELLS:
        raise GenotypeError(f"nb201 cell code must be in 0..{NUM_CELLS - 1}, got {code}")
    ops = []
    for _ in NB201_EDGES:
        code, r = divmod(code, len(NB201_OPS))
        ops.append(NB201_OPS[r])
    return tuple(reversed(ops))


def all_cells() -> list[tuple[str, ...]]:
    """Every cell of the space, in code order."""
    return [code_to_cell(i) for i in range(NUM_CELLS)]
