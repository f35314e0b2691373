"""Retraining a genotype from scratch and reporting accuracy, parameters and MACs."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffnas.config import ConfigError, RetrainConfig, RunConfig
from diffnas.data import Augment, BatchLoader, ImageData, load_dataset
from diffnas.engine import distributed as dp
from diffnas.engine.callbacks import Checkpoint, MetricsLines, ProgressBar
from diffnas.engine.checkpoint import (
    atomic_save,
    atomic_write_text,
    seed_everything,
)
from diffnas.engine.loop import Callback, Loop, resumed_text
from diffnas.engine.rundir import (
    check_same_data,
    pin_genotype,
    resolve_device,
    retrain_command,
    test_subset_seed,
)
from diffnas.engine.tensorboard import logger_callbacks
from diffnas.genotype import Genotype
from diffnas.report.cost import count_macs, count_parameters
from diffnas.spaces import DataShape, SearchSpace, create_space

log = logging.getLogger("diffnas")


def retrain_dir(run_dir: str | Path, genotype: Genotype, resume: bool) -> Path:
    """``run_dir/retrain``, created, with ``genotype`` pinned in its ``genotype.json`` (a
    resume with another genotype is refused: ``rundir.pin_genotype``)."""
    out = Path(run_dir) / "retrain"
    out.mkdir(parents=True, exist_ok=True)
    pin_genotype(out, genotype, resume)
    return out


def run_retrain_loop(task: Any, cfg: RunConfig, out: Path, resume: bool,
                     stop_after: int | None = None, what: str = "retraining"
                     ) -> tuple[Loop, list[dict[str, Any]]]:
    """What a one-process retraining does around its loop (the graph engine, plugin
    engines): ``cfg.retrain.epochs`` epochs of ``task`` with the progress bar,
    ``out/metrics.jsonl``, the loggers ``cfg.logger`` asks for and an atomic
    ``out/checkpoint.pt`` per epoch, resumed from that checkpoint when asked; ``stop_after``
    ends it after that many epochs, as an interrupted run would. Returns the loop (its
    ``epoch``: epochs done) and the history."""
    ckpt = out / "checkpoint.pt"
    loop = Loop(task, cfg.retrain.epochs, [ProgressBar("retrain", cfg.progress),
                                           MetricsLines(out / "metrics.jsonl"),
                                           *logger_callbacks(cfg, out), Checkpoint(ckpt)])
    if dp.resume_loop(loop, ckpt, resume):
        log.info(resumed_text(what, loop))
    return loop, loop.run(stop_after=stop_after)


def save_retrain_result(out: Path, model: nn.Module, result: dict[str, Any]) -> None:
    """The retrained weights (``out/model.pt``) and ``out/result.json`` (what ``diffnas
    report`` and ``--seeds`` summaries read), each written atomically."""
    atomic_save(model.state_dict(), out / "model.pt")
    atomic_write_text(json.dumps(result, indent=1) + "\n", out / "result.json")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable) -> dict[str, float]:
    """Mean loss and accuracy over ``loader`` in eval mode."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for x, y in loader:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
    return {"test_loss": loss_sum / max(total, 1), "test_acc": correct / max(total, 1)}


def check_retrain_batch(cfg: RunConfig, n_images: int | None, always: bool = False) -> None:
    """Refuse a ``retrain.batch_size`` larger than the images the retraining will train on
    (before a search, which the loop found only after the whole search, and a ``--resume``
    cannot change ``retrain.*``). ``n_images``: the dataset's training images, None where
    unknown; ``always``: ``diffnas train``, which retrains whatever ``retrain.enabled``
    says."""
    r = cfg.retrain
    if not (r.enabled or always) or n_images is None:
        return
    n_retrain = min(n_images, r.train_subset or n_images)
    if r.batch_size > n_retrain:
        started = "" if always else " (the search has not started)"
        raise ConfigError(
            f"retrain.batch_size={r.batch_size} exceeds the {n_retrain} training images the "
            "retraining would use: no complete batch (incomplete ones are dropped); lower "
            f"retrain.batch_size{started}")


