"""The DARTS convolutional cell space (Liu et al., 2019): normal and reduction cells with
two input nodes, ``nodes`` intermediate nodes and a mixed op on every edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diffnas.config import require, require_cell_edges, require_sizes
from diffnas.genotype import Genotype
from diffnas.ops import OPS
from diffnas.spaces.base import DataShape, EdgeSpec, SearchSpace, check_network_ops
from diffnas.spaces.registry import register_space
from diffnas.supernet.cell import cell_edges, edge_stride
from diffnas.supernet.mixed import default_mixed_op
from diffnas.supernet.network import DartsNetwork, DartsSuperNet

DARTS_OPS = [
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
]


@dataclass
class DartsCnnConfig:
    C: int = 16  # initial channels of the search supernet
    layers: int = 8  # cells in the search supernet
    nodes: int = 4  # intermediate nodes per cell
    stem_multiplier: int = 3
    ops: list[str] = field(default_factory=lambda: list(DARTS_OPS))
    mixed_op: dict = field(default_factory=dict)  # edge modifier: {"name": ..., **settings}
    # recompute the pool branches of the first N cells in backward (true: all): less memory,
    # more time
    recompute: bool | int = False
    # NHWC tensors: 1.2-1.5x faster steps on CPU (benchmarks/README.md); false: NCHW
    channels_last: bool = True

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in OPS]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown} in space ops; known: {OPS.names()}")
        if not [o for o in self.ops if o != "none"]:
            raise ValueError("darts_cnn ops need at least one op besides 'none' (every edge "
                             "would be empty)")
        # refused here rather than by torch inside the first step, after the run directory
        for key in ("C", "layers", "nodes", "stem_multiplier"):
            value = getattr(self, key)
            require(value >= 1, f"search.space.{key}", ">= 1", value)
        require_cell_edges(self.nodes, lambda n: n * (n + 3) // 2, "n(n+3)/2")
        # reductions sit at layers // 3 and 2 * layers // 3: with 1 or 2 cells every cell
        # reduces, the normal alphas get no gradient and the normal genotype is noise
        require(self.layers >= 3, "search.space.layers",
                ">= 3 (with fewer, every cell is a reduction cell and the normal cell is "
                "never searched)", self.layers)
        recompute = self.recompute
        require(isinstance(recompute, bool) or recompute >= 0, "search.space.recompute",
                "true, false or a number of cells >= 0", recompute)
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        from diffnas.supernet.modifiers import check_edge_ops

        check_edge_ops(self.mixed_op, self.C, self.ops)  # and a plugin's ops (built-ins: tests)


@dataclass
class DartsCnnNetworkConfig:
    """Settings of the fixed (retrain) network; None = the search supernet's value."""

    C: int | None = None
    layers: int | None = None
    auxiliary: bool = False
    stem_multiplier: int | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        require_sizes(self, ("C", "layers", "stem_multiplier"), "retrain.network")

    def check_against(self, space: DartsCnnConfig) -> None:
        """The space's plugin ops fit the retrained network's channel counts."""
        check_network_ops(space.ops, space.C if self.C is None else self.C)


@register_space("darts_cnn")
class DartsCnnSpace(SearchSpace):
    Config = DartsCnnConfig
    NetworkConfig = DartsCnnNetworkConfig

    def __init__(self, config: DartsCnnConfig, shape: DataShape) -> None:
        super().__init__(config, shape)

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)
        return [
            EdgeSpec(f"{cell}/n{dst}/e{src}", cell, src, dst, ops,
                     edge_stride(cell == "reduce", src))
            for cell in ("normal", "reduce")
            for src, dst in cell_edges(self.config.nodes)
        ]

    def concat_candidates(self, group: str) -> tuple[int, ...]:
        """Normal cells may also concatenate their input nodes (preprocessed to ``C``
        channels at the cell's resolution); reduction cells only intermediate nodes, since
        their inputs are not downsampled."""
        if group == "reduce":
            return self.concat(group)
        return super().concat_candidates(group)

    def _mixed_op_factory(self):
        spec = dict(self.config.mixed_op)
        if not spec:
            return default_mixed_op
        from diffnas.supernet.modifiers import create_mixed_op_factory

        return create_mixed_op_factory(spec)

    def build_supernet(self) -> nn.Module:
        c = self.config
        return DartsSuperNet(
            c.C, self.shape.num_classes, c.layers, c.nodes, c.ops,
            in_channels=self.shape.in_channels, stem_multiplier=c.stem_multiplier,
            mixed_op=self._mixed_op_factory(), recompute=c.recompute,
            channels_last=c.channels_last,
        )

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        n = self.network_settings(overrides)
        return DartsNetwork(
            genotype, n["C"], self.shape.num_classes, n["layers"], n["auxiliary"],
            in_channels=self.shape.in_channels, stem_multiplier=n["stem_multiplier"],
            channels_last=n["channels_last"],
        )
