"""Retraining that keeps its best validation epoch, for engines that test those weights
rather than the last epoch's (graphs, plugin engines such as docs/examples' tabular one):
:class:`BestEpoch` keeps them, :class:`FullBatchTrainTask` is the loop task of a
full-batch retraining built on it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class BestEpoch:
    """Keeps a copy of the weights of the epoch with the highest validation accuracy (the
    lower loss breaks a tie) and its record; saved in the task's checkpoints, so a resumed
    retraining tests the same weights an uninterrupted one would."""

    def __init__(self) -> None:
        self.record: dict[str, float] = {"val_acc": -1.0, "val_loss": float("inf"),
                                         "epoch": -1}
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, model: nn.Module, epoch: int, acc: float, loss: float) -> bool:
        """Record this epoch if it is the best so far; returns whether it is."""
        b = self.record
        if acc > b["val_acc"] or (acc == b["val_acc"] and loss < b["val_loss"]):
            self.record = {"val_acc": acc, "val_loss": loss, "epoch": epoch}
            self.weights = copy.deepcopy(model.state_dict())
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (nothing before any epoch ended)."""
        if self.weights is not None:
            model.load_state_dict(self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.record), "best_state": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record, self.weights = dict(state["best"]), state["best_state"]


class FullBatchTrainTask:
    """A :class:`~diffnas.engine.loop.Loop` task: one Adam step per epoch on the whole
    training set (``retrain.lr``, ``weight_decay``, gradients clipped at ``grad_clip``),
    then the validation figures and the best epoch's weights (:class:`BestEpoch`); model,
    optimizer and best epoch are checkpointed. A subclass says what the training batch is
    (``train_batch``), its loss (``loss``: the loss and its stats) and how the model does
    on validation (``validate``: ``acc`` and ``loss``)."""

    def __init__(self, model: nn.Module, retrain: Any) -> None:
        self.model, self.r = model, retrain
        self.optimizer = torch.optim.Adam(model.parameters(), lr=retrain.lr,
                                          weight_decay=retrain.weight_decay)
        self.best = BestEpoch()

    def train_batch(self, epoch: int) -> Any:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterator[Any]:
        self.model.train()
        yield self.train_batch(epoch)

    def num_batches(self) -> int:
        return 1

    def step(self, batch: Any) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(batch)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
        self.optimizer.step()
        return stats

    def end_epoch(self, epoch: int) -> dict[str, float]:
        v = self.validate()
        self.best.update(self.model, epoch, v["acc"], v["loss"])
        return {"val_loss": v["loss"], "val_acc": v["acc"],
                "best_val_acc": self.best.record["val_acc"]}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                **self.best.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best.load_state_dict(state)
