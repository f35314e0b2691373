"""Shared by the data-parallel tests: spawn gloo ranks once, each saving what it computed
to ``out/rank{r}.pt``, and load what a rank saved."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable[[int, int, int, str], None], out: Path, world: int = 2) -> Path:
    """Run ``worker(rank, world, port, out)`` in ``world`` fresh processes; return ``out``."""
    mp.start_processes(worker, args=(world, free_port(), str(out)), nprocs=world,
                       start_method="spawn")
    return out


def load_rank(out: Path, rank: int) -> dict:
    """What rank ``rank`` saved."""
    return torch.load(out / f"rank{rank}.pt", weights_only=False)
