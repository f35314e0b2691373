"""``search.amp: bf16``: the search step's forward passes run under bf16 autocast, for
first-order strategies only; others are refused with a message that says why."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import _cfg

from diffnas.engine.search import build_search, load_search_data


def _one_step(*overrides):
    cfg = _cfg(*overrides)
    task = build_search(cfg, load_search_data(cfg))
    seen = []
    conv = next(m for m in task.strategy.supernet.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    stats = task.step(next(iter(task.batches(0))))
    weights = [p.detach().clone() for p in task.strategy.supernet.parameters()]
    return stats, seen, weights


@pytest.mark.parametrize("strategy", ["{name: darts, order: 1}", "{name: gdas}",
                                      "{name: snas}", "{name: single_level}"])
def test_amp_step_runs_in_bf16_and_stays_close_to_float32(strategy):
    stats, seen, w_amp = _one_step(f"search.strategy={strategy}", "search.amp=bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert all(math.isfinite(v) for v in stats.values())
    stats32, seen32, w_32 = _one_step(f"search.strategy={strategy}")
    assert set(seen32) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in w_amp)  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(w_amp, w_32, strict=True))
    for a, b in zip(w_amp, w_32, strict=True):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.02)


def test_amp_refuses_second_order_and_unknown_settings():
    with pytest.raises(ValueError, match="'darts'.*not declared first-order.*search.amp"):
        _one_step("search.strategy.order=2", "search.amp=bf16")
    with pytest.raises(ValueError, match="search.amp must be null or 'bf16'"):
        _one_step("search.amp=fp8")
