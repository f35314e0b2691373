"""Atomic checkpoints: write to a temporary file in the same directory, then rename, so a
crash mid-write never leaves a truncated checkpoint behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back (reported by the CLI as a one-line error)."""


def _umask() -> int:
    """The process umask, read from ``/proc/self/status`` where Linux (>= 4.7) tells it;
    elsewhere set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_open_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: those of the file it replaces,
    else ``0o666`` less the umask (``mkstemp`` alone gives 0600 whatever the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _atomic_write(write: Callable[[IO], None], path: str | Path, mode: str) -> None:
    """Write through a temporary file in the same directory, fsync it, then rename it over
    ``path`` (:func:`staged_path`): a crash leaves the old file or the new one, never a
    torn one, and no temporary file behind. The file gets the permissions a plain
    ``open`` would give."""
    try:
        with staged_path(path) as tmp, open(tmp, mode) as f:
            write(f)
    except Exception as exc:
        raise write_error(exc, path) from exc


def write_error(exc: Exception, path: str | Path) -> Exception:
    """``exc`` (raised while writing ``path``) as an ``OSError`` naming ``path`` when an
    OS error caused it: a full disk inside ``torch.save`` surfaces as a RuntimeError of
    its zip writer ("unexpected pos") with the ``OSError`` only in its context, and a
    failed write or flush names no file. Other errors are returned as they are."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__ or cause.__cause__
    if not isinstance(cause, OSError) or (cause is exc and cause.filename is not None):
        return exc
    if cause.errno == errno.ENOSPC:
        why = "no space left on the device (the file it replaces, if any, is kept)"
    else:
        why = cause.strerror or str(cause)
    return OSError(cause.errno, why, str(path))


@contextlib.contextmanager
def staged_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for writers that want a file name rather than a
    file object (``torch.jit.save``, ``torch.onnx.export``): renamed over ``path`` when
    the block ends, removed when it raises, so a failed write or a failed check of what
    was written leaves the old file (or none) in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _plain_open_mode(path))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` made atomic (see :func:`_atomic_write`)."""
    _atomic_write(lambda f: torch.save(obj, f), path, "wb")


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """A binary file written atomically (a rendered picture)."""
    _atomic_write(lambda f: f.write(data), path, "wb")


def atomic_write_text(text: str, path: str | Path) -> None:
    """A text file written atomically, in UTF-8 (genotype, result and summary JSON)."""
    atomic_write_bytes(text.encode("utf-8"), path)


def written_by_diffnas(path: str | Path, keys: frozenset[str] | set[str]) -> bool:
    """Whether ``path`` may be replaced by a JSON file diffnas writes: it does not exist,
    or it holds a JSON object with all of ``keys`` (one diffnas wrote there before). A
    user's own file of that name, or anything else, is not replaced."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_file():
        return False
    try:
        held = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(held, dict) and set(keys) <= held.keys()


def refuse_foreign_json(path: str | Path, keys: frozenset[str] | set[str], what: str,
                        flag: str) -> None:
    """A ``ValueError`` unless :func:`written_by_diffnas`: ``path`` (given by ``flag``)
    holds something other than ``what`` and would be lost. Called before any work, so a
    long command does not stop at its end for it. A folder where nothing can be written is
    refused too (its parent folders are made here)."""
    if not written_by_diffnas(path, keys):
        raise ValueError(f"{flag} {path}: that path holds something other than {what} "
                         f"diffnas wrote, which would be replaced; move it or choose another "
                         f"{flag}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:  # a byte, so that a full disk shows now (an empty file takes no block)
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); "
                         f"choose another {flag}") from None


def load_saved(path: str | Path, remedy: str, weights_only: bool = False,
               what: str = "checkpoint") -> dict[str, Any]:
    """The dict ``torch.save`` wrote to ``path`` (on the CPU). A file that cannot be read
    back (cut short or damaged outside diffnas: diffnas writes atomically) is a
    :class:`CheckpointError` naming it, the ``what`` it should hold and ``remedy``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except ImportError:  # a class of a plugin that is not imported: not a damaged file
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc}") from exc
    except Exception as exc:  # torch.load's error depends on where the bytes stop
        first = (str(exc).splitlines() or [""])[0].split(". ")[0][:100]  # torch's run long
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(
            f"{what} {path} is unreadable ({detail}): it was cut short (a crash or a "
            f"full disk) or damaged in a copy; {remedy}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a diffnas {what} (a "
                              f"{type(state).__name__}, not a dict); {remedy}")
    return state


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved at ``path`` (:func:`load_saved`; a missing file is a
    ``FileNotFoundError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return load_saved(path, f"delete it to restart this phase ({path.parent.name}) from "
                            "scratch, or restore a copy")


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`. CUDA states go to the GPUs this machine has: a checkpoint
    saved with more GPUs visible is resumed with fewer (``set_rng_state_all`` indexed a
    missing device), and one saved with fewer leaves the other devices' states alone."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
