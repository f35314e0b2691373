"""The strategy interface and what all gradient-based strategies share: two disjoint
parameter sets, two optimizers, a relaxation and an objective."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from diffnas.arch.params import ArchParams
from diffnas.arch.relax import RELAXATIONS, ArchWeights, create_relaxation
from diffnas.config import ConfigError, check_call, require, require_float32
from diffnas.engine.distributed import all_reduce_mean, average_grads_
from diffnas.registry import Registry
from diffnas.strategies.objective import Objective, metric

#: Extra differentiable losses on the architecture (e.g. predicted latency): a factory
#: ``(**settings) -> penalty`` with ``penalty(arch_weights, logits) -> scalar tensor``,
#: added to the alpha objective by the hypergradient rules (``SearchStrategy.add_penalty``).
#: A penalty with a ``bind(arch_params)`` method is given the architecture parameters once,
#: to refuse ones it cannot read (e.g. another op list than its latency predictor's).
PENALTIES: Registry[Callable[..., Callable]] = Registry("architecture penalty")
#: Modules that register penalties, imported when a strategy first builds one.
PENALTY_MODULES: list[str] = ["diffnas.hardware.penalty"]


def register_penalty(name: str) -> Callable[[Callable[..., Callable]], Callable[..., Callable]]:
    """Register a penalty factory under ``name`` (``search.strategy.penalties[i].name``)."""
    return PENALTIES.register(name)


def _import_penalty_modules() -> None:
    for mod in PENALTY_MODULES:
        importlib.import_module(mod)


def _select(registry: Registry, spec: dict, where: str) -> tuple[Callable[..., Any], dict]:
    """What ``spec['name']`` selects in ``registry`` and the other keys of ``spec``, which
    it must accept (else a :class:`ConfigError` naming the key under ``where``)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where} needs a 'name' (one of {registry.names()}), got {spec!r}")
    settings = {k: v for k, v in spec.items() if k != "name"}
    target = registry.get(spec["name"])
    check_call(target, settings, where)
    return target, settings


def _penalty_factory(spec: dict, where: str) -> tuple[Callable[..., Callable], dict]:
    """The factory ``spec['name']`` selects and the settings it accepts."""
    _import_penalty_modules()
    return _select(PENALTIES, spec, where)


def check_penalties(specs: list[dict], where: str = "search.strategy.penalties") -> None:
    """Each ``{name, **settings}`` names a registered penalty (plugins are imported before
    a config is checked) with settings its factory takes; builds none (a penalty may read
    files, e.g. a latency predictor)."""
    for i, spec in enumerate(specs):
        _penalty_factory(spec, f"{where}[{i}]")


def create_penalty(spec: dict, where: str = "search.strategy.penalties") -> Callable:
    """Build ``{name: ..., **settings}`` from :data:`PENALTIES`."""
    factory, settings = _penalty_factory(spec, where)
    return factory(**settings)


def check_relaxation(section: dict, where: str = "search.strategy.relaxation") -> None:
    """``{name, **settings}`` names a registered relaxation, with settings its class takes
    and accepts (built once here: relaxations are cheap and hold no tensors)."""
    _, settings = _select(RELAXATIONS, section, where)
    try:
        create_relaxation(section["name"], **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


W_OPTIMIZERS = ("sgd", "adam")


@dataclass
class WeightOptimConfig:
    """The network weights' optimizer, cosine schedule per epoch: SGD with momentum (the
    DARTS paper's defaults) or Adam (``name: adam``, with ``betas``: e.g. for a PPO loss,
    which SGD follows slowly). L2 ``weight_decay`` and ``grad_clip`` apply to both."""

    name: str = "sgd"
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9  # SGD's
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's
    weight_decay: float = 3e-4
    grad_clip: float = 5.0

    def __post_init__(self) -> None:
        require(self.name in W_OPTIMIZERS, "search.strategy.w_optim.name",
                f"one of {', '.join(W_OPTIMIZERS)}", self.name)
        for key in ("lr", "lr_min", "momentum", "weight_decay"):
            value = getattr(self, key)
            require(value >= 0, f"search.strategy.w_optim.{key}", ">= 0", value)
        require_float32(self, ("lr", "lr_min", "momentum", "weight_decay"),
                        "search.strategy.w_optim")
        require(self.grad_clip > 0, "search.strategy.w_optim.grad_clip", "> 0", self.grad_clip)
        if self.lr_min > self.lr:  # the cosine "decay" would raise the learning rate
            raise ConfigError(f"search.strategy.w_optim.lr_min={self.lr_min} > lr={self.lr}: "
                              "the cosine schedule would raise the learning rate; give "
                              "lr_min <= lr (lr_min = lr keeps it constant)")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "search.strategy.w_optim.betas", "two numbers in [0, 1)", self.betas)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        unused = {"sgd": ("betas", (0.9, 0.999)), "adam": ("momentum", 0.9)}[self.name]
        if getattr(self, unused[0]) != unused[1]:  # refused, not ignored
            raise ConfigError(f"search.strategy.w_optim.{unused[0]} is not used by "
                              f"w_optim.name={self.name} (momentum is SGD's, betas Adam's)")

    def build(self, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimizer these settings describe, over ``params``."""
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas,
                                    weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)


@dataclass
class ArchOptimConfig:
    """Adam for the architecture parameters (DARTS paper defaults)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        require(self.lr >= 0, "search.strategy.a_optim.lr", ">= 0", self.lr)
        require(self.weight_decay >= 0, "search.strategy.a_optim.weight_decay", ">= 0",
                self.weight_decay)
        require_float32(self, ("lr", "weight_decay"), "search.strategy.a_optim")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "search.strategy.a_optim.betas", "two numbers in [0, 1)", self.betas)


