"""The DARTS recurrent cell space (Liu et al., 2019) for language modelling.

One cell type, ``recurrent``: the input node (or, with ``backbone: two_input``, the two
input nodes ``x_t`` and ``h_{t-1}``), ``nodes`` intermediate nodes, and a mixed edge from
every earlier node to every intermediate node over the candidate ops (``none``, ``tanh``,
``relu``, ``sigmoid``, ``identity``; ``hadamard`` on request). After search each node
keeps its single strongest non-``none`` (predecessor, op) pair. ``DataShape.num_classes``
is the vocabulary size.

Growth (``growth.mode: grow_prune``): the supernet starts with ``growth.init_nodes``
active nodes and gains one, function-preservingly, at each epoch of ``growth.grow_epochs``
(see :mod:`diffnas.supernet.rnn` and :class:`diffnas.engine.lm.GrowthSchedule`); the
alphas of all ``nodes`` exist from the start so the parameter sets never change shape.
``prune`` (the default) is plain DARTS: every node from the start, pruned at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from diffnas.config import from_dict, require, require_cell_edges, require_sizes
from diffnas.genotype import Genotype, GenotypeError
from diffnas.ops.rnn import DARTS_RNN_OPS, RNN_OPS
from diffnas.spaces.base import DataShape, EdgeSpec, SearchSpace
from diffnas.spaces.registry import register_space
from diffnas.supernet.rnn import (
    BACKBONES,
    Dropouts,
    FixedCell,
    RnnNetwork,
    RnnSuperNet,
    SearchCell,
)

if TYPE_CHECKING:
    from diffnas.strategies.objective import Objective


GROWTH_MODES = ("prune", "grow_prune")


@dataclass
class GrowthConfig:
    mode: str = "prune"  # "prune": all nodes from the start; "grow_prune": grow, then prune
    init_nodes: int = 2  # grow_prune: active nodes at the start
    grow_epochs: list[int] = field(default_factory=list)  # one new node at each epoch start
    fade_steps: int = 50  # steps over which a new node's output weight rises from 0 to 1


@dataclass
class DartsRnnConfig:
    ninp: int = 300  # embedding size (search: 300 in the paper)
    nhid: int = 300  # hidden size (= ninp: the decoder is tied to the embedding)
    nodes: int = 8  # intermediate nodes
    ops: list[str] = field(default_factory=lambda: list(DARTS_RNN_OPS))
    backbone: str = "single"  # "single" (gated initial node) or "two_input" (x_t, h_{t-1})
    dropout: float = 0.75  # output (locked) dropout
    dropouth: float = 0.25  # on h_{t-1} and node states inside the cell (variational)
    dropoutx: float = 0.75  # on x_t inside the cell (variational)
    dropouti: float = 0.2  # on the embeddings (locked)
    dropoute: float = 0.0  # embedding dropout (whole words); 0 in search, 0.1 in eval
    weight_drop: float = 0.0  # DropConnect on the recurrent matrices (0 in DARTS)
    growth: GrowthConfig = field(default_factory=GrowthConfig)

    def __post_init__(self) -> None:
        require_sizes(self, ("ninp", "nhid", "nodes"), "search.space")
        if self.backbone == "single":  # the cell's inputs: x_t alone, or x_t and h_{t-1}
            require_cell_edges(self.nodes, lambda n: n * (n + 1) // 2, "n(n+1)/2")
        else:
            require_cell_edges(self.nodes, lambda n: n * (n + 3) // 2, "n(n+3)/2")
        require(self.ninp == self.nhid, "search.space.ninp", "equal to search.space.nhid (the "
                "decoder is tied to the embedding, as in DARTS)", self.ninp)
        unknown = [o for o in self.ops if o not in RNN_OPS]
        if unknown:
            raise ValueError(f"unknown recurrent op(s) {unknown}; known: {RNN_OPS.names()}")
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        require(any(o != "none" for o in self.ops), "search.space.ops",
                "a list with an op other than 'none'", self.ops)
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; use one of {BACKBONES}")
        g = self.growth
        if g.mode not in GROWTH_MODES:
            raise ValueError(f"unknown growth mode {g.mode!r}; use one of {GROWTH_MODES}")
        if g.mode == "grow_prune":
            if not 1 <= g.init_nodes <= self.nodes:
                raise ValueError(f"growth.init_nodes must be in 1..{self.nodes}")
            if len(g.grow_epochs) != self.nodes - g.init_nodes:
                raise ValueError(
                    f"growth.grow_epochs must list {self.nodes - g.init_nodes} epochs (one per "
                    f"node from init_nodes={g.init_nodes} to nodes={self.nodes}), "
                    f"got {g.grow_epochs}")
            if sorted(g.grow_epochs) != list(g.grow_epochs) or min(g.grow_epochs, default=1) < 1:
                raise ValueError("growth.grow_epochs must be increasing epochs >= 1")
        else:  # growth settings without the mode that reads them would be plain DARTS
            default = GrowthConfig()
            given = [f"{k}={getattr(g, k)}" for k in ("init_nodes", "grow_epochs", "fade_steps")
                     if getattr(g, k) != getattr(default, k)]
            if given:
                raise ValueError(f"growth.{', growth.'.join(given)} set with growth.mode="
                                 f"{g.mode!r}, which grows nothing (every node from the "
                                 "start): add growth.mode: grow_prune, or drop them")
        if g.fade_steps < 1:
            raise ValueError("growth.fade_steps must be >= 1")
        self.dropouts()  # range checks

    def dropouts(self) -> Dropouts:
        return Dropouts(self.dropout, self.dropouth, self.dropoutx, self.dropouti,
                        self.dropoute, self.weight_drop)


@dataclass
class DartsRnnNetworkConfig:
    """The evaluation network (``retrain.network``); None = the search value."""

    ninp: int | None = None
    nhid: int | None = None
    dropout: float | None = None
    dropouth: float | None = None
    dropoutx: float | None = None
    dropouti: float | None = None
    dropoute: float | None = None
    weight_drop: float | None = None

    def check_against(self, space: DartsRnnConfig) -> None:
        """The widths resolved against the search space's (None = the search value) are
        equal: the decoder is tied to the embedding."""
        ninp = space.ninp if self.ninp is None else self.ninp
        nhid = space.nhid if self.nhid is None else self.nhid
        require(ninp == nhid, "retrain.network.ninp", f"equal to nhid ({nhid}; the decoder is "
                "tied to the embedding; null takes the search value)", ninp)

    def __post_init__(self) -> None:
        require_sizes(self, ("ninp", "nhid"), "retrain.network")
        for key in ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute", "weight_drop"):
            p = getattr(self, key)
            require(p is None or 0 <= p < 1, f"retrain.network.{key}", "in [0, 1)", p)


@register_space("darts_rnn")
class DartsRnnSpace(SearchSpace):
    engine = "language_model"
    Config = DartsRnnConfig
    NetworkConfig = DartsRnnNetworkConfig

    def __init__(self, config: DartsRnnConfig, shape: DataShape) -> None:
        super().__init__(config, shape)

    @property
    def num_inputs(self) -> int:
        return 1 if self.config.backbone == "single" else 2

    def edges(self) -> list[EdgeSpec]:
        ops, k = tuple(self.config.ops), self.num_inputs
        return [
            EdgeSpec(f"recurrent/n{dst}/e{src}", "recurrent", src, dst, ops)
            for dst in range(k, k + self.config.nodes)
            for src in range(dst)
        ]

    def inputs_per_node(self) -> int:
        return 1

    def validate(self, genotype: Genotype) -> None:
        """As every space, and no ``none`` edge: a node's one input is its only state, so
        a fixed recurrent cell cannot build one (refused here, before a run directory); a
        genotype of the other backbone names the setting that fits it."""
        firsts = {min(e.dst for e in c.edges) for c in genotype.cells if c.edges}
        fits = {1: "single", 2: "two_input"}
        if genotype.space == self.name and firsts and firsts != {self.num_inputs} and \
                len(firsts) == 1 and min(firsts) in fits:
            raise GenotypeError(
                f"the genotype's recurrent cell has {min(firsts)} input node(s) (backbone "
                f"{fits[min(firsts)]}), the space's backbone={self.config.backbone!r} has "
                f"{self.num_inputs}: build the space with search.space.backbone="
                f"{fits[min(firsts)]}")
        super().validate(genotype)
        for cell in genotype.cells:
            dead = [f"{e.src}->{e.dst}" for e in cell.edges if e.op == "none"]
            if dead:
                raise GenotypeError(f"cell {cell.name!r}: edge(s) {', '.join(dead)} use op "
                                    "'none'; a recurrent node's single input needs a real op")

    def objective(self) -> Objective:
        from diffnas.engine.lm import LanguageModelObjective

        return LanguageModelObjective()

    def build_supernet(self) -> nn.Module:
        c = self.config
        init = c.growth.init_nodes if c.growth.mode == "grow_prune" else None
        cell = SearchCell(c.ninp, c.nhid, c.nodes, c.ops, c.dropouts(), c.backbone, init)
        return RnnSuperNet(cell, self.shape.num_classes, c.dropouts())

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = from_dict(DartsRnnNetworkConfig, overrides, "retrain.network")
        c = self.config
        n.check_against(c)

        def pick(name: str, search: Any) -> Any:
            v = getattr(n, name)
            return search if v is None else v

        d = Dropouts(pick("dropout", c.dropout), pick("dropouth", c.dropouth),
                     pick("dropoutx", c.dropoutx), pick("dropouti", c.dropouti),
                     pick("dropoute", c.dropoute), pick("weight_drop", c.weight_drop))
        ninp, nhid = pick("ninp", c.ninp), pick("nhid", c.nhid)
        cell = FixedCell(genotype, ninp, nhid, d, c.backbone)
        return RnnNetwork(cell, self.shape.num_classes, d)
