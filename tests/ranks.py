"""Shared by the data-parallel tests: spawn gloo ranks once, each saving what it computed
to ``out/rank{r}.pt``, and load what a rank saved."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
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


# --- in a spawned rank ---------------------------------------------------------------------
def join_ranks(rank: int, world: int, port: int, audit_out: str | None = None) -> None:
    """Set the environment torchrun would set for ``rank``, one thread, and (with
    ``audit_out``) log every file this rank touches under ``audit_out/runs``; then join."""
    from diffnas.engine import distributed as dp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if audit_out is not None:
        os.environ.update(DIFFNAS_AUDIT_ROOT=f"{audit_out}/runs",
                          DIFFNAS_AUDIT_LOG=f"{audit_out}/audit")
        exec(textwrap.dedent(AUDIT), {})  # what the sitecustomize does under torchrun
    torch.set_num_threads(1)
    assert dp.init_distributed().world_size == world


def save_rank(found: dict, out: str, rank: int) -> None:
    """What this rank computed, for the tests to compare."""
    torch.save(found, f"{out}/rank{rank}.pt")


# --- torchrun end to end: who touches the run directory --------------------------------------
AUDIT = '''
import os
_root, _log = os.environ.get("DIFFNAS_AUDIT_ROOT"), os.environ.get("DIFFNAS_AUDIT_LOG")
if _root and _log and "LOCAL_RANK" in os.environ:
    _fd = os.open(_log + ".rank" + os.environ["RANK"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _root = os.path.abspath(_root) + os.sep
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _EVENTS = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate",
               "tempfile.mkstemp")

    def _hook(event, args):
        if event == "open":
            paths, mode, flags = [args[0]], args[1], args[2]
            write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and bool(flags & _W))
        elif event in _EVENTS:
            paths, write = list(args[:2]) if event == "os.rename" else [args[0]], True
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.abspath(os.fsdecode(p))
                if p.startswith(_root):
                    os.write(_fd, f"{'w' if write else 'r'} {event} {p}\\n".encode())

    import sys
    sys.addaudithook(_hook)
'''


def audited_env(tmp_path: Path, runs: Path) -> dict[str, str]:
    """The environment for a torchrun whose ranks log what they touch under ``runs``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",
            "DIFFNAS_AUDIT_ROOT": str(runs), "DIFFNAS_AUDIT_LOG": str(tmp_path / "audit")}


def torchrun_search(args: list[str]) -> list[str]:
    """The command line of `torchrun --nproc_per_node 2 -m diffnas search ARGS`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", "2", "-m", "diffnas", "search", *args]


def run_torchrun(args: list[str], env: dict, timeout: float = 600
                 ) -> subprocess.CompletedProcess:
    """Run ``torchrun_search(args)`` to the end, output captured. On ``timeout`` the whole
    process group is killed (``subprocess.run`` would kill torchrun alone and leave its
    ranks running, blocking later distributed tests), then TimeoutExpired is raised."""
    proc = subprocess.Popen(torchrun_search(args), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = _descendants(proc.pid)  # torchrun may start its ranks in their own session
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The pids below ``pid`` in the process tree (read from /proc; empty elsewhere)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, p in parent.items() if p == here]
        found += kids
        todo += kids
    return found


def assert_rank0_only(audit: Path) -> set[str]:
    """Rank 1 left no trace in the run directory, rank 0 did (so the hook was live); the
    names of the files rank 0 wrote."""
    rank0 = Path(f"{audit}.rank0").read_text().splitlines()
    rank1 = Path(f"{audit}.rank1").read_text().splitlines()
    assert any(line.startswith("w ") for line in rank0), rank0
    assert rank1 == [], rank1[:5]
    return {Path(line.split(" ", 2)[2]).name for line in rank0 if line.startswith("w ")}
