"""Edge modifiers: mixed-op factories selected by a space's ``mixed_op: {name: ..., ...}``.

``partial_channel`` (PC-DARTS, Xu et al. 2020): only ``C // k`` channels of an edge's input
go through the candidate ops; the other channels bypass them (2x2 max-pooled on stride-2
edges, odd sides rounded up as the ops round them) and the concatenation is
channel-shuffled so the next edge sees other channels.

Edge normalization, the other PC-DARTS modifier, weights the edges entering a node by
``softmax(beta)``. The betas are architecture parameters, so they live in
:class:`~diffnas.arch.params.ArchParams` (``add_edge_betas``), not here: switch it on with
the strategy setting ``edge_norm: true`` (works with every space and relaxation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffnas.ops.savers import is_channels_last
from diffnas.supernet.mixed import MixedOp, MixedOpFactory, default_mixed_op


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal channel groups (ShuffleNet), keeping ``x``'s layout: a
    channels-last input is shuffled in NHWC, so the network after it stays channels-last
    (a plain reshape would return NCHW and slow every later op on CPU)."""
    b, c, h, w = x.shape
    if is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1).view(b, h, w, groups, c // groups)
        return nhwc.transpose(3, 4).reshape(b, h, w, c).permute(0, 3, 1, 2)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class PartialChannelMixedOp(nn.Module):
    """A mixed op on the first ``C // k`` channels; the rest bypass, then shuffle.

    The bypass is scaled by ``weights.sum()``: 1 for a relaxed row (softmax, Gumbel,
    one-hot), so plain PC-DARTS is unchanged, and the edge's weight when edge normalization
    has scaled the row (``ArchParams.normalize``), so the whole edge output is scaled by it,
    bypass included, as in PC-DARTS's ``sum_j beta_j * edge_j(h)``."""

    def __init__(
        self, C: int, stride: int, candidates: Sequence[str], k: int,
        inner: MixedOpFactory = MixedOp,
    ) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or C % k:
            raise ValueError(f"partial_channel k={k} must be >= 1 and divide the channels C={C}")
        self.k = k
        self.mixed = inner(C // k, stride, candidates)
        # ceil_mode: an odd side halves rounding up, as the stride-2 ops do (a floor would
        # leave the bypass one pixel short and the concatenation would fail)
        self.bypass = nn.MaxPool2d(2, 2, ceil_mode=True) if stride == 2 else nn.Identity()

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, active: int | None = None
    ) -> torch.Tensor:
        if self.k == 1:  # every channel goes through the ops: plain DARTS, no bypass
            return self.mixed(x, weights, active)
        c = x.shape[1] // self.k
        out = torch.cat([self.mixed(x[:, :c], weights, active),
                         self.bypass(x[:, c:]) * weights.sum()], dim=1)
        return channel_shuffle(out, self.k)


def _partial_channel(k: int = 4, inner: MixedOpFactory = default_mixed_op) -> MixedOpFactory:
    def factory(C: int, stride: int, candidates: Sequence[str]) -> nn.Module:
        return PartialChannelMixedOp(C, stride, candidates, k, inner)

    return factory


_MODIFIERS = {"partial_channel": _partial_channel, "default": lambda inner: inner}


def check_edge_ops(spec: dict, C: int, ops: Sequence[str]) -> None:
    """Refuse, when the config is read, a ``mixed_op`` setting (unknown name or key, a
    ``k`` that does not divide ``C``: the factory is built, with one edge of ``C``
    channels), and a plugin's op that breaks the op contract at the channel counts the
    search builds it with (:func:`op_channels`, ``ops.check_op_contract``)."""
    from diffnas.config import ConfigError
    from diffnas.ops import check_op_contract

    try:
        channels = op_channels(spec, C)
    except ValueError as exc:
        raise ConfigError(f"search.space.mixed_op: {exc}") from None
    for op in ops:
        check_op_contract(op, channels)
    if not spec:
        return
    try:  # on the meta device, RNG untouched: no memory, no draw that would move the
        # seeded supernet initialisation that follows
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            create_mixed_op_factory(spec)(C, 1, tuple(ops))
    except ValueError as exc:
        raise ConfigError(f"search.space.mixed_op: {exc}") from None


def op_channels(spec: dict, C: int) -> tuple[int, ...]:
    """The channel counts a cell supernet builds its candidate ops with: stages of C, 2C
    and 4C channels (each reduction doubles them) under the edge modifier ``spec``
    (partial channels: a k-th of them). For the op contract check, which then builds a
    plugin's op at the counts the search will (``ops.check_op_contract``)."""
    seen: set[int] = set()

    def record(c: int, stride: int, candidates: Sequence[str]) -> nn.Module:
        seen.add(c)
        return nn.Identity()

    factory = create_mixed_op_factory(spec, inner=record) if spec else record
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        for m in (1, 2, 4):
            factory(C * m, 1, ())
    return tuple(sorted(seen))


def create_mixed_op_factory(
    spec: dict, inner: MixedOpFactory = default_mixed_op
) -> MixedOpFactory:
    """``{"name": "partial_channel", "k": 4}`` -> a factory ``(C, stride, candidates)``;
    ``inner`` is the space's own mixed op, which the modifier wraps."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in _MODIFIERS:
        raise ValueError(f"unknown mixed_op {name!r}; known: {', '.join(sorted(_MODIFIERS))}")
    if "edge_norm" in spec:
        raise ValueError("edge_norm is a strategy setting (its betas are architecture "
                         "parameters): set search.strategy.edge_norm=true")
    try:
        return _MODIFIERS[name](inner=inner, **spec)
    except TypeError:
        raise ValueError(f"mixed_op {name!r}: unknown setting(s) {sorted(spec)}") from None
