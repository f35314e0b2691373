"""Data parallelism with ``torch.distributed``, launched by ``torchrun``.

Every rank holds a full replica of the weights and of the architecture parameters and
sees its slice of the same global batch (:class:`~diffnas.data.BatchLoader` shards by
rank). Whatever gradient one process would take over the global batch is then the mean
of the ranks' gradients over their equal slices, so each gradient is averaged
(:func:`all_reduce_mean`) right where it is used: weight gradients before clipping and
the SGD step, the virtual step's gradient and ``grad_w' L_val`` in the unrolled
hypergradient, and the alpha gradients before the Adam step. The search does not wrap
the supernet in ``DistributedDataParallel``: DDP hooks the parameters' own gradient
accumulators, which ``torch.autograd.grad`` and ``torch.func.functional_call`` (virtual
steps, finite differences) bypass. Retraining a fixed network uses plain DDP.

Stochastic relaxations (Gumbel samples) need the same sample on every rank: all ranks
seed torch identically, consume the global RNG identically, and :func:`sync_rng` makes
sure of it at the start of a run. :func:`assert_replicated` checks after every epoch that
the replicas have not drifted apart.

BatchNorm normalises by the batch, so with plain BN each rank normalises by its own
slice. :func:`convert_sync_batchnorm` swaps in :class:`SyncBatchNorm`, which normalises by
the statistics of the global batch on any device (PyTorch's own ``nn.SyncBatchNorm``
runs on GPUs only) and is differentiable twice.

Only rank 0 writes files: wrap writing callbacks in :class:`MainProcessOnly` and guard
other writes with :func:`is_main_process`.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from diffnas.engine.checkpoint import load_checkpoint
from diffnas.engine.loop import Callback, Loop

T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, number of processes, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# --- process group -------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables (RANK, WORLD_SIZE, ...) are set."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's environment variables.

    Without them (a plain ``python -m diffnas``) this is a single process and nothing is
    initialised. ``backend`` None: NCCL for CUDA tensors and gloo for CPU tensors (small
    CPU collectives such as metrics must work on GPU machines too). Returns the rank
    layout; idempotent."""
    if dist.is_available() and dist.is_initialized():
        return env()
    if not launched_by_torchrun():
        partial = [v for v in TORCHRUN_VARS if v in os.environ]
        if "WORLD_SIZE" in partial and int(os.environ["WORLD_SIZE"]) > 1:
            missing = sorted(set(TORCHRUN_VARS) - set(partial))
            raise RuntimeError(f"WORLD_SIZE>1 but {missing} unset: launch with torchrun")
        return DistEnv()
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)  # NCCL's default device for this rank
    if backend is None:
        gpu = torch.cuda.is_available() and dist.is_nccl_available()
        backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
    # Dynamo first: importing torch._dynamo while a group exists (any optimizer's first
    # construction does) leaks references to that group, so destroy_process_group cannot
    # free it, its gloo threads outlive the interpreter and can abort the process at exit
    # ("terminate called without an active exception", torch 2.13). Imported before the
    # group, it takes no such references.
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return env()


def shutdown(together: bool = False) -> None:
    """Leave the process group. ``together`` (a command's normal end): after a barrier, so
    no rank tears its group down while a peer is still in it (gloo can abort at exit then);
    not after an error, when a peer may never reach the barrier."""
    if is_distributed():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def planned_world_size() -> int:
    """The processes this run has, known before the group is joined too (for config
    checks): the group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if is_distributed():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def nccl_for_cuda() -> bool:
    """Whether CUDA tensors go over NCCL (which refuses two ranks on one GPU): true unless
    a group was already joined with gloo alone (init_distributed's default uses NCCL)."""
    return not is_distributed() or "nccl" in str(dist.get_backend())


def env() -> DistEnv:
    """The current rank layout (a single process when no group is initialised)."""
    if not is_distributed():
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """Rank 0, the only process that writes logs, metrics, genotypes and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: a CUDA device without an index becomes ``cuda:LOCAL_RANK``."""
    device = torch.device(device)
    if is_distributed() and device.type == "cuda" and device.index is None:
        local = env().local_rank
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local} but only {torch.cuda.device_count()} GPU(s) on this node: "
                "use torchrun --nproc_per_node at most the number of GPUs"
            )
        return torch.device(device.type, local)
    return device


