"""TensorBoard logging (``logger: tensorboard``), next to the JSON-lines metrics.

Per epoch: every float metric as a scalar (``search/loss``, ``retrain/test_acc``, ...) and,
during search, softmax(alpha) of each cell type as an image (rows = edges, columns = ops)
plus the entropy of each cell type's weights. Needs the ``tensorboard`` package
(``pip install 'diffnas[tensorboard]'``); the JSON-lines files are written either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffnas.config import TENSORBOARD_MISSING, ConfigError, RunConfig
from diffnas.engine.loop import Callback, Loop

LOGGERS = ("jsonl", "tensorboard")


def summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(TENSORBOARD_MISSING) from exc
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Writes a phase's per-epoch metrics (and optionally alpha heatmaps) to ``log_dir``.

    ``arch_params`` (an :class:`~diffnas.arch.ArchParams`) adds the alpha images.
    """

    def __init__(self, log_dir: str | Path, phase: str, arch_params: Any = None) -> None:
        self.log_dir = Path(log_dir)
        self.phase = phase
        self.arch_params = arch_params
        self.writer = None
        self._writer_cls = summary_writer_class()  # fail when built, not after an epoch

    @staticmethod
    def _is_main() -> bool:
        """Under torchrun only rank 0 writes (the other ranks hold the same metrics)."""
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def on_run_start(self, loop: Loop) -> None:
        if self.writer is None and self._is_main():
            # purge_step drops events past a resumed checkpoint, as JsonLines does.
            # (epoch 0 too: a run stopped before its first checkpoint starts over)
            self.writer = self._writer_cls(str(self.log_dir), purge_step=loop.epoch)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self.on_run_start(loop)
        if self.writer is None:
            return
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.phase}/{key}", float(value), epoch)
        if loop.seconds is not None:  # the epoch's wall-clock time, as metrics.jsonl has it
            self.writer.add_scalar(f"{self.phase}/seconds", loop.seconds, epoch)
        if self.arch_params is not None:
            self._log_alphas(epoch)
        self.writer.flush()

    def _log_alphas(self, epoch: int) -> None:
        from diffnas.report.plots import alpha_snapshot_image

        for group, logits in self.arch_params.as_dict().items():
            probs = torch.softmax(logits.detach().float().cpu(), -1)
            image = alpha_snapshot_image(probs.numpy())
            self.writer.add_image(f"alphas/{group}", image, epoch, dataformats="HWC")
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean().item()
            self.writer.add_scalar(f"alphas/{group}_entropy", entropy, epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def logger_callbacks(cfg: RunConfig, phase_dir: str | Path, arch_params: Any = None
                     ) -> list[Callback]:
    """The extra logging callbacks ``cfg.logger`` asks for: none for ``jsonl`` (always
    written), a :class:`TensorBoardLogger` into ``RUN_DIR/tensorboard/<phase>`` otherwise."""
    if cfg.logger not in LOGGERS:
        raise ConfigError(f"config.logger: {cfg.logger!r} is not one of {', '.join(LOGGERS)}")
    if cfg.logger == "jsonl":
        return []
    phase_dir = Path(phase_dir)
    return [TensorBoardLogger(phase_dir.parent / "tensorboard" / phase_dir.name, phase_dir.name,
                              arch_params)]
