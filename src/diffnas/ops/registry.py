"""Registry of candidate operations, keyed by the names papers and genotypes use.

An op factory has the signature ``(C, stride, affine) -> nn.Module``: it maps C channels
to C channels (halving the resolution at stride 2). BatchNorm inside ops follows
``affine``; search-time networks pass ``affine=False`` as DARTS does.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from diffnas.registry import Registry, builtin

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


def check_op_contract(name: str, channels: Sequence[int] = (4,), affine: bool = False
                      ) -> None:
    """Hold an op registered outside diffnas (a plugin) to the factory contract before a
    run starts: built for each of ``channels`` (a space that knows its own counts may pass
    them) at stride 1 and 2 with ``affine`` (False as a supernet builds it, True as a
    retrained network does), it must be a module mapping a ``(2, C, H, H)`` batch, for an
    odd and an even side H (7 and 8), to ``(2, C, H, H)`` and ``(2, C, ceil(H/2),
    ceil(H/2))``. A ``ValueError`` names the op and the file that registered it. (diffnas's
    own ops: tests/test_ops.py.)"""
    factory = OPS.get(name)
    module = getattr(factory, "__module__", None) or ""
    if builtin(module):
        return
    try:
        where = inspect.getsourcefile(factory) or module
    except TypeError:
        where = module
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights
        for C, stride, side in itertools.product(channels, (1, 2), (7, 8)):
            x = torch.randn(2, C, side, side, generator=gen)
            try:
                op = factory(C, stride, affine)
                if not isinstance(op, nn.Module):
                    raise TypeError(f"the factory returned {type(op).__name__}, not an "
                                    "nn.Module")
                with torch.no_grad():
                    out = op(x)
            except Exception as exc:
                raise ValueError(f"op {name!r} (registered in {where}) does not keep the "
                                 f"op contract, (C, stride, affine) -> module mapping C to "
                                 f"C channels: built for C={C} at stride {stride} "
                                 f"(affine={affine}), on a "
                                 f"{tuple(x.shape)} batch: {type(exc).__name__}: {exc}"
                                 ) from exc
            out_side = -(-side // stride)
            want = (2, C, out_side, out_side)
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
                got = (tuple(out.shape) if isinstance(out, torch.Tensor)
                       else type(out).__name__)
                raise ValueError(f"op {name!r} (registered in {where}) for C={C} at stride "
                                 f"{stride} (affine={affine}) maps a {tuple(x.shape)} batch "
                                 f"to {got}, expected {want} "
                                 "(an op keeps its channels and halves the side, rounding "
                                 "up, at stride 2)")
