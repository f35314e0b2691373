"""A search step captured once as a CUDA graph and replayed (GPU searches).

A DARTS supernet step launches tens of thousands of small kernels, and on a GPU the host's
cost of launching them, not the arithmetic, bounds the step (benchmarks/README.md: the GPU
is idle a third of a step even with torch.compile). Captured as one CUDA graph, a step is
one launch: inputs are copied into fixed buffers, the graph replays every kernel of the
alpha step, the weight step and both optimizers, and the metrics are read back once.

What must hold (checked where it can be): the step's batch shapes repeat (one graph per
shape, ``max_graphs`` kept), it makes no host sync while captured (objectives return
tensor metrics then, ``strategies/objective.py``), and its Python-side state does not
change between replays except through the optimizers' learning rates (a new rate
re-captures). Strategies that sample on the host or branch on values (GDAS, zero-order,
mean-shift...) declare ``graph_safe = False`` and are refused.
"""

from __future__ import annotations

import gc
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from diffnas.strategies.objective import check_finite_loss

Step = Callable[[Any, Any], dict[str, Any]]


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Switch an Adam-family optimizer to its capturable form (its step counter lives on
    the device, so a replayed graph advances it); other optimizers are left as they are."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = True
    for p, state in optimizer.state.items():
        step = state.get("step")
        if torch.is_tensor(step) and step.device != p.device:
            state["step"] = step.to(device=p.device, dtype=torch.float32)


class GraphedStep:
    """``step(train_batch, val_batch) -> stats``, run eagerly for ``warmup`` calls per
    batch shape (cuDNN autotuning, lazy state, torch.compile), then captured and replayed.

    Every call is one real step on its own batch: the capture records without running, and
    the step is then replayed on the call's batch. Metrics come back as floats; a
    non-finite loss raises ``FloatingPointError`` as in an eager step, but only after the
    replay, when the optimizers have already stepped: the weights and alphas in memory are
    then invalid, and the run continues from its last checkpoint (``--resume``)."""

    def __init__(
        self, step: Step, optimizers: Sequence[torch.optim.Optimizer], warmup: int = 2,
        max_graphs: int = 2,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; this machine has none")
        if warmup < 1:
            raise ValueError(f"cuda graph warmup must be at least 1 step, got {warmup}")
        self.step, self.optimizers = step, list(optimizers)
        self.warmup, self.max_graphs = warmup, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.seen: dict[tuple, int] = {}
        self.side = torch.cuda.Stream()
        self.replays = 0
        for opt in self.optimizers:
            make_capturable(opt)

    def _key(self, train: Any, val: Any) -> tuple:
        lrs = tuple(float(g["lr"]) for opt in self.optimizers for g in opt.param_groups)
        return (_signature(train), _signature(val), lrs)

    def __call__(self, train: Any, val: Any) -> dict[str, float]:
        key = self._key(train, val)
        _check_device(train)
        _check_device(val)
        if key not in self.graphs:
            shape_key = key[:2]
            if self.seen.get(shape_key, 0) < self.warmup:
                self.seen[shape_key] = self.seen.get(shape_key, 0) + 1
                return self._eager(train, val)
            self._capture(key, train, val)
        captured = self.graphs[key]
        self.graphs.move_to_end(key)
        captured.load(train, val)
        captured.graph.replay()
        self.replays += 1
        return _read_stats(captured.stats)

    def _eager(self, train: Any, val: Any) -> dict[str, float]:
        for opt in self.optimizers:  # again: a resumed checkpoint may have reset it
            make_capturable(opt)
        # warm-up off the default stream, as torch's CUDA graph notes ask
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            stats = self.step(train, val)
        torch.cuda.current_stream().wait_stream(self.side)
        return _read_stats(stats)

    def _capture(self, key: tuple, train: Any, val: Any) -> None:
        for old in [k for k in self.graphs if k[:2] == key[:2]]:
            del self.graphs[old]  # the same shapes at an old learning rate: not replayed again
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static_train, static_val = _clone(train), _clone(val)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)  # the graph allocates and owns the gradients
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-up's cached blocks: not usable by a graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.side):
            stats = self.step(static_train, static_val)
        self.graphs[key] = _Captured(graph, static_train, static_val, stats)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, train: Any, val: Any,
                 stats: dict[str, Any]) -> None:
        self.graph, self.train, self.val, self.stats = graph, train, val, stats

    def load(self, train: Any, val: Any) -> None:
        _copy(self.train, train)
        _copy(self.val, val)


def _signature(batch: Any) -> Any:
    if torch.is_tensor(batch):
        return (tuple(batch.shape), batch.dtype, str(batch.device))
    if isinstance(batch, tuple | list):
        return tuple(_signature(b) for b in batch)
    if batch is None:
        return None
    raise TypeError(f"a CUDA graph step takes tensors or tuples of tensors, got {type(batch)}")


def _check_device(batch: Any) -> None:
    if torch.is_tensor(batch) and not batch.is_cuda:
        raise ValueError("a CUDA graph step needs its batches on the GPU "
                         f"(got a tensor on {batch.device})")
    if isinstance(batch, tuple | list):
        for b in batch:
            _check_device(b)


def _clone(batch: Any) -> Any:
    if torch.is_tensor(batch):
        return batch.clone()
    if isinstance(batch, tuple | list):
        return type(batch)(_clone(b) for b in batch)
    return batch


def _copy(dst: Any, src: Any) -> None:
    if torch.is_tensor(dst):
        dst.copy_(src, non_blocking=True)
    elif isinstance(dst, tuple | list):
        for d, s in zip(dst, src, strict=True):
            _copy(d, s)


def _read_stats(stats: dict[str, Any]) -> dict[str, float]:
    """Floats of a step's metrics, one host sync for all; a non-finite loss raises."""
    keys = [k for k, v in stats.items() if torch.is_tensor(v)]
    values = (torch.stack([stats[k].detach().float().reshape(()) for k in keys]).tolist()
              if keys else [])
    out = {k: float(v) for k, v in stats.items() if not torch.is_tensor(v)}
    out.update(zip(keys, values, strict=True))
    for k, v in out.items():
        if k.endswith("loss") and not math.isfinite(v):
            check_finite_loss(v)
    return out
