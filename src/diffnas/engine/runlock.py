"""Run-directory locks: one process computes in a run directory at a time.

Two processes writing one run (a second ``--resume`` while the first still runs, a
``--seeds --resume`` while an earlier one's workers live on) would interleave its metrics
rows and overwrite each other's checkpoints. The process that computes in a run holds an
``flock`` on ``RUN/.lock`` (its pid inside); the kernel frees it when the process ends, so a
killed run never leaves a stale lock. No torch here: the CLI takes its locks cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

#: held (``flock``) by the process that computes in a run, with its pid inside: two
#: processes writing one run would interleave its metrics rows and checkpoints
LOCK_FILE = ".lock"


class RunInUseError(FileExistsError):
    """Another process holds the run directory's lock (:func:`acquire_run_lock`)."""


log = logging.getLogger("diffnas")
#: what flock raises where the filesystem takes no locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_LOCKS: dict[str, list[int]] = {}  # resolved run dir -> [fd, depth], this process's locks


def _flock(path: Path, busy: str) -> int:
    """An open descriptor of ``path`` (created) holding its ``flock``, this process's pid
    written inside; -1 where nothing can be locked (no ``fcntl``, or a filesystem without
    locks: a warning). Raises :class:`RunInUseError` with ``busy`` (and the holder's pid)
    when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if not isinstance(exc, BlockingIOError) and exc.errno in _NO_LOCKS:
            os.close(fd)  # a filesystem without locks (NFS without lockd, some FUSE)
            log.warning("%s: this filesystem takes no locks (%s): nothing stops a second "
                        "process from writing here at the same time", path, exc.strerror)
            return -1
        if not isinstance(exc, BlockingIOError):
            os.close(fd)
            raise
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise RunInUseError(busy.format(pid=pid)) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def acquire_run_lock(run_dir: str | Path) -> None:
    """Lock ``run_dir`` for this process, or raise :class:`RunInUseError` naming the pid
    that holds it. Re-entrant within a process (a search then its retraining); the lock
    goes with the process, so a killed run never leaves a stale one. Without ``fcntl``
    (Windows) nothing is locked."""
    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    fd = _flock(Path(run_dir) / LOCK_FILE,
                f"{run_dir} is in use by another diffnas process{{pid}}: wait for it to end "
                "or stop it first (two processes writing one run would mix its metrics and "
                "checkpoints)")
    _LOCKS[key] = [fd, 1]


def run_lock_holder(run_dir: str | Path) -> str | None:
    """Who holds ``run_dir``'s lock: ``"pid N"`` (``""`` when the pid is unreadable), or
    ``None`` when no process does (so a missing output is not still being written). Also
    ``None`` where nothing can be locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # never locked (or unreadable): no holder to name
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as fd closes
        return None
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        return f"pid {holder}" if holder.isdigit() else ""
    except OSError:  # a filesystem without locks
        return None
    finally:
        os.close(fd)


def release_run_lock(run_dir: str | Path) -> None:
    """Undo one :func:`acquire_run_lock` of ``run_dir``; the lock is freed when the last
    one is undone."""
    key = str(Path(run_dir).resolve())
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[key]
        if entry[0] >= 0:
            os.close(entry[0])  # closing the descriptor releases the flock


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block (:func:`acquire_run_lock`)."""
    acquire_run_lock(run_dir)
    try:
        yield
    finally:
        release_run_lock(run_dir)


@contextlib.contextmanager
def lock_scope() -> Iterator[None]:
    """Free, on leaving the block, the locks taken inside it (``diffnas.cli.main``: a
    command's runs are unlocked when it returns, also when called in-process)."""
    before = {key: entry[1] for key, entry in _LOCKS.items()}
    try:
        yield
    finally:
        for key in list(_LOCKS):
            for _ in range(_LOCKS[key][1] - before.get(key, 0)):
                release_run_lock(key)


@contextlib.contextmanager
def file_lock(path: str | Path, busy: str) -> Iterator[None]:
    """Hold an ``flock`` on the file ``path`` for the block, removing the file on leaving
    it; ``busy`` (``{pid}`` is filled in) is the :class:`RunInUseError` raised when another
    process holds it. For outputs that are not run directories (``bench nb201 --json`` and
    its sidecar). A process that opened the file just before its holder removed it finds,
    once locked, that the path names another file (or none) and takes the lock again."""
    path = Path(path)
    while True:
        fd = _flock(path, busy)
        if fd < 0:
            break
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it between our open and our lock: again
    try:
        yield
    finally:
        if fd >= 0:
            path.unlink(missing_ok=True)  # removed while held: no one locks a stale file
            os.close(fd)
