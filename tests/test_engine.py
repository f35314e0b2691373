"""Search and retrain through the engine: resume is exact, the run directory is complete."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffnas.config import load_config
from diffnas.engine.loop import Callback, Loop
from diffnas.engine.retrain import run_retrain
from diffnas.engine.search import run_search
from diffnas.genotype import Genotype

TINY = [
    "data.name=digits", "data.train_subset=64", "data.test_subset=32", "data.batch_size=16",
    "progress=false", "search.epochs=2",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=2", "retrain.batch_size=16", "retrain.train_subset=64",
    "retrain.network={C: 4, layers: 3}", "retrain.cutout=2", "retrain.crop_padding=1",
]


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _alphas(result):
    return [p.detach().clone() for p in result.task.strategy.alphas()]


@pytest.mark.parametrize("strategy", ["order=1", "order=2", "name=gdas"])
def test_resumed_search_equals_uninterrupted(tmp_path, strategy):
    # (gdas draws from torch's global RNG; a third epoch reads the resumed lr schedule)
    cfg = _cfg(f"search.strategy.{strategy}", "search.epochs=3")
    full = run_search(cfg, tmp_path / "full")
    run_search(cfg, tmp_path / "cut", stop_after=1)  # as if killed after epoch 1
    assert not (tmp_path / "cut/search/DONE").exists()
    torch.manual_seed(1234)  # a fresh process would have a different RNG state
    resumed = run_search(cfg, tmp_path / "cut", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(_alphas(full), _alphas(resumed)))
    assert full.genotype == resumed.genotype
    for name in ("metrics.jsonl", "genotypes.jsonl", "alphas.jsonl"):
        a = (tmp_path / "full/search" / name).read_text().splitlines()
        b = (tmp_path / "cut/search" / name).read_text().splitlines()
        assert len(a) == len(b) == 3
        if name != "metrics.jsonl":
            assert a == b


def test_a_search_not_resumed_starts_afresh_over_an_old_checkpoint(tmp_path):
    """resume=False (the Python API; the CLI refuses a used run directory) ignores a
    checkpoint left there by another run."""
    run_search(_cfg("seed=1"), tmp_path / "r", stop_after=1)
    again = run_search(_cfg(), tmp_path / "r")
    fresh = run_search(_cfg(), tmp_path / "fresh")
    assert all(torch.equal(a, b) for a, b in zip(_alphas(again), _alphas(fresh)))


def test_run_directory_contents(tmp_path):
    cfg = _cfg()
    res = run_search(cfg, tmp_path)
    out = tmp_path / "search"
    for name in ("metrics.jsonl", "genotypes.jsonl", "alphas.jsonl", "checkpoint.pt",
                 "genotype.json", "DONE"):
        assert (out / name).exists(), name
    assert Genotype.load(out / "genotype.json") == res.genotype
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"loss", "acc", "val_loss", "val_acc", "lr"} <= set(rows[0])
    alphas = json.loads((out / "alphas.jsonl").read_text().splitlines()[-1])
    assert len(alphas["normal"]) == 5 and abs(sum(alphas["normal"][0]) - 1) < 1e-5

    result = run_retrain(cfg, res.genotype, tmp_path)
    assert 0.0 <= result["test_acc"] <= 1.0 and result["params"] > 0 and result["macs"] > 0
    assert (tmp_path / "retrain/model.pt").exists() and (tmp_path / "retrain/result.json").exists()


def test_resumed_retrain_equals_uninterrupted(tmp_path):
    cfg = _cfg("retrain.drop_path=0.2")
    from diffnas.genotype.discretize import discretize
    from diffnas.spaces import DataShape, create_space

    space = create_space(cfg.search.space, DataShape(1, 8, 10))
    g = discretize({"normal": torch.randn(5, 8), "reduce": torch.randn(5, 8)}, space)
    full = run_retrain(cfg, g, tmp_path / "full")
    run_retrain(cfg, g, tmp_path / "cut", stop_after=1)
    torch.manual_seed(99)
    resumed = run_retrain(cfg, g, tmp_path / "cut", resume=True)
    assert full["test_loss"] == resumed["test_loss"]
    a = torch.load(tmp_path / "full/retrain/model.pt")
    b = torch.load(tmp_path / "cut/retrain/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_is_a_clear_error(tmp_path):
    cfg = _cfg("search.strategy.w_optim.lr=1.0e+30", "search.strategy.w_optim.grad_clip=1.0e+30")
    with pytest.raises(FloatingPointError, match="NaN|inf"):
        run_search(cfg, tmp_path)


def test_data_smaller_than_one_batch_is_a_clear_error(tmp_path):
    cfg = _cfg("data.batch_size=16", f"out_dir={tmp_path}")
    cfg.data.train_subset = 16  # past load_config, which refuses it (tests/test_config_checks.py)
    with pytest.raises(ValueError, match="no full batch per epoch"):
        run_search(cfg, tmp_path / "run")


def test_a_dataset_smaller_than_one_batch_names_its_size(tmp_path):
    """Without data.train_subset the dataset's own size decides (a plugin's data is known
    only once read): the error counts its images, not the loop's bare "no full batch"."""
    import dataclasses

    from diffnas.data import load_dataset

    cfg = _cfg("data.batch_size=16", f"out_dir={tmp_path}")
    cfg.data.train_subset = None
    data = load_dataset("digits")
    data = dataclasses.replace(data, train_x=data.train_x[:20], train_y=data.train_y[:20])
    with pytest.raises(ValueError, match="from the dataset's 20 training images: .* leaves "
                                         "10 images to train the weights.* keeps the settings "
                                         "it started with .* start a new run"):
        run_search(cfg, tmp_path / "run", data=data)


