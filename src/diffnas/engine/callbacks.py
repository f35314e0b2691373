"""Callbacks shared by search and retraining: progress bar, metrics, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from diffnas.engine.checkpoint import atomic_save, atomic_write_text
from diffnas.engine.loop import Callback, Loop

log = logging.getLogger("diffnas")


def counted(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``: a count with its noun, for what runs print."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


#: what a search's validation accuracy measured, by the metrics.jsonl key it came from
SEARCH_VAL_MEASURES = {
    "eval_val_acc": "end of epoch, whole validation split",
    "val_acc": "mean over the epoch's architecture steps",
}


def search_val_acc(row: dict[str, Any]) -> tuple[float | None, str | None]:
    """A search epoch's validation accuracy and the key it came from: the end-of-epoch pass
    over the whole validation split (``eval_val_acc``: ``search.evaluate``, graph searches)
    where the run made one, else the mean of the architecture steps' validation batches
    (``val_acc``: weights moving, at the virtual weights for second order)."""
    for key in SEARCH_VAL_MEASURES:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v), key
    return None, None


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: standard JSON has no NaN or inf (jq,
    browsers and most readers refuse Python's ``NaN``/``Infinity`` tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def json_line(row: dict[str, Any]) -> str:
    """One line of a ``.jsonl`` file, strict JSON (a non-finite number is null)."""
    return json.dumps(finite_json(row), allow_nan=False) + "\n"


def _jsonl_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` for each non-blank line of a JSON-lines file (see :func:`read_jsonl`)."""
    lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    out = []
    for n, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as exc:
            if n == len(lines):  # cut short by a crash mid-write: the epoch is rerun
                log.warning("%s: dropped its incomplete last line %.60r", path, ln)
                break
            raise ValueError(f"{path}, line {n}: not a JSON object ({exc}); repair or remove "
                             "that line") from exc
        out.append((ln, row))
    return out


def read_json(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a run artefact such as ``retrain/result.json``); a file
    that is not one (cut short, not UTF-8, another kind of value) is a ``ValueError``
    naming it and saying ``fix``, how to get a good one back."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: damaged, not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: damaged, holds a JSON {type(data).__name__}, not an object; "
                         f"{fix}")
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (none if it does not exist). An unreadable last line
    (a write cut short by a crash) is dropped with a warning; an unreadable line elsewhere
    is a ``ValueError`` naming the file and line."""
    path = Path(path)
    return [row for _, row in _jsonl_rows(path)] if path.is_file() else []


def drop_epochs_from(path: str | Path, epoch: int) -> None:
    """On resume from a checkpoint at ``epoch``: drop the rows of that epoch and later
    from ``path`` (if it exists), and a torn last line."""
    path = Path(path)
    if path.exists():
        kept = [ln for ln, row in _jsonl_rows(path) if row.get("epoch", -1) < epoch]
        atomic_write_text("".join(ln + "\n" for ln in kept), path)  # a kill keeps them all


class ProgressBar(Callback):
    """A bar per epoch showing the running loss and accuracy."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc = desc
        self.enabled = enabled
        self.bar = None

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        if self.enabled:
            count = getattr(loop.task, "epoch_batches", None)  # exact where it varies
            self.bar = tqdm(
                total=count(epoch) if count else loop.task.num_batches(),
                desc=f"{self.desc} {epoch + 1}/{loop.epochs}",
                leave=False,
                dynamic_ncols=True,
            )

    def on_step_end(self, loop: Loop, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            m = loop.running.value()
            shown = {k: f"{m[k]:.3f}" for k in ("loss", "acc", "val_loss", "val_acc") if k in m}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        log.info("%s epoch %d/%d %s", self.desc, epoch + 1, loop.epochs, shown)

    def close(self) -> None:
        if self.bar is not None:  # an epoch cut short
            self.bar.close()
            self.bar = None


class JsonLines(Callback):
    """Appends each epoch's metrics to a JSON-lines file. On resume, lines of epochs past
    the checkpoint (written after it, before a crash) are dropped first, and the file must
    hold a row of every epoch the checkpoint counts done (each is written before the
    checkpoint): one cut short or edited since would go on with a gap that plots, summaries
    and ``compare``'s times would read as the run."""

    def __init__(self, path: Path, record: Callable[[Loop, int, dict], dict] | None = None) -> None:
        self.path = Path(path)
        self.record = record

    def on_run_start(self, loop: Loop) -> None:
        if loop.epoch:  # (checked first: a refused resume leaves the file as it was)
            have = {row.get("epoch") for row in read_jsonl(self.path)}
            missing = [e for e in range(loop.epoch) if e not in have]
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10
                                                             else "")
                raise ValueError(
                    f"{self.path} lacks the rows of {len(missing)} of the {loop.epoch} epochs "
                    f"its checkpoint counts done (\"epoch\": {shown}): the file was cut short "
                    "or edited since. Restore it from a copy, or delete the phase's "
                    f"checkpoint ({self.path.parent / 'checkpoint.pt'}) to run the phase "
                    "again from its start")
        drop_epochs_from(self.path, loop.epoch)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        row = (
            metrics
            if self.record is None
            else {"epoch": epoch, **self.record(loop, epoch, metrics)}
        )
        with self.path.open("a") as f:
            f.write(json_line(row))
            f.flush()  # on disk before the checkpoint that counts this epoch done (a power
            os.fsync(f.fileno())  # loss must not leave a checkpoint past its metrics)