def fetch_in_turn(fetch: Callable[[], None]) -> None:
    """Call ``fetch`` (download what is missing; nothing when it is there) so that no two
    processes write one file at once: rank 0 first, then, with the files still missing
    on another node's disk, each node's local rank 0; every rank waits for both turns, so
    all call this together. A fetch that fails is raised on every rank at the end of its
    turn (not left for the others to wait out the group's timeout). A single process just
    calls it."""
    if not is_distributed():
        fetch()
        return

    def turn(mine: bool) -> None:
        error = None
        if mine:
            try:
                fetch()
            except Exception as exc:  # raised on every rank below
                error = exc
        errors: list[Any] = [None] * get_world_size()
        dist.all_gather_object(errors, error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, exc = failed[0]
            if rank == get_rank():
                raise exc
            raise RuntimeError(f"rank {rank} failed to fetch the data: "
                               f"{type(exc).__name__}: {exc}") from exc

    turn(get_rank() == 0)
    turn(get_rank() != 0 and env().local_rank == 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_result(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank,
    so one rank's failure does not leave the others waiting in a collective."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # re-raised on every rank below
            error = exc
    result, error = broadcast_object((result, error))
    if error is not None:
        error.on_every_rank = True  # so leaving the group may wait for the peers
        raise error
    return result


@contextlib.contextmanager
def leave_group_on_error() -> Iterator[None]:
    """Leave the process group when the command inside raises. A group never destroyed
    keeps gloo threads alive into the interpreter's finalization, where a rank can abort
    ("terminate called without an active exception", exit code -6 in place of diffnas's
    2). An error every rank raised at once (``main_process_result``'s) leaves together,
    after a barrier; any other leaves alone, as a peer may never reach one."""
    try:
        yield
    except BaseException as exc:
        if is_distributed():
            try:
                shutdown(together=getattr(exc, "on_every_rank", False))
            except Exception:  # a peer already gone: the error below is what matters
                pass
        raise


def resume_loop(loop: Loop, ckpt: Path, resume: bool) -> bool:
    """Continue ``loop`` from the checkpoint ``ckpt`` when resuming and it exists: rank 0
    reads it, every rank loads it. Returns whether it did. The checkpoint's dict is let go
    here (held by the caller, it was a second copy of the weights for the whole run)."""
    state = main_process_result(lambda: load_checkpoint(ckpt)
                                if resume and ckpt.exists() else None)
    if state is None:
        return False
    loop.load_state_dict(state, source=ckpt)
    return True


# --- collectives on tensors ------------------------------------------------------------
def _coalesced_all_reduce_(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` over ranks in place, one collective per (device, dtype)."""
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for group in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


@torch.no_grad()
def all_reduce_mean(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Mean over ranks of each tensor (new, detached tensors; ``None`` entries stay None).

    Every rank must pass the same shapes in the same order. Identity in one process."""
    if get_world_size() == 1:
        return list(tensors)
    out = [None if t is None else t.detach().clone() for t in tensors]
    present = [t for t in out if t is not None]
    if present:
        _coalesced_all_reduce_(present)
        inv = 1.0 / get_world_size()
        for t in present:
            t.mul_(inv)
    return out


@torch.no_grad()
def average_grads_(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's ``.grad`` by its mean over ranks, in place. Parameters
    without a gradient (ops no rank used, e.g. unsampled GDAS ops) are skipped, which
    is consistent across ranks because all ranks draw the same sample."""
    if get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _coalesced_all_reduce_(grads)
        inv = 1.0 / get_world_size()
        for g in grads:
            g.mul_(inv)


def all_reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean over ranks of float metrics (each rank's values are over equal slices)."""
    if get_world_size() == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if "gloo" not in dist.get_backend():  # NCCL alone: CUDA tensors only
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    t = (t / get_world_size()).cpu()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` with rank ``src``'s values (e.g. a fresh replica's weights)."""
    if get_world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


def sync_rng(src: int = 0) -> None:
    """Give every rank the CPU (and CUDA) global RNG state of rank ``src``, so random
    relaxations (Gumbel noise, sampled ops) draw the same sample on every rank."""
    if get_world_size() == 1:
        return
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    state = broadcast_object(state, src)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@torch.no_grad()
def assert_replicated(named: dict[str, Iterable[torch.Tensor]]) -> None:
    """Raise if any named group of tensors differs between ranks (bitwise, via the min and
    max over ranks of a float64 fingerprint). Replicas that drift apart mean a gradient
    was not averaged or a rank drew a different random sample."""
    if get_world_size() == 1:
        return
    keys = list(named)
    prints = []
    for k in keys:
        ts = [t.detach().double().reshape(-1) for t in named[k]]
        flat = torch.cat(ts) if ts else torch.zeros(1, dtype=torch.float64)
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        prints.append(torch.stack([flat.sum(), (flat * weights).sum()]))
    fp = torch.cat(prints)
    finite = torch.isfinite(fp).all().to(torch.float64).reshape(1)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        raise FloatingPointError(
            f"non-finite values (NaN or inf) in {', '.join(keys)} on some rank: the run "
            "diverged (lower the learning rate or check the data), it is not a sync problem")
    lo, hi = fp.clone(), fp.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    bad = [k for i, k in enumerate(keys) if not torch.equal(lo[2 * i : 2 * i + 2],
                                                               hi[2 * i : 2 * i + 2])]
    if bad:
        raise RuntimeError(
            f"{', '.join(bad)} differ between ranks: a gradient was not averaged over ranks "
            "(see SearchStrategy.average_grads) or ranks drew different random samples"
        )


# --- synchronised batch normalisation ----------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is again a sum over ranks: the gradient of the sum
    of every rank's loss. Differentiable any number of times."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _SumOverRanks.apply(grad)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over ranks (identity in one process)."""
    return _SumOverRanks.apply(t) if get_world_size() > 1 else t


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are those of the global batch over all ranks.

    Works on any device and backend (gloo on CPU included). One collective per call: the
    per-channel sum and sum of squares, accumulated in float64. Outside a process group, or
    in eval mode with running statistics, it is exactly ``nn.BatchNorm*``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch or get_world_size() == 1:
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        dims = [0, *range(2, x.dim())]
        n_local = x.numel() // x.size(1)
        local = torch.cat([
            x.sum(dims, dtype=torch.float64),
            (x * x).sum(dims, dtype=torch.float64),
            torch.full((1,), float(n_local), dtype=torch.float64, device=x.device),
        ])
        total = sum_over_ranks(local)
        C = x.size(1)
        n = total[-1].detach()
        mean64 = total[:C] / n
        var64 = (total[C : 2 * C] / n - mean64 * mean64).clamp_min(0.0)
        if self.training and self.track_running_stats:
            m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                 else self.momentum)
            with torch.no_grad():
                unbiased = var64 * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean64.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, C] + [1] * (x.dim() - 2)
        mean = mean64.to(x.dtype).view(shape)
        inv_std = torch.rsqrt(var64 + self.eps).to(x.dtype).view(shape)
        out = (x - mean) * inv_std
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def global_batch_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Affine-free batch normalisation of ``x`` (N, C, ...) by the statistics of the global
    batch over all ranks (``F.batch_norm(x, None, None, training=True)`` of one process
    holding every rank's rows). The functional form of :class:`SyncBatchNorm` without
    parameters or running statistics (the recurrent search cell normalises every node this
    way): one all-reduce per call, float64 sums, differentiable any number of times."""
    if get_world_size() == 1:
        return nn.functional.batch_norm(x, None, None, training=True, eps=eps)
    dims = [0, *range(2, x.dim())]
    C = x.size(1)
    total = sum_over_ranks(torch.cat([
        x.sum(dims, dtype=torch.float64),
        (x * x).sum(dims, dtype=torch.float64),
        torch.full((1,), float(x.numel() // C), dtype=torch.float64, device=x.device),
    ]))
    n = total[-1].detach()
    mean64 = total[:C] / n
    var64 = (total[C : 2 * C] / n - mean64 * mean64).clamp_min(0.0)
    shape = [1, C] + [1] * (x.dim() - 2)
    return ((x - mean64.to(x.dtype).view(shape))
            * torch.rsqrt(var64 + eps).to(x.dtype).view(shape))


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``module`` by :class:`SyncBatchNorm`, keeping its
    parameters (the same tensors, so optimizers built later see the same order), running
    statistics and settings. Returns the module (a new one if ``module`` is itself BN)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module,
                                                                              SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# --- retraining ----------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` in a process group, else ``model`` itself. A
    network that runs NHWC (``channels_last``) gets NHWC weights first: its convolutions
    return NHWC weight gradients, which DDP copied into NCHW buckets each step (the stem's)
    with torch's "Grad strides do not match bucket view strides" warning on every rank.
    That warning is silenced: what is left of it are 1x1 and depthwise weights, NCHW and
    NHWC at once (their strides differ in size-1 dimensions only, the same memory order)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if getattr(model, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (checkpoints hold its state, without ``module.``)."""
    return getattr(model, "module", model)


# --- callbacks -------------------------------------------------------------------------------
class MainProcessOnly(Callback):
    """Runs the wrapped callback's hooks on rank 0 only (writers: metrics, checkpoints,
    progress). Its state still travels through the checkpoint on every rank, so callback
    lists stay aligned between ranks and on resume."""

    def __init__(self, inner: Callback) -> None:
        self.inner = inner

    def on_run_start(self, loop: Loop) -> None:
        if is_main_process():
            self.inner.on_run_start(loop)

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if is_main_process():
            self.inner.on_epoch_start(loop, epoch)

    def on_step_end(self, loop: Loop, step: int, metrics: dict[str, float]) -> None:
        if is_main_process():
            self.inner.on_step_end(loop, step, metrics)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if is_main_process():
            self.inner.on_epoch_end(loop, epoch, metrics)

    def on_run_end(self, loop: Loop) -> None:
        if is_main_process():
            self.inner.on_run_end(loop)

    def close(self) -> None:
        self.inner.close()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def main_process_only(callbacks: Iterable[Callback]) -> list[Callback]:
    return [MainProcessOnly(cb) for cb in callbacks]
