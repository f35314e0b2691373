"""MS-DARTS: deterministic under a seed, the plain DARTS update at zero bandwidth, and
descent on the smoothed loss of a rugged toy problem."""

from __future__ import annotations

import torch
from conftest import tiny_batch, tiny_strategy

from diffnas.strategies.mean_shift import mean_shift


def _run(section, seed):
    s = tiny_strategy(section)
    torch.manual_seed(seed)
    for i in range(2):
        s.step(tiny_batch(4, i), tiny_batch(4, 10 + i))
    return [p.detach().clone() for p in s.alphas()]


def test_deterministic_under_a_seed():
    sec = {"name": "mean_shift", "bandwidth": 0.5, "samples": 3}
    a, b, c = _run(sec, 1), _run(sec, 1), _run(sec, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.allclose(x, y) for x, y in zip(a, c, strict=True))


def test_zero_bandwidth_is_the_plain_darts_update():
    ms = _run({"name": "mean_shift", "bandwidth": 1e-9, "samples": 3}, 0)
    darts = _run({"name": "darts", "order": 1}, 0)
    wide = _run({"name": "mean_shift", "bandwidth": 0.5, "samples": 3}, 0)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ms, darts, strict=True))
    assert not all(torch.allclose(x, y, atol=1e-3) for x, y in zip(wide, darts, strict=True))


def rugged(x: torch.Tensor) -> torch.Tensor:
    """A bowl with many sharp local minima."""
    return ((x - 1.5) ** 2).sum() + 0.5 * torch.sin(12 * x).pow(2).sum()


def smoothed(x: torch.Tensor, h: float) -> float:
    g = torch.Generator().manual_seed(123)
    eps = torch.randn(4000, x.numel(), generator=g, dtype=x.dtype)
    pts = x.detach() + h * eps
    return float((((pts - 1.5) ** 2).sum(1) + 0.5 * torch.sin(12 * pts).pow(2).sum(1)).mean())


def test_smoothed_loss_falls():
    torch.manual_seed(0)
    h = 0.3
    x = torch.full((4,), -1.0, dtype=torch.float64, requires_grad=True)
    start = smoothed(x, h)
    for _ in range(40):
        shift, grad, _ = mean_shift(lambda d, x=x: rugged(x + d[0]), [x], h, 8, 1.0)
        with torch.no_grad():
            x += shift[0]
            x -= 0.05 * grad[0]
    assert smoothed(x, h) < 0.3 * start
    # the kernel weighs low-loss samples up: the shift points downhill on average
    torch.manual_seed(1)
    x0 = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    shifts = [mean_shift(lambda d: rugged(x0 + d[0]), [x0], h, 8, 0.5)[0][0]
              for _ in range(50)]
    assert float(torch.stack(shifts).mean(0).sum()) > 0  # towards the bowl's centre 1.5


def test_the_kernel_reads_the_losses_relative_to_their_spread():
    """Sample losses on a real batch differ by ~0.01: the kernel must still prefer the
    lower ones (softmax(-L) weighed them alike, leaving the shift a random walk). The
    shift is the same for the loss times 1e-3 or plus 100, and points downhill."""
    def shift_for(scale: float, offset: float, seed: int) -> torch.Tensor:
        x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(seed)
        return mean_shift(lambda d: offset + scale * ((x + d[0] - 1.5) ** 2).sum(), [x],
                          0.3, 8, 0.5)[0][0]

    for seed in range(3):
        base = shift_for(1.0, 0.0, seed)
        torch.testing.assert_close(shift_for(1e-3, 100.0, seed), base)
    mean = torch.stack([shift_for(1e-3, 100.0, s) for s in range(40)]).mean(0)
    assert bool((mean > 0.05).all())  # towards 1.5 on every coordinate
