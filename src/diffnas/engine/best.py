"""The weights of a retraining's best validation epoch, for engines that test those
rather than the last epoch's (graphs, plugin engines such as docs/examples' tabular one).
"""

from __future__ import annotations

import copy
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
