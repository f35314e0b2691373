"""One process per run directory, and --seeds workers that never outlive their parent.

Before: a second ``--resume`` of a running run (or a ``--seeds --resume`` while workers of
an earlier call, orphaned by SIGTERM to their parent, still ran) wrote the same run, and
its metrics held duplicated, out-of-order rows.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import locked_elsewhere
from test_run_robustness import TINY, TINY_TRAIN

from diffnas.cli import main
from diffnas.config import load_config
from diffnas.engine import multiseed as ms
from diffnas.engine.runlock import (
    LOCK_FILE,
    RunInUseError,
    acquire_run_lock,
    lock_scope,
    release_run_lock,
    run_lock,
)
from diffnas.engine.signals import raise_terminated


def test_locks_are_reentrant_and_freed_by_the_last_release(tmp_path):
    acquire_run_lock(tmp_path)
    with run_lock(tmp_path):  # a search, then its retraining, in one process
        assert locked_elsewhere(tmp_path)
    assert locked_elsewhere(tmp_path)  # the outer hold remains
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    release_run_lock(tmp_path)
    assert not locked_elsewhere(tmp_path)
    with lock_scope():  # what cli.main does around a command
        acquire_run_lock(tmp_path)
        acquire_run_lock(tmp_path)
    assert not locked_elsewhere(tmp_path)


def _hold_in_subprocess(run: Path) -> subprocess.Popen:
    code = ("import sys, time; from diffnas.engine.runlock import acquire_run_lock; "
            "acquire_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", ["search", "train"])
def test_a_run_in_use_is_refused_and_free_again_when_its_process_dies(tmp_path, capsys,
                                                                      command):
    if command == "search":
        assert main(["search", f"out_dir={tmp_path}", "name=a", *TINY]) == 0
        phase = "search"
    else:
        assert main(["train", "--genotype", "DARTS_V2", *TINY_TRAIN, f"out_dir={tmp_path}",
                     "name=a"]) == 0
        phase = "retrain"
    run = tmp_path / "a"
    assert not locked_elsewhere(run)  # freed as the command returned
    metrics = (run / phase / "metrics.jsonl").read_text()
    holder = _hold_in_subprocess(run)
    try:
        capsys.readouterr()
        assert main([command, "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another diffnas process (pid {holder.pid})" in err
    finally:
        holder.kill()  # SIGKILL: no clean-up, yet no stale lock
        holder.wait()
    assert (run / phase / "metrics.jsonl").read_text() == metrics  # the refusal wrote nothing
    assert main([command, "--resume", str(run)]) == 0


def test_a_seed_in_use_is_refused_by_run_seed(tmp_path):
    cfg_dirs = ms.prepare_seeds(load_config(None, TINY), [0], tmp_path / "par")
    holder = _hold_in_subprocess(cfg_dirs[0])
    try:
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            ms.run_seed(cfg_dirs[0])
    finally:
        holder.kill()
        holder.wait()
    assert not (cfg_dirs[0] / "search").exists()


def _alive(pid: int) -> bool:
    """Running (not ended, and not a zombie waiting for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads worker states from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL],
                         ids=["SIGTERM", "SIGHUP", "SIGKILL"])
