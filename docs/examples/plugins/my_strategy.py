"""A strategy plugin (docs/extending.md, "A strategy"): first-order DARTS whose alpha
step is signSGD with its own step size, ``search.strategy: {name: sign_darts, sign_lr: ...}``."""

from dataclasses import dataclass

import torch

from diffnas.config import require
from diffnas.strategies import SearchStrategy, StrategyConfig, register_strategy
from diffnas.strategies.hypergrad import first_order


@dataclass
class SignDartsConfig(StrategyConfig):  # w_optim, a_optimizer, relaxation, edge_norm, ...
    sign_lr: float = 1e-3

    def __post_init__(self) -> None:  # checked when the config is read, before any run
        require(self.sign_lr > 0, "search.strategy.sign_lr", "> 0", self.sign_lr)


@register_strategy("sign_darts")
class SignDarts(SearchStrategy):
    Config = SignDartsConfig
    first_order = True    # first derivatives only (so bf16 autocast and compile may apply)
    data_parallel = True  # every gradient goes through average_grads / weight_step

    def step(self, train_batch, val_batch) -> dict[str, float]:
        with self.relaxation.fixed_noise():  # one sampled architecture per step
            grads, val_stats = first_order(self, train_batch, val_batch)
        grads = self.average_grads(grads)  # the mean over ranks under torchrun
        with torch.no_grad():
            for alpha, g in zip(self.alphas(), grads, strict=True):
                alpha.sub_(self.config.sign_lr * torch.sign(g))
        stats = self.weight_step(train_batch, self.arch_weights())  # SGD on the weights
        stats.update({f"val_{k}": v for k, v in val_stats.items()})
        return stats  # metric name -> float