def test_a_failed_text_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from diffnas.engine.checkpoint import atomic_write_text

    path = tmp_path / "g.json"
    atomic_write_text("old\n", path)

    with pytest.raises(AttributeError):
        atomic_write_text(b"not text", path)  # fails inside the write
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


def test_collapse_diagnostics_from_the_config_leave_the_search_unchanged(tmp_path):
    plain = run_search(_cfg(), tmp_path / "plain")
    cfg = _cfg("search.diagnostics.enabled=true", "search.diagnostics.hessian=true",
               "search.diagnostics.iters=3")
    diag = run_search(cfg, tmp_path / "diag")
    rows = [json.loads(ln) for ln in
            (tmp_path / "diag/search/diagnostics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["cell"] == "normal" and isinstance(r["skip_connect"], int)
               and isinstance(r["hessian_eig"], float) for r in rows)  # not NaN (null)
    for a, b in zip(_alphas(plain), _alphas(diag), strict=True):  # measuring changes nothing
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [0.8, 0.5, 0.3])
def test_a_search_epoch_uses_every_training_batch_and_cycles_validation(split):
    """One step per training batch whatever ``data.search_split``: the validation batches
    start over (reshuffled) when they run out, instead of cutting the epoch short."""
    from types import SimpleNamespace

    from diffnas.engine.search import SearchTask, search_loaders

    cfg = load_config(None, ["data.name=digits", "data.batch_size=10",
                             f"data.search_split={split}"])
    n = 100
    x, y = torch.arange(n).float().view(n, 1), torch.arange(n)
    train, val = search_loaders(cfg, x, y, uses_validation=True)
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    for epoch in (0, 1):
        pairs = list(task.batches(epoch))
        assert len(pairs) == task.num_batches() == len(train) == int(n * split) // 10
        seen = torch.cat([t[1] for t, _ in pairs])
        assert sorted(seen.tolist()) == sorted(train.y.tolist())  # every weight image once
        vy = torch.cat([v[1] for _, v in pairs])
        assert set(vy.tolist()) <= set(val.y.tolist())
        per_pass = len(val) * 10
        if len(pairs) > len(val):  # a second pass: every val image, then a new order
            assert sorted(vy[:per_pass].tolist()) == sorted(val.y.tolist())
            assert not torch.equal(vy[:10], vy[per_pass:per_pass + 10])
        # the same epoch again gives the same batches (resume at an epoch boundary)
        again = list(task.batches(epoch))
        assert all(torch.equal(a[1][1], b[1][1]) for a, b in zip(pairs, again, strict=True))


