"""Relaxations turn architecture logits into the weights the supernet mixes ops with."""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from diffnas.config import convert_value
from diffnas.registry import Registry, builtin


@dataclass
class ArchWeights:
    """Relaxed weights per cell type, shape ``(num_edges, num_ops)``.

    ``active`` is set by hard (sampling) relaxations: the sampled op index per edge, and
    the supernet then computes only that op on each edge.
    """

    weights: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor] | None = field(default=None)

    def __getitem__(self, group: str) -> torch.Tensor:
        return self.weights[group]

    def detach(self) -> ArchWeights:
        act = None if self.active is None else dict(self.active)
        return ArchWeights({g: w.detach() for g, w in self.weights.items()}, act)


class Relaxation:
    """Base class: ``__call__(logits) -> ArchWeights``. Stateless unless it says so."""

    stochastic = False
    #: True where it samples one op per edge (``ArchWeights.active``): the edges then run a
    #: different op each step, which compiled mixed ops would recompile for
    hard = False

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def set_epochs(self, epochs: int) -> None:
        """Told the run's length once, by the strategy (for schedules)."""

    def end_epoch(self) -> None:
        """Advance a per-epoch schedule (e.g. a temperature)."""

    @contextlib.contextmanager
    def fixed_noise(self) -> Iterator[None]:
        """Within this block a stochastic relaxation draws its noise once per group and
        reuses it, so that every pass of one architecture step (a virtual step, finite
        differences, the loss evaluations of a zero-order estimate) sees the same sampled
        architecture. Nothing to hold for a deterministic relaxation."""
        yield


RELAXATIONS: Registry[type[Relaxation]] = Registry("relaxation")


def register_relaxation(name: str) -> Callable[[type[Relaxation]], type[Relaxation]]:
    """Class decorator: register a :class:`Relaxation` subclass under ``name``, the
    ``search.strategy.relaxation.name`` that selects it (its ``__init__`` keywords are the
    section's other keys; docs/extending.md)."""
    return RELAXATIONS.register(name)


@RELAXATIONS.register("softmax")
class SoftmaxRelaxation(Relaxation):
    """DARTS: softmax over the ops of each edge."""

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        return ArchWeights({g: torch.softmax(a, dim=-1) for g, a in logits.items()})


class TemperatureSchedule:
    """``tau`` annealed per epoch from ``tau`` to ``tau_min`` over the run, linearly
    (GDAS) or exponentially (SNAS); ``tau_min=None`` keeps it constant."""

    def __init__(self, tau: float, tau_min: float | None, anneal: str | None,
                 default_anneal: str = "exp") -> None:
        if not (math.isfinite(tau) and (tau_min is None or math.isfinite(tau_min))):
            raise ValueError(f"temperatures must be finite, got tau={tau}, tau_min={tau_min}")
        if tau <= 0 or (tau_min is not None and tau_min <= 0):
            raise ValueError(f"temperatures must be positive, got tau={tau}, tau_min={tau_min}")
        if anneal is not None and tau_min is None:  # it would silently stay at tau
            raise ValueError(f"anneal={anneal!r} needs tau_min, the temperature it anneals "
                             "to (without tau_min the temperature stays at tau)")
        if tau_min is not None and tau_min > tau:
            raise ValueError(f"tau_min={tau_min} > tau={tau}: the temperature would rise; "
                             "anneal from the larger to the smaller")
        anneal = default_anneal if anneal is None else anneal
        if anneal not in ("linear", "exp"):
            raise ValueError(f"anneal must be 'linear' or 'exp', got {anneal!r}")
        self.tau_max, self.tau_min, self.anneal = tau, tau_min, anneal
        self.epochs = 1
        self.epoch = 0

    @property
    def tau(self) -> float:
        if self.tau_min is None or self.epochs <= 1:
            return self.tau_max
        t = min(self.epoch / (self.epochs - 1), 1.0)
        if self.anneal == "linear":
            return self.tau_max + t * (self.tau_min - self.tau_max)
        return self.tau_max * (self.tau_min / self.tau_max) ** t

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epochs = int(state["epoch"]), int(state["epochs"])


