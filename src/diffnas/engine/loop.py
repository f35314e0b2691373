"""One training loop for search and retraining, extended by callbacks.

A *task* supplies the batches of an epoch, one step, per-epoch end work and evaluation;
the loop runs epochs, averages step metrics, and calls the callbacks' hooks. Everything
that must survive a restart (task state, callback state, RNG) goes through
``Loop.state_dict()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from diffnas.engine.checkpoint import rng_state, set_rng_state

#: what torch's load_state_dict says of a state that does not fit (module, optimizer)
_MISFIT = ("Error(s) in loading state_dict", "size mismatch",
           "doesn't match the size of optimizer's group",
           "has a different number of parameter groups")

#: the layout of :meth:`Loop.state_dict` this diffnas writes and reads. Checkpoints
#: without the field predate it and have this layout; a higher number was written by a
#: newer diffnas, whose state this one would misread, so it is refused by name.
CHECKPOINT_FORMAT = 1


class Task(Protocol):
    def batches(self, epoch: int) -> Iterable[Any]: ...
    def num_batches(self) -> int: ...
    def step(self, batch: Any) -> dict[str, float]: ...
    def end_epoch(self, epoch: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """Hooks that do nothing by default; override the ones you need."""

    def on_run_start(self, loop: Loop) -> None: ...
    def on_epoch_start(self, loop: Loop, epoch: int) -> None: ...
    def on_step_end(self, loop: Loop, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None: ...
    def on_run_end(self, loop: Loop) -> None: ...

    def close(self) -> None:
        """Let go of what the callback holds (a writer's thread, a progress bar) as the
        loop returns or raises: after ``on_run_end``, and also for a run that stops early
        (``stop_after``, Ctrl-C, an error), which gets no ``on_run_end``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def checked_metrics(metrics: Any, task: Any) -> dict[str, Any]:
    """``metrics`` if it is what a step must return, a dict of metric name -> number (a
    float, or a one-element tensor while a CUDA graph is being captured); else a
    ``TypeError`` naming the strategy (a plugin's step that returns something else). A
    NaN or infinite loss (``loss``, ``*_loss``) is a ``FloatingPointError``: the run stops
    (the built-in strategies' objective says so itself; a plugin's step may not)."""
    strategy = getattr(task, "strategy", None)
    who = f"strategy {strategy.name!r}" if strategy is not None and hasattr(strategy, "name") \
        else type(task).__name__

    def number(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return v.numel() == 1 and not v.dtype.is_complex
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(metrics, dict):
        raise TypeError(f"the step of {who} returned {type(metrics).__name__}: a step returns "
                        "a dict of metric name -> float (e.g. {'loss': 0.5, 'acc': 0.9})")
    bad = {k: v for k, v in metrics.items() if not (isinstance(k, str) and number(v))}
    if bad:
        shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(bad.items())[:3])
        raise TypeError(f"the step of {who} returned metrics that are not numbers ({shown}): "
                        "a step returns a dict of metric name -> float")
    for k, v in metrics.items():
        if (k == "loss" or k.endswith("_loss")) and not _finite(v):
            raise FloatingPointError(f"the step of {who} returned {k}={float(v)}: the run "
                                     "stops (lower the learning rate?)")
    return metrics


def _finite(v: float | torch.Tensor) -> bool:
    """Whether a metric is finite; a tensor recorded into a CUDA graph (no value yet)
    counts as finite (the graph's replay checks its loss)."""
    if isinstance(v, torch.Tensor):
        if v.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        v = v.item()
    return math.isfinite(v)


class Mean:
    """Running means of float metrics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def value(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class Loop:
    def __init__(self, task: Task, epochs: int, callbacks: list[Callback] | None = None) -> None:
        self.task = task
        self.epochs = epochs
        self.callbacks = list(callbacks or [])
        self.epoch = 0  # the next epoch to run
        self.history: list[dict[str, float]] = []
        self.running = Mean()
        #: wall-clock seconds of the last epoch run (its steps and ``end_epoch``), which
        #: ``metrics.jsonl`` records as ``seconds``; kept out of ``history``, so a resumed
        #: run's history equals an uninterrupted one's
        self.seconds: float | None = None

    def run(self, stop_after: int | None = None) -> list[dict[str, float]]:
        """Run the remaining epochs (or only ``stop_after`` of them, for tests/preemption).
        A step's ``FloatingPointError`` (a NaN or infinite loss) is raised again with the
        epoch and step it came from, counted from 1."""
        if self.epoch < self.epochs and self.task.num_batches() == 0:
            what = getattr(self.task, "batch_setting", None)  # the key that sets the batch
            raise ValueError(
                f"{type(self.task).__name__} has no full batch per epoch: the data is smaller "
                "than one batch (incomplete batches are dropped); lower the batch size"
                f"{f' ({what})' if what else ''} or use more data")
        try:
            for cb in self.callbacks:
                cb.on_run_start(self)
            done = 0
            while self.epoch < self.epochs and (stop_after is None or done < stop_after):
                epoch = self.epoch
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                self.running = Mean()
                start = time.perf_counter()
                for step, batch in enumerate(self.task.batches(epoch)):
                    try:
                        metrics = checked_metrics(self.task.step(batch), self.task)
                    except FloatingPointError as exc:  # where it diverged, for the log
                        raise FloatingPointError(
                            f"epoch {epoch + 1} of {self.epochs}, step {step + 1} of "
                            f"{self.task.num_batches()}: {exc}") from exc
                    self.running.update(metrics)
                    for cb in self.callbacks:
                        cb.on_step_end(self, step, metrics)
                metrics = {"epoch": epoch, **self.running.value(), **self.task.end_epoch(epoch)}
                self.seconds = round(time.perf_counter() - start, 4)  # (to 0.1 ms)
                self.history.append(metrics)
                self.epoch = epoch + 1
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, metrics)
                done += 1
            if self.epoch >= self.epochs:
                for cb in self.callbacks:
                    cb.on_run_end(self)
        finally:  # an interrupted or failed run too: writers and bars let go
            for cb in self.callbacks:
                cb.close()
        return self.history

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "history": self.history,
            "task": self.task.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path | None = None) -> None:
        """Continue from ``state`` (a checkpoint read from ``source``); a checkpoint that
        does not fit the rebuilt model or optimizer is a ValueError that says so, as is
        one written by a newer diffnas (its ``format`` above :data:`CHECKPOINT_FORMAT`)."""
        where = f"the checkpoint {source}" if source is not None else "the checkpoint"
        fmt = state.get("format", 1)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
            raise ValueError(f"{where} has format {fmt!r}, not a positive whole number: it "
                             "was not written by diffnas; delete it to restart this phase "
                             "from scratch")
        if fmt > CHECKPOINT_FORMAT:
            raise ValueError(f"{where} has format {fmt}, written by a newer diffnas (this one "
                             f"reads format {CHECKPOINT_FORMAT} and older): resume with the "
                             "diffnas that wrote it (upgrade this one), or "
                             "delete it to restart this phase from scratch")
        try:
            self.epoch = state["epoch"]
            self.history = list(state["history"])
            self.task.load_state_dict(state["task"])
        except (RuntimeError, ValueError, KeyError) as exc:
            text = str(exc)
            if isinstance(exc, KeyError):
                raise ValueError(
                    f"{where} holds no {text or repr(exc)} entry that this run reads: was it "
                    "written by another diffnas version, for another strategy, or before a "
                    "plugin's code was edited (a warning above names such a plugin)? Resume "
                    "with the code that wrote it, or delete it to restart this phase from "
                    "scratch") from None
            if not any(m in text for m in _MISFIT):
                raise
            raise ValueError(
                f"{where} does not fit the model this run rebuilds ({text.splitlines()[0]}"
                "...): was data.root pointed at other data (another number of classes, "
                "channels or another vocabulary) than the run started with, or a plugin's "
                "code edited since (a warning above names such a plugin)? Resume with its "
                "own data and the plugin code it began with, or start a new run") from None
        for cb, s in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(s)
        set_rng_state(state["rng"])


def resumed_text(what: str, loop: Loop) -> str:
    """The log line of a loop resumed from its checkpoint: how far it had come, or that
    every epoch was done (a resume of a finished run only computes its result again)."""
    if loop.epoch >= loop.epochs:
        return (f"{what}: all {loop.epochs} epochs were done earlier (checkpoint); its result "
                "is computed again")
    return f"resumed {what} after {loop.epoch} of {loop.epochs} epochs"
