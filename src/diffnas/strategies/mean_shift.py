"""MS-DARTS (Hsieh et al., 2021): mean-shift architecture updates.

Each alpha step samples ``samples`` architectures ``alpha_i = alpha + bandwidth * eps_i``
(``eps_i`` standard normal, torch's global RNG), evaluates the validation loss ``L_i`` and
its gradient at each, and weights the samples by a kernel of their loss,
``k_i = softmax(-z_i / temperature)`` with ``z_i`` the loss standardised over the samples
(``(L_i - mean L) / std L``). Standardised, because the samples' losses differ by about
0.01 on a real batch: ``softmax(-L_i)`` weighed them all alike (0.2517 vs 0.25 each for 4
samples); ``temperature`` is now in units of that spread, whatever the loss's scale.
Alpha shifts to the weighted mean ``sum k_i alpha_i`` and then takes an optimizer step
along ``sum k_i grad L(alpha_i)``: a descent step on the loss smoothed over the
bandwidth, which steers away from sharp minima. As ``bandwidth -> 0`` every sample is
``alpha`` and the step is DARTS first order.

The shift itself is still mostly noise: a few samples in hundreds of dimensions steer it
only weakly (docs/strategies.md gives the measured sizes). One sample is refused: its
shift is the sample's random offset alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffnas.config import require
from diffnas.strategies.base import Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.hypergrad import grads as grads_or_zeros
from diffnas.strategies.registry import register_strategy


def standardized(L: torch.Tensor) -> torch.Tensor:
    """``(L - mean) / std`` over the samples; zeros when they are all equal (or one)."""
    centred = L - L.mean()
    spread = centred.pow(2).mean().sqrt()
    return centred / spread if float(spread) > 0 else torch.zeros_like(L)


def mean_shift(
    loss_at: Callable[[list[torch.Tensor]], torch.Tensor], params: Sequence[torch.Tensor],
    bandwidth: float, samples: int, temperature: float,
    grad_params: Sequence[torch.Tensor] | None = None,
    average: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``loss_at(deltas)`` is the loss at ``params + deltas``, differentiable in ``params``
    (and in ``grad_params``, default ``params``, which get gradients but no samples).
    Returns (the shift ``sum k_i delta_i``, the kernel-weighted gradient, the losses).
    ``average``: applied to the stacked losses before the kernel (data parallel: the mean
    over ranks, so every rank weighs the samples alike; the weighted gradient is then
    this rank's, to be averaged by the caller)."""
    targets = list(params if grad_params is None else grad_params)
    deltas, grads, losses = [], [], []
    for _ in range(samples):
        d = [bandwidth * torch.randn_like(p) for p in params]
        loss = loss_at(d)
        grads.append(grads_or_zeros(loss, targets))
        deltas.append(d)
        losses.append(loss.detach())
    L = torch.stack(losses)
    if average is not None:
        L = average(L)
    k = torch.softmax(-standardized(L) / temperature, dim=0)
    shift = [sum(k[i] * deltas[i][j] for i in range(samples)) for j in range(len(params))]
    grad = [sum(k[i] * grads[i][j] for i in range(samples)) for j in range(len(targets))]
    return shift, grad, L


@dataclass
class MeanShiftConfig(StrategyConfig):
    bandwidth: float = 0.1  # std of the architecture samples around alpha (the key setting)
    samples: int = 4
    # kernel of the loss: weight ~ exp(-z / temperature), z the standardised loss
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for key in ("bandwidth", "temperature"):
            require(math.isfinite(getattr(self, key)), f"search.strategy.{key}", "finite",
                    getattr(self, key))
        if self.bandwidth < 0 or self.samples < 1 or self.temperature <= 0:
            raise ValueError(
                f"mean_shift needs bandwidth >= 0, samples >= 1, temperature > 0; got "
                f"{self.bandwidth}, {self.samples}, {self.temperature}"
            )
        if self.samples < 2 and self.bandwidth > 0:  # one sample's kernel weight is 1
            raise ValueError(
                "mean_shift needs samples >= 2 when bandwidth > 0: with one sample the "
                "shift is that sample's random offset, whatever the loss says (a random "
                "walk of alpha); bandwidth 0 is DARTS first order")


@register_strategy("mean_shift")
class MeanShiftStrategy(SearchStrategy):
    """Bilevel: mean-shift alpha step on the validation batch, then a weight step."""

    Config = MeanShiftConfig
    # samples from torch's RNG (synchronised across ranks), losses averaged before the
    # kernel, the weighted gradient averaged by set_alpha_grads
    data_parallel = True

    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        if val_batch is None:
            raise ValueError("mean_shift needs a validation batch (bilevel search)")
        c = self.config
        logits = self.arch_params.as_dict()
        groups = list(logits)

        def loss_at(deltas: list[torch.Tensor]) -> torch.Tensor:
            moved = {g: logits[g] + d for g, d in zip(groups, deltas, strict=True)}
            aw = self.arch_params.normalize(self.relaxation(moved))
            return self.add_penalty(self.loss(val_batch, aw)[0], aw, {}, logits=moved)

        # betas (edge normalization), if any, get the weighted gradient but no samples
        params = [logits[g] for g in groups]
        with self.relaxation.fixed_noise():  # the samples differ in alpha, not in noise
            shift, grads, losses = mean_shift(loss_at, params, c.bandwidth, c.samples,
                                              c.temperature, grad_params=self.alphas(),
                                              average=self.mean_over_ranks)
            if getattr(val_batch, "state", None) is not None:
                # a stream that carries state (language models' hidden state) keeps that of
                # a pass at the current alpha, as in DARTS, not the last sample's; on the
                # samples' noise, so no extra RNG draw
                with torch.no_grad():
                    self.loss(val_batch, self.arch_weights())
        with torch.no_grad():
            for p, d in zip(params, shift, strict=True):
                p.add_(d)
        self.a_optimizer.zero_grad(set_to_none=True)
        self.set_alpha_grads(grads)
        self.a_optimizer.step()
        stats = self.weight_step(train_batch, self.arch_weights())
        stats.update({"val_loss": float(losses.mean()), "shift": float(
            torch.sqrt(sum((s * s).sum() for s in shift)))})
        return stats
