"""Callbacks shared by search and retraining: progress bar, metrics, checkpoints."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffnas.engine.checkpoint import atomic_save
from diffnas.engine.loop import Callback, Loop

log = logging.getLogger("diffnas")


class ProgressBar(Callback):
    """A bar per epoch showing the running loss and accuracy."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar = None

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if self.enabled:
            self.bar = tqdm(
                total=loop.task.num_batches(),
                desc=f"{self.desc} {epoch + 1}/{loop.epochs}",
                leave=False,
                dynamic_ncols=True,
            )

    def on_step_end(self, loop: Loop, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            m = loop.running.value()
            shown = {k: f"{m[k]:.3f}" for k in ("loss", "acc", "val_loss", "val_acc") if k in m}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        log.info("%s epoch %d/%d %s", self.desc, epoch + 1, loop.epochs, shown)


class JsonLines(Callback):
    """Appends each epoch's metrics to a JSON-lines file. On resume, lines of epochs past
    the checkpoint (written after it, before a crash) are dropped first."""

    def __init__(self, path: Path, record: Callable[[Loop, int, dict], dict] | None = None) -> None:
        self.path = Path(path)
        self.record = record

    def on_run_start(self, loop: Loop) -> None:
        if self.path.exists():
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln).get("epoch", -1) < loop.epoch
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        row = (
            metrics
            if self.record is None
            else {"epoch": epoch, **self.record(loop, epoch, metrics)}
        )
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class Checkpoint(Callback):
    """Saves the whole loop state atomically after every epoch."""

    def __init__(self, path: Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if (epoch + 1) % self.every == 0 or loop.epoch >= loop.epochs:
            atomic_save(loop.state_dict(), self.path)
