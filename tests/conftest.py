"""Tiny spaces and batches shared by the tests (seconds on a 2-core CPU)."""

from __future__ import annotations

import pytest
import torch

from diffnas.arch import ArchParams
from diffnas.spaces import DataShape, create_space
from diffnas.strategies import ClassificationObjective, create_strategy

TINY_SHAPE = DataShape(in_channels=1, resolution=8, num_classes=3)


def tiny_space(**overrides):
    section = {"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2, "stem_multiplier": 1}
    section.update(overrides)
    return create_space(section, TINY_SHAPE)


def tiny_batch(n: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def tiny_strategy(section: dict, space=None, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    space = space or tiny_space()
    supernet = space.build_supernet().to(dtype)
    arch = ArchParams(space).to(dtype)
    with torch.no_grad():  # visible alphas, so hypergradients are not all tiny
        for p in arch.parameters():
            p.normal_(0, 0.5)
    return create_strategy(section, supernet, arch, ClassificationObjective(), epochs=2)


@pytest.fixture
def space():
    return tiny_space()