def test_the_search_evaluates_the_supernet_on_every_validation_image_in_eval_mode(tmp_path):
    """``eval_val_*`` (``search.evaluate``) is the supernet over the whole validation split
    (35 images: batches of 16, 16 and 3, in order) in eval mode, as DARTS's infer()."""
    import torch.nn.functional as F

    res = run_search(_cfg("search.epochs=1", "data.train_subset=70"), tmp_path)
    row = json.loads((tmp_path / "search/metrics.jsonl").read_text().splitlines()[-1])
    s, val = res.task.strategy, res.task.val
    assert len(val.y) == 35 and s.supernet.training  # train mode restored

    def measure() -> tuple[float, float]:
        logits = torch.cat([s.supernet(val.x[i:i + 16], s.arch_weights())
                            for i in range(0, 35, 16)])
        return (F.cross_entropy(logits, val.y).item(),
                (logits.argmax(-1) == val.y).float().mean().item())

    with torch.no_grad():
        s.supernet.eval()
        loss, acc = measure()
        assert row["eval_val_loss"] == pytest.approx(loss, rel=1e-5)
        assert row["eval_val_acc"] == pytest.approx(acc)
        s.supernet.train()  # the stem's batch statistics give another figure
        assert abs(measure()[0] - loss) > 1e-4


@pytest.mark.parametrize("setting", ["search.evaluate=false", "search.strategy.name=single_level"])
def test_no_validation_pass_when_switched_off_or_without_a_validation_split(tmp_path, setting):
    run_search(_cfg("search.epochs=1", setting), tmp_path)
    row = json.loads((tmp_path / "search/metrics.jsonl").read_text().splitlines()[-1])
    assert "eval_val_acc" not in row and "eval_val_loss" not in row and "loss" in row


def test_the_retrain_loss_is_the_main_head_s_and_the_auxiliary_one_is_apart():
    """``loss`` is comparable with ``test_loss`` (one head's cross-entropy); the auxiliary
    head's, trained with weight ``retrain.auxiliary_weight``, is ``aux_loss``."""
    import torch.nn.functional as F
    from torch import nn

    from diffnas.engine.retrain import TrainTask

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main, self.aux = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            return self.main(x), self.aux(x)

    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = TwoHeads()
    with torch.no_grad():
        main, aux = (F.cross_entropy(h, y).item() for h in model(x))
    cfg = _cfg("retrain.auxiliary_weight=0.4").retrain
    stats = TrainTask(model, None, None, cfg).step((x, y))
    assert stats["loss"] == pytest.approx(main) and stats["aux_loss"] == pytest.approx(aux)


@pytest.mark.parametrize("returned, words", [
    (None, "returned NoneType"), (0.5, "returned float"),
    ({"loss": "low"}, "'loss': str"), ({"loss": torch.ones(2)}, "'loss': Tensor"),
])
def test_a_step_that_returns_no_dict_of_numbers_names_the_strategy(returned, words):
    from types import SimpleNamespace

    from diffnas.engine.loop import Loop

    task = SimpleNamespace(strategy=SimpleNamespace(name="mine"), num_batches=lambda: 1,
                           batches=lambda epoch: [0], step=lambda batch: returned,
                           end_epoch=lambda epoch: {})
    with pytest.raises(TypeError, match=f"the step of strategy 'mine' .*{words}"):
        Loop(task, 1).run()


