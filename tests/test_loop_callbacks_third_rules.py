"""Third-pass rules of the training loop, its callbacks and atomic checkpoints that a
mutation audit could break and the other tests did not hold: a user's own file (a JSON
object without every key diffnas writes there, another kind of JSON value, a folder) is
refused by name before any work and left as it was, while a path diffnas wrote (or
nothing) is not; a resume from a checkpoint taken every 2 epochs, after a crash had
written rows past it, gives exactly the rows of an uninterrupted run (nothing lost,
nothing twice); and the progress bar of an epoch cut short is closed. Each test replays
the rule by hand on a tiny example rather than comparing with output the code once
printed."""

from __future__ import annotations

import json

import pytest
from conftest import StatelessTask, jsonl

from diffnas.engine import callbacks as cb
from diffnas.engine import checkpoint as ck
from diffnas.engine.loop import Loop


class _Counter(StatelessTask):
    """A task with state: its loss is a counter that each step raises by one."""

    n = 2

    def __init__(self):
        self.k = 0

    def step(self, batch):
        self.k += 1
        return {"loss": float(self.k)}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


# --- refusing a user's own file ----------------------------------------------------------
KEYS = frozenset({"genotype", "strategy"})


def test_a_path_that_does_not_exist_yet_may_be_written(tmp_path):
    path = tmp_path / "sub" / "genotype.json"
    assert ck.written_by_diffnas(path, KEYS)
    ck.refuse_foreign_json(path, KEYS, "a genotype", "--out")  # no error
    assert path.parent.is_dir() and list(path.parent.iterdir()) == []  # the probe is gone


@pytest.mark.parametrize("held", [{"genotype": 1}, {"strategy": 1, "other": 2}, [1, 2]])
def test_a_json_file_without_every_key_diffnas_writes_is_refused(tmp_path, held):
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(held))
    assert not ck.written_by_diffnas(path, KEYS)
    with pytest.raises(ValueError, match=r"--out .*genotype\.json: that path holds something "
                                         r"other than a genotype diffnas wrote.*choose another"):
        ck.refuse_foreign_json(path, KEYS, "a genotype", "--out")
    assert json.loads(path.read_text()) == held  # left as it was


def test_a_json_file_with_every_key_may_be_replaced(tmp_path):
    path = tmp_path / "genotype.json"
    text = json.dumps({"genotype": 1, "strategy": 2, "more": 3})
    path.write_text(text)
    assert ck.written_by_diffnas(path, KEYS)
    ck.refuse_foreign_json(path, KEYS, "a genotype", "--out")  # no error
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_folder_at_the_path_is_not_replaced(tmp_path):
    path = tmp_path / "genotype.json"
    path.mkdir()
    assert not ck.written_by_diffnas(path, KEYS)
    with pytest.raises(ValueError, match="holds something other than"):
        ck.refuse_foreign_json(path, KEYS, "a genotype", "--out")


# --- resume and the progress bar ---------------------------------------------------------
def _run(tmp_path, epochs, stop_after=None, state=None):
    """A loop writing metrics.jsonl and checkpoint.pt (every 2 epochs) under tmp_path."""
    loop = Loop(_Counter(), epochs, [cb.MetricsLines(tmp_path / "metrics.jsonl"),
                                     cb.Checkpoint(tmp_path / "checkpoint.pt", every=2)])
    if state is not None:
        loop.load_state_dict(state)
    loop.run(stop_after)
    return loop


def _no_seconds(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_resume_after_rows_past_the_checkpoint_gives_the_uninterrupted_rows(tmp_path):
    """Epochs 0-2 ran, the checkpoint counts 2 done (it is taken every 2): the row of epoch
    2 is dropped and written again, once, as in an uninterrupted run."""
    whole = tmp_path / "whole"
    whole.mkdir()
    _run(whole, 4)
    part = tmp_path / "part"
    part.mkdir()
    _run(part, 4, stop_after=3)
    assert [r["epoch"] for r in jsonl(part / "metrics.jsonl")] == [0, 1, 2]
    _run(part, 4, state=ck.load_checkpoint(part / "checkpoint.pt"))
    got, want = jsonl(part / "metrics.jsonl"), jsonl(whole / "metrics.jsonl")
    assert _no_seconds(got) == _no_seconds(want)
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in got)
    assert got[2]["loss"] == 5.5  # counter 5 and 6: the rerun of epoch 2


def test_the_progress_bar_of_an_epoch_cut_short_is_closed(monkeypatch):
    """A run stopped mid-epoch (Ctrl-C) gets no ``on_epoch_end``: ``close`` lets go of its
    bar (``Callback.close``)."""
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.closed = False
            bars.append(self)

        def set_postfix(self, *a, **kw):
            pass

        def update(self, n):
            pass

        def close(self):
            self.closed = True

    class Fails(_Counter):
        def step(self, batch):
            raise KeyboardInterrupt

    monkeypatch.setattr(cb, "tqdm", Bar)
    bar = cb.ProgressBar("search")
    with pytest.raises(KeyboardInterrupt):
        Loop(Fails(), 2, [bar]).run()
    assert len(bars) == 1 and bars[0].closed and bar.bar is None
