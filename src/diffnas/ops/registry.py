"""Registry of candidate operations, keyed by the names papers and genotypes use.

An op factory has the signature ``(C, stride, affine) -> nn.Module``: it maps C channels
to C channels (halving the resolution at stride 2). BatchNorm inside ops follows
``affine``; search-time networks pass ``affine=False`` as DARTS does.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from diffnas.registry import Registry

OpFactory = Callable[[int, int, bool], nn.Module]

OPS: Registry[OpFactory] = Registry("op")


def register_op(name: str) -> Callable[[OpFactory], OpFactory]:
    """Register an op factory under ``name``."""
    return OPS.register(name)


def create_op(name: str, C: int, stride: int, affine: bool = True) -> nn.Module:
    """Build op ``name`` for ``C`` channels at ``stride`` (1 or 2: the ops keep or halve
    the side); unknown names raise with the list."""
    factory = OPS.get(name)
    if stride not in (1, 2):
        raise ValueError(f"op {name!r}: stride {stride} is not supported (1 or 2)")
    return factory(C, stride, affine)


def list_ops() -> list[str]:
    return OPS.names()