def test_a_discretizer_that_goes_wrong_on_trained_alphas_stops_the_search(tmp_path):
    """A plugin's rule that is right on fresh alphas (the config check's call) but keeps one
    input per node later wrote genotype.json and DONE; the retraining then refused it
    without naming the rule, and a resume, plugin fixed, reused that genotype.json."""
    import dataclasses
    import uuid

    from diffnas.genotype import GenotypeError, register_discretizer
    from diffnas.genotype.discretize import darts_discretize

    broken = {"calls": 0, "fixed": False}

    def late(logits, space):
        genotype = darts_discretize(logits, space)
        broken["calls"] += 1
        if broken["calls"] == 1 or broken["fixed"]:
            return genotype
        cells = tuple(dataclasses.replace(c, edges=c.edges[1:]) for c in genotype.cells)
        return dataclasses.replace(genotype, cells=cells)  # node 2 has one input

    name = f"late_{uuid.uuid4().hex[:8]}"
    register_discretizer(name)(late)
    cfg = _cfg(f"search.discretizer={name}")
    with pytest.raises(GenotypeError, match=f"discretizer '{name}' returned a genotype that "
                       "space 'darts_cnn' refuses: cell 'normal': node 2 has 1 input"):
        run_search(cfg, tmp_path)
    assert not (tmp_path / "search/genotype.json").exists()
    broken["fixed"] = True  # the plugin mended: the run resumes to a genotype that fits
    res = run_search(cfg, tmp_path, resume=True)
    assert (tmp_path / "search/DONE").exists()
    assert Genotype.load(tmp_path / "search/genotype.json") == res.genotype


@pytest.mark.parametrize("returned, stops", [
    ({"loss": float("nan"), "acc": 0.5}, "loss=nan"),
    ({"loss": 0.3, "val_loss": torch.tensor(float("inf"))}, "val_loss=inf"),
    ({"loss": 0.3, "grad_norm": float("nan")}, None),  # not a loss: recorded as it is
])
def test_a_step_that_returns_a_non_finite_loss_stops_the_run(returned, stops):
    """The built-in strategies' objective stops a NaN loss itself; a plugin's step that
    computes its own loss went on to the end, its metrics.jsonl holding "loss": null."""
    from types import SimpleNamespace

    from diffnas.engine.loop import Loop

    task = SimpleNamespace(strategy=SimpleNamespace(name="mine"), num_batches=lambda: 1,
                           batches=lambda epoch: [0], step=lambda batch: returned,
                           end_epoch=lambda epoch: {})
    if stops is None:
        assert math.isnan(Loop(task, 1).run()[0]["grad_norm"])
        return
    with pytest.raises(FloatingPointError, match=f"the step of strategy 'mine' returned {stops}"):
        Loop(task, 1).run()


def test_a_run_that_stops_early_lets_go_of_its_writer_and_bar(tmp_path):
    """TensorBoard's writer (and its thread) was closed only at a run's end: a run stopped
    by Ctrl-C or an error left one running per run in a notebook or a --seeds parent."""
    import threading
    from types import SimpleNamespace

    from diffnas.engine.callbacks import ProgressBar
    from diffnas.engine.loop import Loop
    from diffnas.engine.tensorboard import TensorBoardLogger

    pytest.importorskip("tensorboard")

    def step(batch):
        if batch == 2:
            raise KeyboardInterrupt
        return {"loss": 0.5}

    task = SimpleNamespace(num_batches=lambda: 3, batches=lambda epoch: [0, 1, 2], step=step,
                           end_epoch=lambda epoch: {})
    def threads() -> list[str]:  # (tqdm's shared monitor thread outlives its bars)
        return sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor")

    before = threads()
    board, bar = TensorBoardLogger(tmp_path / "tb", "search"), ProgressBar("search")
    with pytest.raises(KeyboardInterrupt):
        Loop(task, 2, [bar, board]).run()
    assert board.writer is None and bar.bar is None
    assert threads() == before


