"""DARTS convolutional networks: the search supernet and the fixed (retrain) network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.genotype import Genotype
from diffnas.ops.savers import stem_channels_last
from diffnas.supernet.cell import FixedCell, SearchCell
from diffnas.supernet.mixed import MixedOp, MixedOpFactory, default_mixed_op

if TYPE_CHECKING:  # a runtime import would cycle: arch -> spaces -> supernet
    from diffnas.arch.relax import ArchWeights


def reduction_layers(layers: int) -> set[int]:
    """Reduction cells sit at 1/3 and 2/3 of the depth."""
    return {layers // 3, 2 * layers // 3}


def stem(in_channels: int, C: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))


class DartsSuperNet(nn.Module):
    """Stem, stacked search cells, global pooling and a classifier. Holds no architecture
    parameters: ``forward(x, arch_weights)`` receives the relaxed weights.

    ``channels_last`` runs the network on NHWC tensors: the supernet is mostly depthwise
    convolutions, pools and BN on few channels, which run several times faster in that
    layout (benchmarks/README.md has the figures). The result is the same up to rounding.

    ``recompute`` has the mixed edges of the first ``recompute`` cells (``True``: all)
    recompute their pool branches in backward instead of keeping those activations
    (``MixedOp``). The first cells hold the largest activations and recompute them with the
    fewest, largest kernels, so a few leading cells buy most of the memory for little time
    (benchmarks/README.md has the trade measured).
    """

    def __init__(
        self, C: int, num_classes: int, layers: int, nodes: int, candidates: Sequence[str],
        in_channels: int = 3, stem_multiplier: int = 3,
        mixed_op: MixedOpFactory = default_mixed_op, channels_last: bool = True,
        recompute: bool | int = False,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        C_curr = stem_multiplier * C
        self.stem = stem(in_channels, C_curr)
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr *= 2
            cell = SearchCell(nodes, C_pp, C_p, C_curr, reduction, reduction_prev, candidates,
                              mixed_op)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, nodes * C_curr
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self.recompute = recompute

    @property
    def recompute(self) -> int:
        """How many leading cells recompute activations in backward (0: none)."""
        return self._recompute

    @recompute.setter
    def recompute(self, value: bool | int) -> None:
        if isinstance(value, bool):
            value = len(self.cells) if value else 0
        if not isinstance(value, int) or value < 0:
            raise ValueError(
                f"recompute must be true, false or a number of cells >= 0; got {value!r}"
            )
        self._recompute = min(value, len(self.cells))
        for i, cell in enumerate(self.cells):
            for m in cell.modules():
                if isinstance(m, MixedOp):
                    m.recompute = i < self._recompute

    def forward(self, x: torch.Tensor, arch_weights: ArchWeights) -> torch.Tensor:
        s0 = s1 = stem_channels_last(self.stem, x) if self.channels_last else self.stem(x)
        for cell in self.cells:
            group = "reduce" if cell.reduction else "normal"
            active = None if arch_weights.active is None else arch_weights.active[group]
            s0, s1 = s1, cell(s0, s1, arch_weights[group], active)
        return self.classifier(self.pool(s1).flatten(1))


class AuxPool(nn.Module):
    """Pools the auxiliary head's input to 2x2: on 8x8 maps (CIFAR at 2/3 depth) with the
    paper's overlapping 5x5 window at stride 3, on other sizes adaptively (the paper's
    window does not give 2x2 there). No parameters, so either way the head's are the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (8, 8):
            return F.avg_pool2d(x, 5, stride=3, padding=0, count_include_pad=False)
        return F.adaptive_avg_pool2d(x, 2)


class AuxiliaryHead(nn.Module):
    """The DARTS auxiliary classifier at 2/3 depth: ReLU, pool to 2x2 (:class:`AuxPool`),
    1x1 conv to 128, 2x2 conv to 768, linear."""

    def __init__(self, C: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            AuxPool(),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class DartsNetwork(nn.Module):
    """A fixed network from a genotype. In training mode with an auxiliary head it returns
    ``(logits, aux_logits)``; otherwise logits. ``drop_path_prob`` is set by a schedule.
    ``channels_last``: run on NHWC tensors, as the supernet does (a CPU training step is
    1.2-1.5x faster; benchmarks/README.md)."""

    def __init__(
        self, genotype: Genotype, C: int, num_classes: int, layers: int, auxiliary: bool,
        in_channels: int = 3, stem_multiplier: int = 3, channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.drop_path_prob = 0.0
        self.channels_last = channels_last
        C_curr = stem_multiplier * C
        self.stem = stem(in_channels, C_curr)
        C_pp, C_p, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        self.aux_position = 2 * layers // 3
        self.auxiliary_head = None
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr *= 2
            cell_g = genotype.cell("reduce" if reduction else "normal")
            cell = FixedCell(cell_g, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if auxiliary and i == self.aux_position:
                self.auxiliary_head = AuxiliaryHead(C_p, num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        aux = None
        s0 = s1 = stem_channels_last(self.stem, x) if self.channels_last else self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.pool(s1).flatten(1))
        return logits if aux is None else (logits, aux)
