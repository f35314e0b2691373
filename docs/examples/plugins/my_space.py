"""An image space plugin (docs/extending.md, "A space"): a chain of mixed ops, one per
layer, ``search.space: {name: chain, C: 8, layers: 3, ops: [...]}``."""

from dataclasses import dataclass, field

import torch
from torch import nn

from diffnas.config import require_sizes
from diffnas.ops import check_op_contract, create_op
from diffnas.spaces import EdgeSpec, SearchSpace, register_space
from diffnas.supernet.mixed import MixedOp


@dataclass
class ChainConfig:  # search.space's keys (but name)
    C: int = 8
    layers: int = 3
    ops: list[str] = field(default_factory=lambda: ["skip_connect", "sep_conv_3x3",
                                                    "max_pool_3x3"])

    def __post_init__(self) -> None:  # when the config is read, before a run directory
        require_sizes(self, ("C", "layers"), "search.space")  # ints >= 1
        for op in self.ops:
            check_op_contract(op)  # an unknown name lists the known ones


@dataclass
class ChainNetworkConfig:  # retrain.network's keys; None = the search's value. No
    C: int | None = None   # `auxiliary` key: runs must set retrain.auxiliary_weight=0

    def __post_init__(self) -> None:
        require_sizes(self, ("C",), "retrain.network")


def stem(in_channels: int, C: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False),
                         nn.BatchNorm2d(C))


class ChainSupernet(nn.Module):
    def __init__(self, C, layers, ops, in_channels, classes):
        super().__init__()
        self.stem = stem(in_channels, C)
        self.mixed = nn.ModuleList(MixedOp(C, 1, ops) for _ in range(layers))
        self.classifier = nn.Linear(C, classes)

    def forward(self, x, arch_weights):  # relaxed weights: an argument, not a parameter
        h, w = self.stem(x), arch_weights["chain"]
        for i, mixed in enumerate(self.mixed):
            h = mixed(h, w[i])
        return self.classifier(h.mean((2, 3)))


class ChainNet(nn.Module):
    def __init__(self, ops, C, in_channels, classes):
        super().__init__()
        self.stem = stem(in_channels, C)
        self.ops = nn.ModuleList(create_op(op, C, 1, affine=True) for op in ops)
        self.classifier = nn.Linear(C, classes)  # export reads classifier.weight
        self.drop_path_prob = 0.0  # retrain.drop_path's schedule sets it every epoch

    def forward(self, x):
        h = self.stem(x)
        for op in self.ops:
            out = op(h)
            if self.training and self.drop_path_prob > 0:  # drop the layer per sample
                keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop_path_prob
                out = out * keep / (1 - self.drop_path_prob)
            h = h + out
        return self.classifier(h.mean((2, 3)))


@register_space("chain")
class ChainSpace(SearchSpace):
    Config = ChainConfig
    NetworkConfig = ChainNetworkConfig

    def edges(self):  # node i-1 -> node i, in alpha-row order
        ops = tuple(self.config.ops)
        return [EdgeSpec(f"chain/n{i}/e{i - 1}", "chain", i - 1, i, ops)
                for i in range(1, self.config.layers + 1)]

    def concat(self, group):
        return (self.config.layers,)

    def inputs_per_node(self):
        return 1

    def build_supernet(self):
        s = self.shape
        return ChainSupernet(self.config.C, self.config.layers, self.config.ops,
                             s.in_channels, s.num_classes)

    def build_network(self, genotype, **overrides):
        self.validate(genotype)
        n = self.network_settings(overrides)
        ops = [e.op for e in sorted(genotype.cells[0].edges, key=lambda e: e.dst)]
        return ChainNet(ops, n["C"], self.shape.in_channels, self.shape.num_classes)
