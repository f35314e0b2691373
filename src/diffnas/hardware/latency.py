"""Measured latency of networks on the current device, and a fingerprint of that device.

Timing rules, so numbers are comparable across runs: inference mode and eval mode, a
fixed thread count on CPU (restored afterwards), synchronisation before and after every
timed call on CUDA (kernels are asynchronous; without it one times the launch), warm-up
calls first, and the median of repeats. The clock is wall time (``clock="wall"``, the
default), or, for single-threaded CPU inference on a shared machine, the CPU time of the
calling thread (``clock="thread"``): time spent waiting for a core that other processes
hold is then not counted, so the number is the latency on an unloaded core.
:func:`measure_many` interleaves the models
(a new random order each round) so that a burst of load from a neighbouring process
spreads over all models instead of inflating one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


@dataclass
class LatencySettings:
    """How latency is measured. ``threads`` applies to CPU only (0 = leave as is);
    ``clock``: ``wall`` or ``thread`` (CPU time of the calling thread; CPU, 1 thread)."""

    batch_size: int = 1
    warmup: int = 3
    repeats: int = 15
    threads: int = 1
    calls_per_sample: int = 1  # forward calls averaged inside one timed sample
    clock: str = "wall"

    def __post_init__(self) -> None:
        for name in ("batch_size", "repeats", "calls_per_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"latency {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError("latency warmup and threads must be >= 0")
        if self.clock not in CLOCKS:
            raise ValueError(f"latency clock must be one of {sorted(CLOCKS)}, got {self.clock!r}")
        if self.clock == "thread" and self.threads != 1:
            raise ValueError("clock='thread' times one thread: it needs threads=1")


@dataclass
class LatencyStats:
    """Median and quartiles (milliseconds) of the timed samples (kept in timing order)."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    samples_ms: list[float] = field(repr=False)

    @classmethod
    def from_samples(cls, samples_s: Sequence[float]) -> LatencyStats:
        ms = [1000.0 * s for s in samples_s]
        if len(ms) == 1:
            return cls(ms[0], ms[0], ms[0], ms)
        q = statistics.quantiles(ms, n=4, method="inclusive")
        return cls(statistics.median(ms), q[0], q[2], ms)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for queued work on ``device`` to finish (nothing to do on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (0: unchanged), then restore."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def time_call(fn: Callable[[], object], sync: Callable[[], None], calls: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` averaged over ``calls``, synchronised before and after."""
    sync()
    t0 = clock()
    for _ in range(calls):
        fn()
    sync()
    return (clock() - t0) / calls


def measure_many(
    models: Sequence[nn.Module], input_shape: tuple[int, ...],
    settings: LatencySettings | None = None, seed: int = 0,
) -> list[LatencyStats]:
    """Latency of each model on an input of ``(batch_size, *input_shape)``, measured in
    interleaved rounds (one sample of every model per round, in a shuffled order)."""
    s = settings or LatencySettings()
    rng = random.Random(seed)
    prepared = []
    for m in models:  # every model is checked before any is put in eval mode
        dev = _device_of(m)
        if s.clock == "thread" and dev.type != "cpu":
            raise ValueError(f"clock='thread' only measures CPU work; the model is on {dev}")
    for m in models:
        was = m.training
        m.eval()
        dev = _device_of(m)
        p = next(iter(m.parameters()), None)
        dtype = p.dtype if p is not None else torch.get_default_dtype()
        x = torch.randn(s.batch_size, *input_shape, device=dev, dtype=dtype)
        prepared.append((m, x, synchronizer(dev), was))
    samples: list[list[float]] = [[] for _ in models]
    try:
        with torch_threads(s.threads), torch.inference_mode():
            for m, x, sync, _ in prepared:
                for _ in range(s.warmup):
                    time_call(lambda m=m, x=x: m(x), sync)
            order = list(range(len(prepared)))
            for _ in range(s.repeats):
                rng.shuffle(order)
                for i in order:
                    m, x, sync, _ = prepared[i]
                    samples[i].append(time_call(lambda m=m, x=x: m(x), sync, s.calls_per_sample,
                                                CLOCKS[s.clock]))
    finally:
        for m, _, _, was in prepared:
            m.train(was)
    return [LatencyStats.from_samples(v) for v in samples]


def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], settings: LatencySettings | None = None
) -> LatencyStats:
    """Latency of one model (see :func:`measure_many` for the rules)."""
    return measure_many([model], input_shape, settings)[0]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: torch.device | str = "cpu", threads: int = 1) -> dict:
    """What identifies the hardware and software a latency was measured on. ``id`` hashes
    the fields that change latencies (not the load, which is recorded separately);
    ``threads`` 0 (left as the environment set them) is recorded as the count in use."""
    device = torch.device(device)
    fp = {
        "device": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": (threads or torch.get_num_threads()) if device.type == "cpu" else None,
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    fp["id"] = hashlib.sha1(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]
    return fp


def load_average() -> float | None:
    """One-minute load average (how busy the machine was while measuring)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def settings_dict(s: LatencySettings) -> dict:
    return asdict(s)
