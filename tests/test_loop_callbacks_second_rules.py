"""Second-pass rules of the training loop, its callbacks, atomic checkpoints and the
collapse diagnostics that a mutation audit could break: a run stopped and resumed from its
checkpoint equals an uninterrupted one (task state, every RNG, history, metrics rows,
each callback's own state), checkpoints every ``every`` epochs and after the last, exact
refusals (a metric that is no one-element number, a non-finite ``*_loss`` named with its
epoch and step, a checkpoint of another optimizer layout, an error that is no misfit left
as it is, a missing checkpoint), write errors naming the file, the progress bar's count
and title, small printed words (``counted``, ``resumed_text``), JSON-lines reading, and
hand-computed eigenvalues (a negative dominant one, a two-parameter Hessian). Each test
replays the rule by hand on a tiny example rather than comparing with numbers the code
once printed."""

from __future__ import annotations

import errno
import json
import random
import sys

import numpy as np
import pytest
import torch
from conftest import StatelessTask, jsonl

from diffnas.engine import callbacks as cb
from diffnas.engine import checkpoint as ck
from diffnas.engine import diagnostics as dg
from diffnas.engine.loop import Callback, Loop, resumed_text

F64 = torch.float64


# --- resume equals an uninterrupted run --------------------------------------------------
class _Walk(StatelessTask):
    """A task with state (a running sum) whose steps draw from torch's, numpy's and
    Python's generators, so a resume equals the uninterrupted run only if all three and
    the state come back."""

    n = 3

    def __init__(self) -> None:
        self.w = 0.0

    def step(self, batch):
        self.w += float(torch.rand(())) + float(np.random.rand()) + random.random()
        return {"loss": self.w, "acc": float(np.random.rand())}

    def end_epoch(self, epoch):
        return {"w": self.w}

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


class _Count(Callback):
    """A callback with its own state: how many epochs it saw, and a tag of its own."""

    def __init__(self, tag: str) -> None:
        self.tag, self.seen = tag, 0

    def on_epoch_end(self, loop, epoch, metrics):
        self.seen += 1

    def state_dict(self):
        return {"tag": self.tag, "seen": self.seen}

    def load_state_dict(self, state):
        assert state["tag"] == self.tag, "a callback got another callback's state"
        self.seen = state["seen"]


def _seed(n: int) -> None:
    torch.manual_seed(n)
    np.random.seed(n)
    random.seed(n)


def _rows(path):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in jsonl(path)]


def test_a_run_stopped_and_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    whole = tmp_path / "whole"
    whole.mkdir()
    _seed(5)
    want = Loop(_Walk(), 4, [cb.MetricsLines(whole / "metrics.jsonl"),
                             cb.Checkpoint(whole / "checkpoint.pt")]).run()

    cut = tmp_path / "cut"
    cut.mkdir()
    _seed(5)
    first = [cb.MetricsLines(cut / "metrics.jsonl"), _Count("a"), _Count("b"),
             cb.Checkpoint(cut / "checkpoint.pt")]  # last, as the engine puts it
    Loop(_Walk(), 4, first).run(stop_after=2)
    with (cut / "metrics.jsonl").open("a") as f:  # epoch 2 was logged, then a crash
        f.write(json.dumps({"epoch": 2, "loss": -1.0}) + "\n")
    _seed(99)  # the new process draws other numbers before it resumes
    counts = [_Count("a"), _Count("b")]
    counts[1].seen = -50
    loop = Loop(_Walk(), 4, [cb.MetricsLines(cut / "metrics.jsonl"), *counts,
                             cb.Checkpoint(cut / "checkpoint.pt")])
    loop.load_state_dict(ck.load_checkpoint(cut / "checkpoint.pt"), cut / "checkpoint.pt")
    assert loop.epoch == 2 and len(loop.history) == 2
    got = loop.run()
    assert got == want
    assert _rows(cut / "metrics.jsonl") == _rows(whole / "metrics.jsonl")
    assert [c.seen for c in counts] == [4, 4]
    assert ck.load_checkpoint(cut / "checkpoint.pt")["epoch"] == 4


def test_seeding_everything_repeats_torch_numpy_and_python_draws():
    def draws():
        return float(torch.rand(())), float(np.random.rand()), random.random()

    ck.seed_everything(3)
    first = draws()
    ck.seed_everything(3)
    assert draws() == first


def test_a_loop_state_restores_numpy_s_generator_too():
    loop = Loop(_Walk(), 2)
    np.random.seed(4)
    state = loop.state_dict()
    want = np.random.rand(3)
    np.random.seed(0)
    Loop(_Walk(), 2).load_state_dict(state)
    assert np.array_equal(np.random.rand(3), want)