def test_seeds_workers_end_with_their_parent(tmp_path, sig):
    """SIGTERM/SIGHUP to the parent stop its workers as Ctrl-C does (exit 128 + signum,
    a resume hint); after SIGKILL, which the parent cannot handle, the workers stop
    themselves. Each seed can be continued afterwards (its lock went with its worker)."""
    long = [o if not o.startswith("search.epochs") else "search.epochs=400" for o in TINY]
    parent = subprocess.Popen(
        [sys.executable, "-m", "diffnas", "search", "--seeds", "0,1", "--workers", "2",
         f"out_dir={tmp_path}", "name=par", *long],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # under nohup (a CI runner may use it) SIGHUP arrives ignored and stays so, by design
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    locks = [tmp_path / "par" / f"seed_{s}" / LOCK_FILE for s in (0, 1)]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and p.read_text().strip() for p in locks):
        assert parent.poll() is None, parent.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    workers = [int(p.read_text()) for p in locks]
    assert all(_alive(w) for w in workers)
    parent.send_signal(sig)
    _, err = parent.communicate(timeout=60)
    if sig != signal.SIGKILL:
        assert parent.returncode == 128 + sig, err
        assert "interrupted; resume with: diffnas search --seeds 0,1 --resume" in err
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived its parent"
    seeds = [tmp_path / "par" / f"seed_{s}" for s in (0, 1)]
    deadline = time.monotonic() + 15  # the kernel frees an flock as its holder's files close
    while any(locked_elsewhere(d) for d in seeds) and time.monotonic() < deadline:
        time.sleep(0.2)  # (a CI run once saw a lock an instant after its worker had ended)
    for d in seeds:  # free to continue
        assert not locked_elsewhere(d), Path("/proc/locks").read_text()
    assert "--- worker started" in (tmp_path / "par/seed_0/worker.log").read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_ends_a_single_run_as_ctrl_c_does(tmp_path, sig):
    """A scheduler's SIGTERM (or a closed terminal's SIGHUP) killed a run silently (exit
    143, no resume command, its log ending mid-epoch): now it ends as on Ctrl-C, its lock
    freed, log.txt saying so, and the run continues from its last checkpoint."""
    long = [o if not o.startswith("search.epochs") else "search.epochs=400" for o in TINY]
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffnas", "search", f"out_dir={tmp_path}", "name=r", *long],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # (nohup'd CI)
    checkpoint = run / "search" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file():  # an epoch is done: a checkpoint to go on from
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no epoch ended"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"diffnas: interrupted; resume with: diffnas search --resume {run}" in err, err
    assert "Traceback" not in err
    assert f"interrupted by {signal.Signals(sig).name}" in (run / "log.txt").read_text()
    assert not locked_elsewhere(run)
    done = len((run / "search" / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < 400  # (the resume itself: tests/test_run_robustness.py)


def test_a_resumed_seed_keeps_its_earlier_worker_log(tmp_path, monkeypatch):
    """worker.log was opened with "w": a resumed seed lost the output of its first call."""
    real_popen = subprocess.Popen

    def quick(cmd, **kw):
        assert "--parent-pid" in cmd and cmd[cmd.index("--parent-pid") + 1] == str(os.getpid())
        return real_popen([sys.executable, "-c", "print('second call')"], **kw)

    monkeypatch.setattr(ms.subprocess, "Popen", quick)
    d = tmp_path / "seed_0"
    d.mkdir()
    (d / "worker.log").write_text("first call\n")
    assert ms._run_in_processes([d], workers=1, threads=1, say=lambda _: None) == {}
    text = (d / "worker.log").read_text()
    assert text.startswith("first call\n--- worker started ") and "second call" in text


def test_a_worker_stops_when_its_stdin_pipe_closes():
    """The watch that works on any OS (a Windows venv's launcher is the worker's parent,
    so comparing parent pids would not do): end-of-file on the pipe the parent holds."""
    code = ("import os, time; from diffnas.engine.multiseed import _die_with_parent; "
            "_die_with_parent(os.getppid()); print('watching', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "watching"
    assert proc.poll() is None  # the pipe is open: it keeps running
    proc.stdin.close()  # what the parent's end does when the parent dies
    assert proc.wait(timeout=20) == -signal.SIGTERM


def test_an_ignored_sighup_stays_ignored_and_silent_workers_are_reported(tmp_path,
                                                                         monkeypatch):
    """nohup diffnas search --seeds ...: the parent's SIGHUP handler stopped the run at
    logout. A worker that printed nothing was reported by the worker.log header line."""
    seen = {}
    real_popen = subprocess.Popen

    def silent(cmd, **kw):
        seen["hup"] = signal.getsignal(signal.SIGHUP)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        return real_popen([sys.executable, "-c", "raise SystemExit(3)"], **kw)

    monkeypatch.setattr(ms.subprocess, "Popen", silent)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        d = tmp_path / "seed_0"
        d.mkdir()
        errors = ms._run_in_processes([d], workers=1, threads=1, say=lambda _: None)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert seen["hup"] is signal.SIG_IGN and seen["term"] is raise_terminated
    assert errors[d].startswith("worker exit code 3: (no output) (see ")


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                 caplog):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="diffnas"), run_lock(tmp_path):
        pass
    assert "this filesystem takes no locks (No locks available)" in caplog.text
    monkeypatch.undo()
    with run_lock(tmp_path):  # nothing was left held
        assert locked_elsewhere(tmp_path)
