"""Leaving the process group frees it: no gloo thread outlives ``dp.shutdown``.

A gloo thread still alive when the interpreter finalizes can be destroying a finished
collective's work, whose tensors need the GIL; Python then ends that thread mid C++
destructor and the rank aborts at exit ("terminate called without an active exception")
after all its work is done. torch 2.13 keeps the group alive past
``destroy_process_group`` when ``torch._dynamo`` is first imported while the group exists
(any optimizer's construction imports it), so ``init_distributed`` imports it first.

This module must not import torch._dynamo itself: the spawned ranks import it, and the
first import has to happen inside the worker, after the group is joined, as in a real run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from ranks import join_ranks, load_rank, save_rank, spawn_ranks

from diffnas.engine import distributed as dp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="counts this process's threads in /proc/self/task")


def _threads() -> list[str]:
    """Names of this process's native threads (Python's and the libraries' alike)."""
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip()
                  for t in os.listdir("/proc/self/task"))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    before = _threads()
    first_dynamo_import = "torch._dynamo" not in sys.modules  # by joining or the optimizer
    join_ranks(rank, world, port)
    joined = _threads()
    try:
        w = torch.nn.Parameter(torch.full((3,), float(rank)))
        opt = torch.optim.SGD([w], lr=1.0)  # the first optimizer imports torch._dynamo
        w.grad = torch.ones(3)
        opt.step()
        dp.broadcast_([w])
        total = torch.ones(1)
        torch.distributed.all_reduce(total)
    except BaseException:
        dp.shutdown()  # not together: the peer may never reach the barrier
        raise
    dp.shutdown(together=True)  # as a command ends
    save_rank({"before": before, "joined": joined, "after": _threads(),
               "first_dynamo_import": first_dynamo_import, "w": w.detach(),
               "total": float(total)}, out, rank)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp_exit"))


@pytest.mark.parametrize("rank", [0, 1])
def test_shutdown_joins_every_thread_the_group_started(spawned, rank):
    r = load_rank(spawned, rank)
    assert r["first_dynamo_import"], "torch._dynamo was imported before the worker ran"
    assert len(r["joined"]) > len(r["before"]), "joining started no thread: nothing tested"
    assert r["after"] == r["before"], (
        f"threads left after dp.shutdown: {sorted(set(r['after']) - set(r['before']))}")
    # the collectives ran: rank 0's stepped weights everywhere, the sum over both ranks
    assert torch.equal(r["w"], torch.full((3,), -1.0))
    assert r["total"] == 2.0


def _refused_worker(rank: int, world: int, port: int, out: str) -> None:
    from diffnas.cli import main

    before = _threads()
    join_ranks(rank, world, port)  # torchrun's environment and group, as `search` finds them
    os.chdir(out)
    rc = main(["search", "data.batch_size=9"])  # rank 0 refuses it; every rank hears it
    save_rank({"rc": rc, "in_group": dp.is_distributed(), "before": before,
               "after": _threads()}, out, rank)


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> Path:
    return spawn_ranks(_refused_worker, tmp_path_factory.mktemp("ddp_refused"))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_refused_command_leaves_the_group(refused, rank):
    """A command refused under torchrun leaves the group as it fails: a group never
    destroyed let a rank abort at exit with -6 in place of diffnas's exit code 2."""
    r = load_rank(refused, rank)
    assert r["rc"] == 2
    assert not r["in_group"], "the refused command left this rank in the process group"
    assert r["after"] == r["before"], (
        f"threads left after the refusal: {sorted(set(r['after']) - set(r['before']))}")
    assert not (refused / "runs").exists()  # refused before a run directory