@pytest.mark.parametrize("every, epochs, saved", [
    (2, 5, [None, 2, 2, 4, 5]),  # every second epoch, and the last whatever its number
    (3, 3, [None, None, 3]),
    (1, 3, [1, 2, 3]),
])
def test_a_checkpoint_is_taken_every_n_epochs_and_after_the_last(tmp_path, every, epochs,
                                                                  saved):
    path = tmp_path / "checkpoint.pt"
    seen = []

    class Look(Callback):
        def on_epoch_end(self, loop, epoch, metrics):
            seen.append(ck.load_checkpoint(path)["epoch"] if path.exists() else None)

    Loop(_Walk(), epochs, [cb.Checkpoint(path, every=every), Look()]).run()
    assert seen == saved


# --- what a step may return ---------------------------------------------------------------
class _Steps(StatelessTask):
    def __init__(self, rows):
        self.rows = rows
        self.n = len(rows)

    def batches(self, epoch):
        return range(self.n)

    def step(self, i):
        return self.rows[i]


def test_a_metric_tensor_of_more_than_one_element_is_refused():
    task = _Steps([{"loss": torch.tensor([0.5, 0.25])}])
    with pytest.raises(TypeError, match=r"the step of _Steps returned metrics that are not "
                                        r"numbers \('loss': Tensor\)"):
        Loop(task, 1).run()
    assert Loop(_Steps([{"loss": torch.tensor([0.5])}]), 1).run() == [{"epoch": 0, "loss": 0.5}]


@pytest.mark.parametrize("key", ["loss", "val_loss", "arch_loss"])
def test_a_non_finite_loss_of_any_name_stops_the_run_at_its_epoch_and_step(key):
    class Task(_Steps):
        def batches(self, epoch):
            self.epoch = epoch
            return range(self.n)

        def step(self, i):
            bad = self.epoch == 1 and i == 1
            return {"acc": 1.0, key: float("nan") if bad else 0.5}

    with pytest.raises(FloatingPointError,
                       match=rf"^epoch 2 of 3, step 2 of 3: the step of Task returned "
                             rf"{key}=nan: the run stops"):
        Loop(Task([{}] * 3), 3).run()
    # a non-finite figure that is no loss is only recorded
    assert Loop(_Steps([{"loss": 1.0, "grad_norm": float("inf")}]), 1).run()[0][
        "grad_norm"] == float("inf")


# --- refusals of a checkpoint --------------------------------------------------------------
class _OptTask(StatelessTask):
    """A task whose state is an optimizer's, over parameters of the given sizes."""

    def __init__(self, *sizes: int, groups: int = 1) -> None:
        params = [torch.zeros(s, requires_grad=True) for s in sizes]
        per = [params[i::groups] for i in range(groups)]
        self.opt = torch.optim.SGD([{"params": p} for p in per], lr=0.1, momentum=0.9)

    def step(self, batch):
        return {"loss": 1.0}

    def state_dict(self):
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])


@pytest.mark.parametrize("saved, rebuilt", [
    (_OptTask(3, 4), _OptTask(3)),  # another number of parameters in the group
    (_OptTask(3, 4, groups=2), _OptTask(3, 4)),  # another number of groups
])
def test_a_checkpoint_of_another_optimizer_layout_is_refused_as_a_misfit(saved, rebuilt):
    state = Loop(saved, 2).state_dict()
    loop = Loop(rebuilt, 2)
    with pytest.raises(ValueError, match=r"^the checkpoint ck\.pt does not fit the model this "
                                         r"run rebuilds \("):
        loop.load_state_dict(dict(state, epoch=1), source="ck.pt")


def test_an_error_of_a_task_s_state_that_is_no_misfit_is_raised_as_it_is():
    class Task(StatelessTask):
        def load_state_dict(self, state):
            raise RuntimeError("CUDA error: out of memory")

    loop = Loop(Task(), 2)
    with pytest.raises(RuntimeError, match=r"^CUDA error: out of memory$"):
        loop.load_state_dict(dict(loop.state_dict(), epoch=1))


def test_a_missing_checkpoint_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'nope.pt'}"):
        ck.load_checkpoint(tmp_path / "nope.pt")