@dataclass
class StrategyConfig:
    w_optim: WeightOptimConfig = field(default_factory=WeightOptimConfig)
    a_optim: ArchOptimConfig = field(default_factory=ArchOptimConfig)
    relaxation: dict = field(default_factory=lambda: {"name": "softmax"})
    penalties: list[dict] = field(default_factory=list)  # e.g. [{name: latency, lam: 0.1}]
    edge_norm: bool = False  # PC-DARTS edge normalization: beta logits per incoming edge


Batch = Any


class SearchStrategy:
    """Updates weights ``w`` (of the supernet) and architecture logits ``alpha``.

    ``step(train_batch, val_batch)`` does one update and returns float metrics;
    ``end_epoch()`` advances per-epoch schedules. Everything needed to resume is in
    ``state_dict()``.
    """

    Config: ClassVar[type] = StrategyConfig
    name: ClassVar[str] = ""
    #: False for strategies that train both parameter sets on one stream (no val split).
    uses_validation: ClassVar[bool] = True
    #: True where every gradient the strategy takes goes through ``average_grads`` /
    #: ``average_weight_grads`` (tested against one process); others refuse data parallel.
    data_parallel: ClassVar[bool] = False
    #: True where a step makes no host sync and its Python-side state only changes through
    #: the optimizers' learning rates, so it can be captured once as a CUDA graph and
    #: replayed (``search.cuda_graph``, engine/cuda_graph.py; tested against eager steps).
    graph_safe: bool = False
    #: True where a step takes first derivatives only: no second derivatives (compiled
    #: graphs do not take double backward) and no finite differences of losses (bf16
    #: rounding would drown them). Such strategies may run under ``search.amp: bf16`` and
    #: ``search.compile``.
    first_order: bool = False

    @classmethod
    def declared(cls, config: StrategyConfig) -> tuple[bool, bool]:
        """``(first_order, graph_safe)`` of this strategy built from ``config``, known
        without building it (config checks use it before a run directory exists); the
        class's declarations unless a strategy's settings decide them."""
        return cls.first_order, cls.graph_safe

    @classmethod
    def check_setup(cls, config: StrategyConfig, arch_params: ArchParams, epochs: int) -> None:
        """Refuse settings that only the space's edges or the number of epochs can judge
        (a ValueError naming the key). Config checks call it with the space's alphas before
        a run directory exists; ``__init__`` calls it too. Nothing to check here."""

    @classmethod
    def check_discretizer(cls, config: StrategyConfig, rule: str,
                          arch_params: ArchParams | None = None) -> None:
        """Refuse settings whose search cannot be read by the discretizer ``rule`` (the
        run's ``search.discretizer`` or its space's default; a ValueError naming the key).
        Config checks call it before a run directory exists, passing the space's alphas as
        ``arch_params`` to an override that names that parameter. Nothing to check here."""

    def __init__(
        self,
        config: StrategyConfig,
        supernet: nn.Module,
        arch_params: ArchParams,
        objective: Objective,
        epochs: int,
    ) -> None:
        with torch.random.fork_rng(devices=[]):  # (a check may build ops: not the run's draws)
            type(self).check_setup(config, arch_params, epochs)
        self.config = config
        self.supernet = supernet
        self.arch_params = arch_params
        self.objective = objective
        self.epochs = epochs
        relax = dict(config.relaxation)
        check_relaxation(relax)
        self.relaxation = create_relaxation(relax.pop("name"), **relax)
        self.relaxation.set_epochs(epochs)
        if config.edge_norm:  # before the optimizer, so the betas are optimized with alpha
            arch_params.add_edge_betas()
        shared = {id(p) for p in self.weights()} & {id(p) for p in arch_params.parameters()}
        if shared:  # SGD would move the alphas too: two optimizers, one parameter
            raise ValueError(f"{len(shared)} architecture parameter(s) are also among the "
                             "supernet's weights; keep ArchParams out of the supernet (it "
                             "receives arch_weights as a forward argument)")
        w = config.w_optim
        self.w_optimizer = w.build(self.weights())
        self.w_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.w_optimizer, T_max=max(epochs, 1), eta_min=w.lr_min
        )
        a = config.a_optim
        self.a_optimizer = torch.optim.Adam(
            self.arch_params.parameters(),
            lr=a.lr,
            betas=tuple(a.betas),
            weight_decay=a.weight_decay,
        )
        device = self.alphas()[0].device
        self.penalties = [(spec.get("name"), create_penalty(spec)) for spec in config.penalties]
        for _, p in self.penalties:
            if isinstance(p, nn.Module):
                p.to(device)
            bind = getattr(p, "bind", None)  # a penalty may check what it will be given
            if bind is not None:
                bind(arch_params)

    # --- parameter sets ---------------------------------------------------------------
    def supernets(self) -> list[nn.Module]:
        """Every supernet this strategy trains now (schedules that change a supernet's
        structure, e.g. growth, apply to all of them)."""
        return [self.supernet]

    def weight_optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer that steps weights now (one per supernet of :meth:`supernets`):
        a learning rate scaled for one step, e.g. per BPTT window, scales them all."""
        return [self.w_optimizer]

    def weights(self) -> Iterator[nn.Parameter]:
        return self.supernet.parameters()

    def alphas(self) -> list[nn.Parameter]:
        return list(self.arch_params.parameters())

    def arch_weights(self) -> ArchWeights:
        return self.arch_params.normalize(self.relaxation(self.arch_params.as_dict()))

    @property
    def lr(self) -> float:
        return self.w_optimizer.param_groups[0]["lr"]

    # --- losses -------------------------------------------------------------------------
    def loss(
        self,
        batch: Batch,
        arch_weights: ArchWeights,
        params: dict[str, torch.Tensor] | None = None,
        regularize: bool = False,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Objective of the supernet on ``batch``; ``params`` substitutes weights (for
        virtual steps and finite differences) without touching the module. An objective
        with weight regularizers (``has_regularizers``: AR/TAR of language models) adds
        them only with ``regularize``, which the weight steps pass (DARTS's architecture
        passes use the plain loss)."""
        x = self.objective.inputs(batch)
        if params is None:
            out = self.supernet(x, arch_weights)
        else:
            out = functional_call(self.supernet, params, (x, arch_weights))
        if getattr(self.objective, "has_regularizers", False):
            return self.objective(out, batch, regularize=regularize)
        return self.objective(out, batch)

    def add_penalty(
        self, loss: torch.Tensor, arch_weights: ArchWeights, stats: dict[str, float],
        logits: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``loss`` plus the configured architecture penalties of ``arch_weights`` (each
        also reported in ``stats`` as ``penalty_<name>``); ``logits`` default to the
        current alphas (a strategy evaluating moved alphas passes those)."""
        logits = self.arch_params.as_dict() if logits is None else logits
        for name, penalty in self.penalties:
            value = penalty(arch_weights, logits)
            stats[f"penalty_{name}"] = metric(value)
            loss = loss + value
        return loss

    def weight_step(self, batch: Batch, arch_weights: ArchWeights) -> dict[str, float]:
        """One SGD step on ``w`` with the arch weights held fixed (detached)."""
        self.w_optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(batch, arch_weights.detach(), regularize=True)
        loss.backward()
        self.average_weight_grads()
        nn.utils.clip_grad_norm_(self.supernet.parameters(), self.config.w_optim.grad_clip)
        self.w_optimizer.step()
        return stats

    def average_weight_grads(self) -> None:
        """Data parallel: replace the weights' ``.grad`` by their mean over ranks."""
        average_grads_(self.supernet.parameters())

    def average_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over data-parallel ranks of gradients taken on this rank's slice of the
        global batch (identity in one process): the gradient one process would take over
        the whole batch. See ``engine/distributed.py``."""
        return all_reduce_mean(grads)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """A loss (or a stack of losses) of this rank's slice, averaged over data-parallel
        ranks: its value over the global batch (detached; identity in one process)."""
        return all_reduce_mean([value.detach()])[0]

    def set_alpha_grads(self, grads: list[torch.Tensor]) -> None:
        """Install this rank's alpha gradients, averaged over ranks."""
        for p, g in zip(self.alphas(), self.average_grads(grads)):
            p.grad = g.detach().clone()

    # --- the interface -----------------------------------------------------------------
    def step(self, train_batch: Batch, val_batch: Batch | None) -> dict[str, float]:
        raise NotImplementedError

    def relabel(self, labels: torch.Tensor) -> torch.Tensor:
        """Training labels this strategy learns from (identity; RLNAS permutes them)."""
        return labels

    def end_epoch(self) -> None:
        self.w_scheduler.step()
        self.relaxation.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "supernet": self.supernet.state_dict(),
            "arch_params": self.arch_params.state_dict(),
            "w_optimizer": self.w_optimizer.state_dict(),
            "a_optimizer": self.a_optimizer.state_dict(),
            "w_scheduler": self.w_scheduler.state_dict(),
            "relaxation": self.relaxation.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"])
        self.arch_params.load_state_dict(state["arch_params"])
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        for opt in (self.w_optimizer, self.a_optimizer):  # a CUDA-graph run's, resumed on CPU
            if not any(p.is_cuda for g in opt.param_groups for p in g["params"]):
                for g in opt.param_groups:
                    if g.get("capturable"):
                        g["capturable"] = False
        self.w_scheduler.load_state_dict(state["w_scheduler"])
        self.relaxation.load_state_dict(state["relaxation"])