def check_augment_fits(cfg: RunConfig, side: int | None, always: bool = False,
                       run_dir: str | Path | None = None) -> None:
    """Refuse retraining augmentation as large as the images (before a search, where
    ``side`` is known without loading them): a cutout square that large erases more than
    half of an image on average and all of it at some centres (the default 16 on 8x8
    digits erased every image, and the retraining learned nothing), and a crop padding
    that large makes crops of padding alone. ``side``: the images' side, None where
    unknown; ``always``: ``diffnas train``, which retrains whatever ``retrain.enabled``
    says; ``run_dir``: a run whose search is done, whose genotype the message says how to
    retrain."""
    r = cfg.retrain
    if not (r.enabled or always) or side is None:
        return
    for key, why, darts, fix in (
            ("cutout", "a cutout square that large erases more than half of an image on "
             "average, all of it at some centres", "DARTS erases half the side (16 of "
             "CIFAR-10's 32)", side // 2),
            ("crop_padding", "some random crops would hold padding alone",
             "DARTS pads an eighth of the side (4 of 32)", max(1, side // 8))):
        if getattr(r, key) >= side:
            hint = "" if run_dir is None else kept_genotype_hint(
                run_dir, "other augmentation", f"retrain.{key}={fix}")
            raise ConfigError(
                f"retrain.{key}={getattr(r, key)} is not smaller than the {side}x{side} "
                f"training images: {why}; {darts}: retrain.{key}={fix}, or 0 for none"
                f"{hint}")


def no_full_batch_hint(run_dir: str | Path, batches: int) -> str:
    """What to do when the retraining has no full batch after a search: the genotype is
    kept, and ``diffnas train`` retrains it with other retrain settings."""
    return "" if batches else kept_genotype_hint(run_dir, "a smaller batch",
                                                 "retrain.batch_size=N")


def kept_genotype_hint(run_dir: str | Path, what: str, setting: str) -> str:
    """The end of a retraining refusal after a search: its genotype is kept, and
    ``diffnas train`` retrains it, as a new run, with ``setting`` changed ("" when the
    search wrote no genotype)."""
    command = retrain_command(run_dir)
    if command is None:
        return ""
    return (f"; the search's genotype is kept: retrain it with {what}, as a new run beside "
            f"this one: {command} {setting}")


class TrainTask:
    """Supervised training of a fixed network (SGD, cosine schedule, auxiliary loss).
    ``model`` may be wrapped in DistributedDataParallel; state and evaluation use the
    module inside, so checkpoints load with or without DDP."""

    batch_setting = "retrain.batch_size"  # named when the data holds no full batch

    def __init__(
        self, model: nn.Module, train: BatchLoader, test: BatchLoader, cfg: RetrainConfig
    ) -> None:
        self.model, self.train, self.test, self.cfg = model, train, test, cfg
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.lr_min
        )

    def batches(self, epoch: int) -> Iterable[Any]:
        self.model.train()
        self.train.set_epoch(epoch)
        return iter(self.train)

    def num_batches(self) -> int:
        return len(self.train)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        main = F.cross_entropy(logits, y)
        # ``loss`` is the main head's cross-entropy, comparable with ``test_loss``; the
        # auxiliary head's (trained with weight retrain.auxiliary_weight) is ``aux_loss``
        stats = {"loss": main.item()}
        loss = main
        if aux is not None:
            aux_loss = F.cross_entropy(aux, y)
            loss = loss + self.cfg.auxiliary_weight * aux_loss
            stats["aux_loss"] = aux_loss.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"retrain loss is {loss.item()}: lower retrain.lr?")
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        stats["acc"] = (logits.argmax(-1) == y).float().mean().item()
        return dp.all_reduce_metrics(stats)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        result = evaluate_replicated(self.model, self.test)
        # diverged weights are not checkpointed: the last good checkpoint stays the one a
        # resume (or a look at the run) finds
        if math.isnan(result["test_loss"]) or not all(
                torch.isfinite(p).all() for p in self.model.parameters()):
            raise FloatingPointError(
                f"retrain epoch {epoch + 1}: the weights diverged (test loss "
                f"{result['test_loss']}) at retrain.lr={lr:g}; lower retrain.lr?")
        return {"lr": lr, **result}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": dp.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dp.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DropPathSchedule(Callback):
    """Drop-path probability rising linearly from 0 to ``final`` over the epochs."""

    def __init__(self, model: nn.Module, final: float) -> None:
        self.model, self.final = model, final
        if final > 0 and not hasattr(model, "drop_path_prob"):  # (a plugin space's network)
            log.warning("retrain.drop_path=%g does nothing: the %s network has no "
                        "drop_path_prob attribute (set retrain.drop_path=0 to say so)", final,
                        type(model).__name__)

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if hasattr(self.model, "drop_path_prob"):
            self.model.drop_path_prob = self.final * epoch / max(loop.epochs, 1)


def evaluate_replicated(model: nn.Module, test: Iterable) -> dict[str, float]:
    """:func:`evaluate` of a (possibly DDP-wrapped) model on every rank, with rank 0's
    buffers: without ``sync_bn`` each rank's BatchNorm statistics come from its own slice
    of the last batches, so every rank now reports what rank 0 (which saves the model)
    measures. DDP itself copies rank 0's buffers at the next training forward anyway."""
    net = dp.unwrap(model)
    dp.broadcast_(net.buffers())
    return evaluate(net, test)


def build_network(
    cfg: RunConfig, genotype: Genotype, shape: DataShape
) -> tuple[SearchSpace, nn.Module]:
    space = create_space(cfg.search.space, shape)
    return space, space.build_network(genotype, **cfg.retrain.image_network())


def network_summary(model: nn.Module, shape: DataShape) -> dict[str, int]:
    return {
        "params": count_parameters(model),
        "macs": count_macs(model, (shape.in_channels, shape.resolution, shape.resolution)),
    }


def run_retrain(
    cfg: RunConfig,
    genotype: Genotype,
    run_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    data: ImageData | None = None,
) -> dict[str, Any]:
    """Train ``genotype`` from scratch as ``cfg.retrain`` says; writes ``run_dir/retrain``."""
    out = Path(run_dir) / "retrain"
    rank = dp.env()

    def open_dir() -> None:  # rank 0 alone touches the run directory; its refusal of
        out.mkdir(parents=True, exist_ok=True)  # another genotype reaches every rank
        pin_genotype(out, genotype, resume)

    dp.main_process_result(open_dir)
    r, d = cfg.retrain, cfg.data
    device = dp.rank_device(resolve_device(cfg.device))
    data = data or load_dataset(
        d.name, d.root, d.download, d.resolution, r.train_subset, d.test_subset, cfg.seed,
        dp.main_process_result(test_subset_seed, run_dir, cfg.seed),  # rank 0 reads the dir
    )
    dp.main_process_result(check_same_data, out, data, resume)  # a resume on other data
    # (a plugin's dataset shows its side only now, after the search)
    check_augment_fits(cfg, data.resolution, always=True, run_dir=run_dir)
    shape = DataShape(data.in_channels, data.resolution, data.num_classes)
    seed_everything(cfg.seed)
    _, model = build_network(cfg, genotype, shape)
    model = model.to(device)
    summary = network_summary(model, shape)
    if cfg.distributed.sync_bn:
        model = dp.convert_sync_batchnorm(model)
    log.info(
        "retrain: %s params (without auxiliary head), %.2f M MACs",
        f"{summary['params']:,}",
        summary["macs"] / 1e6,
    )
    augment = Augment(r.crop_padding, r.flip, r.cutout, data.black)
    train = BatchLoader(
        data.train_x,
        data.train_y,
        r.batch_size,
        seed=cfg.seed,
        augment=augment,
        device=device,
        drop_last=True,
        rank=rank.rank,
        world_size=rank.world_size,
    )
    test = BatchLoader(data.test_x, data.test_y, 256, shuffle=False, device=device)
    task = TrainTask(dp.wrap_ddp(model, device), train, test, r)
    loop = Loop(
        task,
        r.epochs,
        [
            DropPathSchedule(model, r.drop_path),
            *dp.main_process_only(
                [
                    ProgressBar("retrain", cfg.progress),
                    MetricsLines(out / "metrics.jsonl"),
                ]
            ),
            *logger_callbacks(cfg, out),  # before the checkpoint, as every writer
            *dp.main_process_only([Checkpoint(out / "checkpoint.pt")]),
        ],
    )
    if dp.resume_loop(loop, out / "checkpoint.pt", resume):
        log.info(resumed_text("retraining", loop))
    try:
        history = loop.run(stop_after=stop_after)
    except ValueError as exc:  # no full batch: say how to use the search's genotype
        hint = no_full_batch_hint(run_dir, task.num_batches())
        if not hint:
            raise
        raise ConfigError(f"{exc}{hint}") from None
    final = evaluate_replicated(model, test)
    result = {
        "genotype": genotype.to_dict(),
        **summary,
        "epochs_done": loop.epoch,
        "test_acc": final["test_acc"],
        "test_loss": final["test_loss"],
        "data": data.describe(),  # input normalisation and class names, for deployment
        "history": history,
    }
    if rank.is_main:  # result.json last: it marks the retraining finished (multiseed)
        atomic_save(model.state_dict(), out / "model.pt")
        atomic_write_text(json.dumps(result, indent=1) + "\n", out / "result.json")
    dp.barrier()
    return result