class MetricsLines(JsonLines):
    """``metrics.jsonl``: each epoch's metrics and ``seconds``, the wall-clock time of its
    steps and end-of-epoch evaluation (``Loop.seconds``; checkpoints and other callbacks'
    work not counted), which ``diffnas compare`` sums into a phase's cost."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, lambda loop, epoch, metrics: {
            **{k: v for k, v in metrics.items() if k != "epoch"},
            **({"seconds": loop.seconds} if loop.seconds is not None else {})})


def total_seconds(rows: list[dict[str, Any]]) -> float | None:
    """The wall-clock seconds of a phase: the sum of its ``metrics.jsonl`` rows'
    ``seconds`` (:class:`MetricsLines`); None when it has no rows or a row has none (a run
    made before they were recorded)."""
    times = [r.get("seconds") for r in rows if isinstance(r, dict)]
    if not times or not all(isinstance(t, int | float) and not isinstance(t, bool)
                            and math.isfinite(t) for t in times):
        return None
    return float(sum(times))


def duration(seconds: float | None) -> str:
    """``seconds`` as a short duration ("0.35 s", "48.2 s", "3 min 5 s", "2 h 4 min"); "-"
    for None."""
    if seconds is None:
        return "-"
    # each branch is chosen on the value as it will be printed, so 59.96 s is "1 min 0 s",
    # not "60.0 s", and 3599.7 s is "1 h 0 min", not "60 min 0 s"
    if round(seconds, 2) < 10:
        return f"{seconds:.2f} s"
    if round(seconds, 1) < 60:
        return f"{seconds:.1f} s"
    if round(seconds) < 3600:
        minutes, sec = divmod(round(seconds), 60)
        return f"{minutes} min {sec} s"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min"


class Checkpoint(Callback):
    """Saves the whole loop state atomically every ``every`` epochs and after the last one.

    Put it last among the loop's callbacks (the engines do): it saves every callback's state
    as it is when ``on_epoch_end`` reaches it, so a stateful callback after it would resume
    one epoch behind."""

    def __init__(self, path: Path, every: int = 1) -> None:
        self.path = Path(path)
        self.every = every

    def on_run_start(self, loop: Loop) -> None:
        # the temporary file of a write a kill cut short (the checkpoint itself is whole:
        # old or new); the run's lock keeps any other writer out, so none is in use
        for tmp in self.path.parent.glob(f".{self.path.name}.*{self.path.suffix}"):
            tmp.unlink(missing_ok=True)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, float]) -> None:
        if (epoch + 1) % self.every == 0 or loop.epoch >= loop.epochs:
            atomic_save(loop.state_dict(), self.path)
