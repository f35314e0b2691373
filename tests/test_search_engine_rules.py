"""Rules of the image search engine (engine/search.py, engine/loop.py, engine/image.py)
that a second mutation audit found unchecked: the lr an evaluated epoch logs, the
relaxed weights an end-of-epoch evaluation draws (from a forked generator, without
gradients), what a single-level task pairs its batches with, an evaluation whose
objective reports no accuracy, the search's callbacks and their order (writers, then
extra callbacks, then diagnostics, the checkpoint last), the genotype written at every
stop and ``DONE`` only at the end, a finished search found by ``DONE`` alone, the
diagnostics' Hessian batch, the config refusals (CUDA graphs, compiled hard
relaxations, the full-batch wording, a small dataset's retraining batch), the loop's
hook order and step numbering, every ``*_loss`` checked for NaN, the image engine's
printed result, and its resume reaching the retraining. Each test replays the rule on a
tiny example."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import StatelessTask, jsonl, tiny_batch, tiny_space, tiny_strategy
from test_engine import _cfg
from test_search_loop_rules import GUMBEL, _loaders, _strategy

from diffnas.config import ConfigError
from diffnas.engine.checkpoint import load_checkpoint
from diffnas.engine.loop import Callback, Loop
from diffnas.engine.search import (
    SearchTask,
    StepTraits,
    check_diagnostics_settings,
    check_full_batch,
    check_step_settings,
    diagnostics_callbacks,
    evaluate_supernet,
    run_search,
    search_callbacks,
    search_then_retrain,
)
from diffnas.genotype import Genotype, GenotypeError
from diffnas.genotype.discretize import discretize

LR_WARNING = "ignore:Detected call of `lr_scheduler.step\\(\\)`"


def _inner(cb: Callback) -> Callback:
    return getattr(cb, "inner", cb)  # (a MainProcessOnly wrapper's callback)


# --- the end of an epoch ---------------------------------------------------------------
@pytest.mark.filterwarnings(LR_WARNING)
@pytest.mark.parametrize("relaxation", [None, GUMBEL], ids=["softmax", "gumbel"])
def test_an_evaluated_epoch_logs_the_lr_its_steps_used(relaxation):
    """With ``search.evaluate`` the row's ``lr`` is the epoch's own cosine rate, read
    before the schedule steps, as without the evaluation."""
    lr, lr_min, epochs = 0.1, 0.02, 3
    section = {"name": "darts", "w_optim": {"lr": lr, "lr_min": lr_min}}
    if relaxation:
        section["relaxation"] = relaxation
    s = _strategy(section, epochs, dtype=torch.float32)
    task = SearchTask(s, tiny_space(), None, None, eval_val=[tiny_batch(4, 3)])
    for e in range(epochs):
        want = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2
        row = task.end_epoch(e)
        assert set(row) == {"lr", "eval_val_loss", "eval_val_acc"}
        assert row["lr"] == pytest.approx(want, rel=1e-12), e


def test_the_measured_weights_are_a_draw_from_the_current_generator_left_unchanged():
    """GDAS samples its weights: the evaluation's draw is the one ``arch_weights()``
    would make now, taken on a forked generator (the search's next draws are unchanged)
    and without gradients (nothing to backpropagate through in an evaluation)."""
    s = tiny_strategy({"name": "gdas"})
    task = SearchTask(s, tiny_space(), None, None)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    got = task.measured_arch_weights()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    want = s.arch_weights()
    for g in s.arch_params.groups():
        assert torch.equal(got[g], want[g].detach()), g
        assert not got[g].requires_grad
    torch.manual_seed(4)  # (a draw: another state, other weights)
    assert any(not torch.equal(task.measured_arch_weights()[g], want[g].detach())
               for g in s.arch_params.groups())


def test_a_single_level_task_pairs_every_training_batch_with_none():
    train, _ = _loaders(n=65, single=True)
    task = SearchTask(SimpleNamespace(step=None), None, train, None)
    pairs = list(task.batches(0))
    assert len(pairs) == len(train) and all(v is None for _, v in pairs)
    train.set_epoch(0)
    assert all(torch.equal(t[1], b[1]) for (t, _), b in zip(pairs, train, strict=True))


def test_an_evaluation_without_accuracy_reports_nan_and_the_weighted_loss():
    """A plugin space's objective may report no ``acc``: the evaluation goes on, its
    accuracy NaN (null in metrics.jsonl)."""
    class NoAcc:
        supernet = torch.nn.Linear(1, 1)

        def loss(self, batch, arch_weights):
            return None, {"loss": batch[0].mean().item()}

    x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    out = evaluate_supernet(NoAcc(), [(x[:3], x[:3]), (x[3:], x[3:])], None)
    assert out["loss"] == pytest.approx(x.mean().item()) and math.isnan(out["acc"])


def test_a_refused_genotype_names_the_space_s_default_rule_when_none_is_set(monkeypatch):
    s = tiny_strategy({"name": "darts"})
    space = tiny_space()

    def refuse(genotype):
        raise GenotypeError("node 2 has 1 input")

    monkeypatch.setattr(space, "validate", refuse)
    with pytest.raises(GenotypeError, match=f"discretizer {space.default_discretizer!r} "
                       "returned a genotype that space 'darts_cnn' refuses: node 2 has 1"):
        SearchTask(s, space, None, None, rule=None).genotype()


# --- callbacks -----------------------------------------------------------------------------
def test_search_callbacks_run_first_then_writers_extra_loggers_and_checkpoint_last(tmp_path):
    """The checkpoint comes last: it counts an epoch done once every other callback
    (TensorBoard's logger included) has handled it."""
    pytest.importorskip("tensorboard")
    first, extra = Callback(), Callback()
    task = SimpleNamespace(strategy=tiny_strategy({"name": "darts"}))
    cbs = search_callbacks(task, tmp_path, _cfg("logger=tensorboard"), extra=[extra],
                           first=[first])
    names = [type(_inner(cb)).__name__ for cb in cbs]
    assert cbs[0] is first and cbs[5] is extra
    assert names[1:5] == ["ProgressBar", "MetricsLines", "JsonLines", "JsonLines"]
    assert names[6:] == ["TensorBoardLogger", "Checkpoint"]
    for cb in cbs:
        cb.close()
    assert [_inner(cb).path.name for cb in cbs[2:5]] == [
        "metrics.jsonl", "genotypes.jsonl", "alphas.jsonl"]


class _Order(Callback):
    def on_run_start(self, loop):
        self.names = [type(_inner(cb)).__name__ for cb in loop.callbacks]


def test_a_search_checkpoints_after_every_other_callback_diagnostics_included(tmp_path):
    order = _Order()
    run_search(_cfg("search.epochs=1", "search.diagnostics.enabled=true"), tmp_path,
               extra_callbacks=[order])
    assert order.names == ["ProgressBar", "MetricsLines", "JsonLines", "JsonLines", "_Order",
                           "CollapseDiagnostics", "Checkpoint"]


class _FailAt(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, loop, epoch, metrics):
        if epoch == self.epoch:
            raise RuntimeError("callback failed")


def test_a_callback_failing_as_an_epoch_ends_leaves_the_previous_checkpoint(tmp_path):
    """The checkpoint counts an epoch done only once every callback has handled it: a
    resume then runs that epoch again (and its rows written before are dropped)."""
    with pytest.raises(RuntimeError, match="callback failed"):
        run_search(_cfg(), tmp_path, extra_callbacks=[_FailAt(1)])
    assert load_checkpoint(tmp_path / "search/checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "search/DONE").exists()


def test_the_genotype_is_written_at_every_stop_and_done_only_at_the_end(tmp_path):
    """``genotype.json`` is the alphas' genotype wherever the run stopped (also the row
    genotypes.jsonl got for that epoch); ``DONE`` once every epoch ran; a resume of the
    finished run computes no epoch again."""
    cfg, out = _cfg(), tmp_path / "search"
    cut = run_search(cfg, tmp_path, stop_after=1)
    assert Genotype.load(out / "genotype.json") == cut.genotype
    rows = jsonl(out / "genotypes.jsonl")
    assert [r.pop("epoch") for r in rows] == [0] and rows[0] == cut.genotype.to_dict()
    assert not (out / "DONE").exists()
    done = run_search(cfg, tmp_path, resume=True)
    rows = jsonl(out / "genotypes.jsonl")
    assert [r.pop("epoch") for r in rows] == [0, 1] and rows[1] == done.genotype.to_dict()
    assert Genotype.load(out / "genotype.json") == done.genotype and (out / "DONE").exists()
    metrics = (out / "metrics.jsonl").read_text()
    again = run_search(cfg, tmp_path, resume=True)
    assert (out / "metrics.jsonl").read_text() == metrics
    assert again.genotype == done.genotype and len(again.history) == 2


def test_only_done_marks_a_finished_search(tmp_path, capsys):
    """A genotype.json without DONE is a search stopped early: it runs again. A run
    without retraining prints the command that retrains its genotype."""
    genotype = discretize(tiny_strategy({"name": "darts"}).arch_params.as_dict(), tiny_space())
    (tmp_path / "search").mkdir()
    (tmp_path / "search/genotype.json").write_text(genotype.to_json())
    calls = []
    search_then_retrain(_cfg("retrain.enabled=false"), tmp_path,
                        lambda: calls.append("search") or genotype, lambda g: {},
                        lambda g, r: None)
    assert calls == ["search"]
    printed = capsys.readouterr().out
    assert "no retraining (retrain.enabled=false)" in printed
    assert "diffnas train --config" in printed and "genotype.json" in printed
    search_then_retrain(_cfg(), tmp_path, lambda: genotype, lambda g: {}, lambda g, r: None)
    assert "no retraining" not in capsys.readouterr().out


# --- diagnostics ---------------------------------------------------------------------------
@pytest.mark.parametrize("hessian", [True, False])
@pytest.mark.parametrize("single", [False, True])
def test_the_hessian_batch_is_the_first_validation_batch_or_the_first_training_one(
        tmp_path, hessian, single):
    cfg = _cfg("search.diagnostics.enabled=true", f"search.diagnostics.hessian={hessian}")
    train, val = _loaders(single=single)
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    (cb,) = diagnostics_callbacks(cfg, task, tmp_path, 1)
    batch = _inner(cb).hessian_batch
    if not hessian:
        assert batch is None
        return
    want = next(iter(train if single else val))
    assert torch.equal(batch[1], want[1]) and torch.equal(batch[0], want[0])


def test_diagnostics_off_add_no_callback_and_a_compiled_hessian_is_refused(tmp_path):
    train, val = _loaders()
    task = SearchTask(SimpleNamespace(step=None), None, train, val)
    assert diagnostics_callbacks(_cfg(), task, tmp_path, 1) == []
    cfg = _cfg("search.diagnostics.enabled=true", "search.diagnostics.hessian=true")
    cfg.search.compile = {"backend": "inductor"}  # (past load_config, which refuses it)
    with pytest.raises(ConfigError, match="hessian differentiates twice"):
        diagnostics_callbacks(cfg, task, tmp_path, 1)


def test_a_hessian_under_torchrun_is_refused():
    cfg = _cfg("search.diagnostics.enabled=true", "search.diagnostics.hessian=true")
    with pytest.raises(ConfigError, match="hessian runs on one process"):
        check_diagnostics_settings(cfg, world_size=2)
    check_diagnostics_settings(cfg, world_size=1)


# --- config checks -------------------------------------------------------------------------
SAFE = StepTraits("mine", first_order=True, graph_safe=True, hard=False)


@pytest.mark.parametrize("traits, kwargs, words", [
    (SAFE, {"cuda_graph": True, "device": "cuda", "world_size": 2}, "does not run data parallel"),
    (dataclasses.replace(SAFE, hard=True), {"compile": {"backend": "inductor"}},
     "'mine' samples one op per edge"),
    (SAFE, {"compile": "inductor"}, "must be null or a mapping .* got 'inductor'"),
    (dataclasses.replace(SAFE, graph_safe=False), {"cuda_graph": True},
     "'mine' .* cannot be captured as a CUDA graph"),
])
def test_step_settings_a_strategy_cannot_take_are_refused(traits, kwargs, words):
    with pytest.raises(ConfigError, match=words):
        check_step_settings(traits, **kwargs)
    check_step_settings(SAFE, cuda_graph=True, device="cuda")  # (one process, safe: taken)


@pytest.mark.parametrize("subset", [64, 30])
def test_the_full_batch_check_counts_the_fewer_images_and_names_their_source(subset):
    """80/20 of 30 images holds no validation batch of 10; ``data.train_subset=64`` of a
    30-image dataset is 30 images (add images), ``data.train_subset=30`` the setting
    itself (raise it)."""
    cfg = _cfg("data.batch_size=10", "data.search_split=0.8")
    cfg.data.train_subset = subset
    source, fix = (("the dataset's 30 training images", "add images") if subset == 64 else
                   ("data.train_subset=30", "raise data.train_subset"))
    with pytest.raises(ConfigError, match=f"from {source}: .*lower data.batch_size or {fix}$"):
        check_full_batch(cfg, 30)


def _small_digits(n):
    from diffnas.data import load_dataset

    data = load_dataset("digits")
    return dataclasses.replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


def test_a_retrain_batch_larger_than_a_small_dataset_is_refused_before_the_search(tmp_path):
    """With a dataset smaller than ``data.train_subset`` its own size is what the
    retraining gets: a larger retrain.batch_size is refused before any epoch; once a
    checkpoint exists the run keeps its settings and resumes."""
    data = _small_digits(24)
    cfg = _cfg("data.batch_size=4", "retrain.batch_size=32", "search.epochs=1")
    with pytest.raises(ConfigError, match="retrain.batch_size=32 exceeds the 24 training "
                                          "images.* keeps the settings it started with"):
        run_search(cfg, tmp_path / "a", data=data)
    ok = _cfg("data.batch_size=4", "search.epochs=2")
    run_search(ok, tmp_path / "b", data=data, stop_after=1)
    cfg = _cfg("data.batch_size=4", "retrain.batch_size=32", "search.epochs=2")
    run_search(cfg, tmp_path / "b", data=data, resume=True)
    assert (tmp_path / "b/search/DONE").exists()


# --- the loop ------------------------------------------------------------------------------
class _Hooks(Callback):
    def __init__(self):
        self.seen = []

    def on_run_start(self, loop):
        self.seen.append(("run_start", loop.epoch))

    def on_epoch_start(self, loop, epoch):
        self.seen.append(("epoch_start", epoch))

    def on_step_end(self, loop, step, metrics):
        self.seen.append(("step", step))

    def on_epoch_end(self, loop, epoch, metrics):
        self.seen.append(("epoch_end", epoch))

    def on_run_end(self, loop):
        self.seen.append(("run_end", loop.epoch))


class _TwoSteps(StatelessTask):
    n = 2

    def step(self, batch):
        return {"loss": 1.0}


def test_the_loop_calls_its_hooks_in_order_with_steps_counted_from_zero_each_epoch():
    cb = _Hooks()
    loop = Loop(_TwoSteps(), 3, [cb])
    loop.run(stop_after=1)
    epoch = [("step", 0), ("step", 1)]
    assert cb.seen == [("run_start", 0), ("epoch_start", 0), *epoch, ("epoch_end", 0)]
    cb.seen.clear()
    loop.run()  # (a resume: the run starts at the next epoch)
    assert cb.seen == [("run_start", 1), ("epoch_start", 1), *epoch, ("epoch_end", 1),
                       ("epoch_start", 2), *epoch, ("epoch_end", 2), ("run_end", 3)]


@pytest.mark.parametrize("name", ["w_loss", "penalty_loss"])
def test_every_loss_a_step_reports_is_checked_for_nan(name):
    class Bad(StatelessTask):
        def step(self, batch):
            return {"loss": 0.3, name: float("nan")}

    with pytest.raises(FloatingPointError, match=f"returned {name}=nan"):
        Loop(Bad(), 1).run()


@pytest.mark.parametrize("raised", [False, True])
def test_a_nan_loss_names_the_epoch_and_step_it_appeared_at(raised):
    """Counted from 1, as the progress bar shows them; a step that raises itself (the
    built-in objectives) is named the same way, and the error stays a FloatingPointError
    with the original message."""
    class Diverges(StatelessTask):
        n = 4
        calls = 0

        def step(self, batch):
            self.calls += 1
            if self.calls < 7:  # epochs 1 and 2 of 4 batches: step 3 of epoch 2 diverges
                return {"loss": 0.5}
            if raised:
                raise FloatingPointError("loss is nan (NaN/inf): lower the learning rate?")
            return {"loss": float("nan")}

    loop = Loop(Diverges(), 5)
    with pytest.raises(FloatingPointError) as info:
        loop.run()
    message = str(info.value)
    assert message.startswith("epoch 2 of 5, step 3 of 4: ")
    assert ("loss is nan (NaN/inf)" if raised else "returned loss=nan") in message
    assert loop.epoch == 1 and len(loop.history) == 1  # the finished epoch is kept


def test_a_state_that_fails_to_load_for_another_reason_keeps_its_own_error():
    """Only torch's misfit messages are reworded as a checkpoint that does not fit."""
    class Broken(StatelessTask):
        def load_state_dict(self, state):
            raise RuntimeError("disk on fire")

    state = Loop(Broken(), 1).state_dict()
    with pytest.raises(RuntimeError, match="^disk on fire$"):
        Loop(Broken(), 1).load_state_dict(state, source="ck.pt")


# --- the image engine ----------------------------------------------------------------------
def test_the_printed_result_gives_millions_of_macs_and_a_percentage(capsys):
    from diffnas.engine.image import print_image_result

    genotype = discretize(tiny_strategy({"name": "darts"}).arch_params.as_dict(), tiny_space())
    print_image_result(genotype, {"params": 1234567, "macs": 2_500_000, "test_acc": 0.8765,
                                  "epochs_done": 3})
    out = capsys.readouterr().out
    assert "params (no auxiliary head): 1,234,567" in out and "MACs: 2.50 M" in out
    assert "test accuracy: 87.65% after 3 epochs" in out


def test_the_summary_input_is_channels_then_side_then_side():
    from diffnas.engine.image import dry_run_shape, image_summary

    cfg = _cfg()
    c, side, classes = dry_run_shape(cfg.data.name, cfg.data.resolution, cfg.data.root)
    assert c != side  # (so an order mistake shows)
    genotype = discretize(tiny_strategy({"name": "darts"}).arch_params.as_dict(), tiny_space())
    summary = image_summary(cfg, genotype)
    assert summary["input"] == [c, side, side] and summary["classes"] == classes


def test_a_resumed_image_search_resumes_its_retraining(monkeypatch, tmp_path):
    from diffnas.engine import image, retrain, search

    genotype = discretize(tiny_strategy({"name": "darts"}).arch_params.as_dict(), tiny_space())
    calls = []
    monkeypatch.setattr(search, "run_search", lambda cfg, run_dir, resume=False: (
        calls.append(("search", resume)), SimpleNamespace(genotype=genotype))[1])
    monkeypatch.setattr(retrain, "run_retrain", lambda cfg, g, run_dir, resume=False, **k: (
        calls.append(("retrain", resume)), {"params": 1, "macs": 1, "test_acc": 0.5,
                                            "epochs_done": 2})[1])
    assert image.image_search(_cfg(), Path(tmp_path), resume=True) == 0
    assert calls == [("search", True), ("retrain", True)]


def test_metrics_rows_number_epochs_from_zero_with_lr_and_seconds(tmp_path):
    run_search(_cfg("search.epochs=1"), tmp_path)
    (row,) = jsonl(tmp_path / "search/metrics.jsonl")
    assert row["epoch"] == 0 and row["seconds"] > 0 and "lr" in row
    assert json.loads(json.dumps(row)) == row
