"""Candidate ops of recurrent cells (DARTS RNN space), in their own registry.

A recurrent node computes ``[c, h] = s_prev @ W`` and then ``s = s_prev + sigmoid(c) *
(op(h, s_prev) - s_prev)`` (a highway-gated update). The op is what is searched. Its
factory takes no arguments and the module has the signature ``op(h, s_prev) -> tensor``:

- ``tanh``, ``relu``, ``sigmoid``, ``identity``: activations of ``h`` (``s_prev`` unused);
- ``none``: exactly zero (the supernet skips it, discretization excludes it);
- ``hadamard``: the binary op ``h * s_prev``, the elementwise product of the node's two
  inputs (its transformed input and its raw input), as LSTM/GRU gates multiply a
  transform with a state.

These are not in the CNN op registry: CNN factories have the signature ``(C, stride,
affine)`` and map feature maps to feature maps; recurrent ops combine vectors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffnas.registry import Registry

RnnOpFactory = Callable[[], nn.Module]
RNN_OPS: Registry[RnnOpFactory] = Registry("recurrent op")

#: The DARTS paper's recurrent candidates (in its order, ``none`` first).
DARTS_RNN_OPS = ("none", "tanh", "relu", "sigmoid", "identity")


class RnnOp(nn.Module):
    """Base class: ``forward(h, s_prev)``; ``binary`` says whether ``s_prev`` is used."""

    binary = False

    def forward(self, h: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Activation(RnnOp):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


class Zero(RnnOp):
    def forward(self, h: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


class Hadamard(RnnOp):
    """Elementwise product of the two inputs: ``h * s_prev``."""

    binary = True

    def forward(self, h: torch.Tensor, s_prev: torch.Tensor) -> torch.Tensor:
        return h * s_prev


def register_rnn_op(name: str) -> Callable[[RnnOpFactory], RnnOpFactory]:
    return RNN_OPS.register(name)


register_rnn_op("tanh")(lambda: Activation(torch.tanh))
register_rnn_op("relu")(lambda: Activation(torch.relu))
register_rnn_op("sigmoid")(lambda: Activation(torch.sigmoid))
register_rnn_op("identity")(lambda: Activation(lambda h: h))
register_rnn_op("none")(Zero)
register_rnn_op("hadamard")(Hadamard)


def create_rnn_op(name: str) -> RnnOp:
    """Build recurrent op ``name``; unknown names raise with the list of known ones."""
    return RNN_OPS.get(name)()


def list_rnn_ops() -> list[str]:
    return RNN_OPS.names()