def _gumbel_like(a: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from torch's global RNG (so checkpoints resume exactly)."""
    return -torch.empty_like(a).exponential_().log()


@RELAXATIONS.register("gumbel")
class GumbelSoftmaxRelaxation(Relaxation):
    """SNAS: ``softmax((alpha + g) / tau)`` with Gumbel noise ``g``, a fresh sample per
    call; ``tau`` follows a per-epoch schedule kept in ``state_dict``."""

    stochastic = True

    default_anneal = "exp"  # SNAS

    def __init__(self, tau: float = 1.0, tau_min: float | None = None,
                 anneal: str | None = None) -> None:
        self.schedule = TemperatureSchedule(tau, tau_min, anneal, self.default_anneal)
        self._held: dict[str, torch.Tensor] | None = None

    @property
    def tau(self) -> float:
        return self.schedule.tau

    @contextlib.contextmanager
    def fixed_noise(self) -> Iterator[None]:
        outer = self._held is None
        if outer:
            self._held = {}
        try:
            yield
        finally:
            if outer:
                self._held = None

    def noise(self, group: str, a: torch.Tensor) -> torch.Tensor:
        """Fresh Gumbel noise for ``group``, or the held one inside :meth:`fixed_noise`."""
        if self._held is None:
            return _gumbel_like(a)
        if group not in self._held:
            self._held[group] = _gumbel_like(a)
        return self._held[group]

    def soft(self, a: torch.Tensor, group: str = "") -> torch.Tensor:
        return torch.softmax((a + self.noise(group, a)) / self.tau, dim=-1)

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        return ArchWeights({g: self.soft(a, g) for g, a in logits.items()})

    def set_epochs(self, epochs: int) -> None:
        self.schedule.epochs = max(int(epochs), 1)

    def end_epoch(self) -> None:
        self.schedule.epoch += 1

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)


@RELAXATIONS.register("hard_gumbel")
class HardGumbelRelaxation(GumbelSoftmaxRelaxation):
    """GDAS: one op per edge sampled by Gumbel-argmax; the weight is one-hot in the
    forward pass and carries the Gumbel-softmax gradient (straight-through). ``active``
    holds the sampled index, so the supernet computes only that op."""

    hard = True

    default_anneal = "linear"  # GDAS

    def __init__(self, tau: float = 10.0, tau_min: float | None = 0.1,
                 anneal: str | None = None) -> None:
        super().__init__(tau, tau_min, anneal)

    def __call__(self, logits: dict[str, torch.Tensor]) -> ArchWeights:
        weights, active = {}, {}
        for g, a in logits.items():
            soft = self.soft(a, g)
            index = soft.detach().argmax(dim=-1)
            hard = torch.nn.functional.one_hot(index, a.shape[-1]).to(soft.dtype)
            weights[g] = hard - soft.detach() + soft
            active[g] = index
        return ArchWeights(weights, active)


def _typed_settings(cls: type[Relaxation], name: str, settings: dict) -> dict:
    """A plugin's ``settings`` converted to the types its ``__init__`` annotates, as config
    sections are (YAML reads ``1e-6`` as a string); one that does not fit is a
    :class:`ConfigError` naming it. diffnas's own relaxations check their settings."""
    if builtin(cls.__module__):
        return settings
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not resolve: nothing to check against
        return settings
    return {k: convert_value(hints[k], v, f"relaxation {name!r} setting {k!r}") if k in hints else v
            for k, v in settings.items()}


def create_relaxation(name: str, **kwargs) -> Relaxation:
    """The relaxation registered as ``name``; unknown settings, and a plugin's settings
    that do not fit their annotations, are a clear error."""
    cls = RELAXATIONS.get(name)
    kwargs = _typed_settings(cls, name, kwargs)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"relaxation {name!r}: bad settings {kwargs}: {exc}") from None


def check_relaxation_output(section: dict, logits: dict[str, torch.Tensor]) -> None:
    """Call a plugin's relaxation (``{name, **settings}``) once on the space's ``logits``
    before a run starts: it must return :class:`ArchWeights` whose weights have the logits'
    groups and shapes, and whose ``active`` (if set) holds one op index per edge. A
    ``ValueError`` names the relaxation and what is wrong. diffnas's own: tests."""
    settings = dict(section)
    name = settings.pop("name")
    cls = RELAXATIONS.get(name)
    if builtin(cls.__module__):
        return
    relaxation = create_relaxation(name, **settings)
    what = f"relaxation {name!r} ({cls.__module__}.{cls.__qualname__})"
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # a sampling one draws noise
        try:
            out = relaxation({g: a.detach() for g, a in logits.items()})
        except Exception as exc:
            raise ValueError(f"{what} failed on the space's alphas: {type(exc).__name__}: "
                             f"{exc}") from exc
    if not isinstance(out, ArchWeights):
        raise ValueError(f"{what} returned {type(out).__name__}, not ArchWeights: __call__("
                         "logits) returns ArchWeights({group: weights}) (diffnas.arch)")
    for g, a in logits.items():
        w = out.weights.get(g) if isinstance(out.weights, dict) else None
        if not isinstance(w, torch.Tensor) or w.shape != a.shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{what} gave group {g!r} weights {got}, expected the logits' "
                             f"shape {tuple(a.shape)} (num_edges, num_ops)")
        if out.active is None:
            continue
        i = out.active.get(g) if isinstance(out.active, dict) else None
        if (not isinstance(i, torch.Tensor) or i.shape != a.shape[:1] or i.is_floating_point()
                or not bool(((i >= 0) & (i < a.shape[1])).all())):
            raise ValueError(f"{what} gave group {g!r} active {i!r}, expected one op index "
                             f"in [0, {a.shape[1]}) per edge, shape {tuple(a.shape[:1])}")