def test_metrics_files_are_strict_json_with_null_for_non_finite_values(tmp_path):
    """jq and browsers refuse Python's NaN/Infinity tokens: a non-finite metric is null."""
    from types import SimpleNamespace

    from diffnas.engine.callbacks import JsonLines

    JsonLines(tmp_path / "m.jsonl").on_epoch_end(
        SimpleNamespace(), 0, {"epoch": 0, "loss": float("inf"), "x": [float("nan"), 1.0]})
    line = (tmp_path / "m.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == \
        {"epoch": 0, "loss": None, "x": [None, 1.0]}


def test_measuring_the_validation_split_changes_nothing_the_search_does():
    """A random relaxation (GDAS) draws an architecture to evaluate with: from a forked
    generator, so ``search.evaluate`` on or off finds the same alphas."""
    import tempfile

    gdas = "search.strategy={name: gdas}"
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        on = run_search(_cfg(gdas), a)
        off = run_search(_cfg(gdas, "search.evaluate=false"), b)
    assert all(torch.equal(x, y) for x, y in zip(_alphas(on), _alphas(off), strict=True))


def test_a_resume_removes_the_temporary_of_a_checkpoint_write_a_kill_cut_short(tmp_path):
    cfg = _cfg()
    run_search(cfg, tmp_path, stop_after=1)
    stray = tmp_path / "search" / ".checkpoint.pt.k1ll3d.pt"
    stray.write_bytes(b"half a checkpoint")
    run_search(cfg, tmp_path, resume=True)
    assert not stray.exists() and (tmp_path / "search/checkpoint.pt").is_file()


def test_a_resumed_loop_says_how_far_it_had_come_or_that_it_was_done():
    """A resume of a finished run logged "resumed retraining at epoch 2" (of 2, 0-based):
    it reads as if one epoch were left."""
    from types import SimpleNamespace

    from diffnas.engine.loop import resumed_text

    assert resumed_text("search", SimpleNamespace(epoch=1, epochs=3)) == \
        "resumed search after 1 of 3 epochs"
    assert resumed_text("retraining", SimpleNamespace(epoch=3, epochs=3)).startswith(
        "retraining: all 3 epochs were done earlier")


class _Noisy:
    """A task whose steps draw from torch's global RNG (as Gumbel noise and dropout do)."""

    def __init__(self) -> None:
        self.total = 0.0

    def num_batches(self) -> int:
        return 3

    def batches(self, epoch):
        return range(3)

    def step(self, batch):
        x = float(torch.rand(()))
        self.total += x
        return {"loss": x}

    def end_epoch(self, epoch):
        return {"total": self.total}

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


class _Counting(Callback):
    """A callback with state of its own (a plugin's) that also counts run ends."""

    def __init__(self) -> None:
        self.steps, self.ends = 0, 0

    def on_step_end(self, loop, step, metrics):
        self.steps += 1

    def on_run_end(self, loop):
        self.ends += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_a_loop_cut_and_resumed_equals_an_uninterrupted_one():
    """Loop's own part of a resume: the epoch, the history, the task's and callbacks'
    states and torch's RNG state come back (a fresh process has another RNG state), and
    on_run_end fires once, when the last epoch is done."""
    torch.manual_seed(0)
    full_cb = _Counting()
    full = Loop(_Noisy(), 4, [full_cb])
    full_history = full.run()
    assert full_cb.ends == 1 and full_cb.steps == 12

    torch.manual_seed(0)
    cut_cb = _Counting()
    cut = Loop(_Noisy(), 4, [cut_cb])
    cut.run(stop_after=2)
    assert cut_cb.ends == 0  # not the end of the run
    state = cut.state_dict()
    torch.manual_seed(1234)  # another process
    resumed_cb = _Counting()
    resumed = Loop(_Noisy(), 4, [resumed_cb])
    resumed.load_state_dict(state)
    history = resumed.run()
    assert history == full_history and resumed.epoch == 4
    assert resumed_cb.steps == 12 and resumed_cb.ends == 1
