"""Model cost: parameters and multiply-accumulates (counted by torch's FlopCounterMode)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, exclude: tuple[str, ...] = ("auxiliary",)) -> int:
    """Trainable parameters, leaving out modules whose name starts with ``exclude`` (the
    papers count DARTS networks without the auxiliary head)."""
    return sum(
        p.numel() for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith(exclude)
    )


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...], *args) -> int:
    """Multiply-accumulates of one forward pass of a single input in eval mode
    (convolutions and matrix products; FlopCounterMode counts 2 FLOPs per MAC)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)  # (none: a parameter-free model, on the CPU)
        x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None else torch.float32)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, *args)
        return counter.get_total_flops() // 2
    finally:
        model.train(was_training)


@torch.no_grad()
def flops_by_module(model: nn.Module, input_shape: tuple[int, ...], *args) -> dict[str, int]:
    """FLOPs of one forward pass of a single input in eval mode, per submodule: keys are
    qualified module names (``""`` = the whole model), values include submodules. Counts
    what FlopCounterMode counts: convolutions and matrix products, 2 FLOPs per MAC."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None else None
        x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
        counter = FlopCounterMode(display=False)
        if not hasattr(counter, "mod_tracker"):  # torch 2.3 counts per module only for the
            counter = FlopCounterMode(model, display=False)  # modules it is given
        with counter:
            model(x, *args)
        root = type(model).__name__
        out = {}
        for name, ops in counter.get_flop_counts().items():
            if name == "Global":
                continue
            key = "" if name == root else name.removeprefix(root + ".")
            out[key] = int(sum(ops.values()))
        out.setdefault("", counter.get_total_flops())
        return out
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, input_shape: tuple[int, ...], *args) -> int:
    """Total FLOPs (2 per multiply-accumulate) of one forward pass of a single input."""
    return flops_by_module(model, input_shape, *args)[""]