def test_a_checkpoint_naming_a_class_that_is_not_imported_is_no_damaged_file(tmp_path,
                                                                              monkeypatch):
    """A plugin's class that cannot be imported now is an ImportError (import the
    plugin), not "unreadable ... cut short or damaged" (which says to delete it)."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "my_plugin_state.py").write_text("class State:\n    pass\n")
    monkeypatch.syspath_prepend(str(mod))
    import my_plugin_state

    path = tmp_path / "checkpoint.pt"
    ck.atomic_save({"epoch": 1, "s": my_plugin_state.State()}, path)
    monkeypatch.delitem(sys.modules, "my_plugin_state")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(mod)])
    with pytest.raises(ImportError, match="my_plugin_state"):
        ck.load_saved(path, "restore a copy")


def test_an_os_error_that_names_no_file_is_raised_naming_the_file_written(tmp_path,
                                                                          monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ck.atomic_save({"epoch": 1}, path)

    def failing(obj, f):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError) as err:
        ck.atomic_save({"epoch": 2}, path)
    assert (err.value.errno, err.value.strerror, err.value.filename) == \
        (errno.EIO, "Input/output error", str(path))
    monkeypatch.undo()
    assert torch.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# --- small printed words ----------------------------------------------------------------
def test_counts_take_the_plural_except_one():
    assert [cb.counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]


def test_the_resume_line_says_how_far_the_run_had_come_or_that_it_was_done():
    loop = Loop(_Walk(), 3)
    loop.epoch = 2
    assert resumed_text("search", loop) == "resumed search after 2 of 3 epochs"
    loop.epoch = 3
    assert resumed_text("search", loop) == ("search: all 3 epochs were done earlier "
                                            "(checkpoint); its result is computed again")


def test_blank_lines_of_a_json_lines_file_are_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 0}\n\n   \n{"epoch": 1}\n\n')
    assert cb.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    cb.drop_epochs_from(path, 1)
    assert cb.read_jsonl(path) == [{"epoch": 0}]


# --- the progress bar ----------------------------------------------------------------------
def test_the_progress_bar_counts_each_step_of_an_epoch_numbered_from_one(monkeypatch):
    import io
    from functools import partial

    from tqdm import tqdm

    monkeypatch.setattr(cb, "tqdm", partial(tqdm, file=io.StringIO()))
    bar = cb.ProgressBar("search")
    seen = []

    class Look(Callback):
        def on_step_end(self, loop, step, metrics):
            seen.append((bar.bar.desc, bar.bar.n, bar.bar.total))

    Loop(_Steps([{"loss": 1.0}] * 3), 2, [bar, Look()]).run()
    assert seen == [(f"search {e}/2", n, 3) for e in (1, 2) for n in (1, 2, 3)]
    assert bar.bar is None


# --- eigenvalues by hand -------------------------------------------------------------------
def test_the_dominant_eigenvalue_keeps_its_sign():
    """Power iteration finds the largest-magnitude eigenvalue, here -5 (not its size 5)."""
    g = torch.Generator().manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    H = q @ torch.diag(torch.tensor([-5.0, 2.0, 1.0, 0.5], dtype=F64)) @ q.T
    x = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    got = dg.dominant_eigenvalue(0.5 * x @ H @ x, [x], iters=300, tol=1e-12)
    assert abs(got - (-5.0)) < 1e-6


@pytest.mark.parametrize("a, b, c", [(1.0, 2.0, 1.0), (0.5, -0.3, -2.0)])
def test_the_largest_eigenvalue_of_a_two_parameter_hessian(a, b, c):
    """H = [[a, b], [b, c]]: its largest eigenvalue is (a + c) / 2 + sqrt(((a - c) / 2)^2
    + b^2), with both parameters given as separate tensors."""
    x = torch.tensor([0.3], dtype=F64, requires_grad=True)
    y = torch.tensor([-0.7], dtype=F64, requires_grad=True)
    loss = (0.5 * a * x * x + b * x * y + 0.5 * c * y * y).sum()
    want = (a + c) / 2 + (((a - c) / 2) ** 2 + b * b) ** 0.5
    assert abs(dg.largest_eigenvalue(loss, [x, y]) - want) < 1e-9


# --- TensorBoard -----------------------------------------------------------------------
class _Writer:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.purge_step, self.scalars, self.closed = purge_step, {}, False
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        assert not self.closed, "written after close"
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_logs_integer_figures_and_reopens_for_a_second_run(tmp_path, monkeypatch):
    import diffnas.engine.tensorboard as tb

    _Writer.made = []
    monkeypatch.setattr(tb, "summary_writer_class", lambda: _Writer)

    class Task(_Steps):
        def end_epoch(self, epoch):
            return {"edges": 3 + epoch}  # a count, as the JSON lines hold it

    logger = tb.TensorBoardLogger(tmp_path / "tb", "search")
    loop = Loop(Task([{"loss": 1.0}]), 3, [logger])
    loop.run(stop_after=1)
    loop.run()  # the same loop goes on in this process
    first, second = _Writer.made
    assert (first.purge_step, second.purge_step) == (0, 1)
    assert first.closed and second.closed
    assert first.scalars["search/edges"] == [(0, 3.0)]
    assert second.scalars["search/edges"] == [(1, 4.0), (2, 5.0)]
