"""Rules of the retraining (engine/retrain.py), the best-epoch keeper (engine/best.py) and
the time-series forecaster (engine/forecast.py) that tests/test_report_engine_rules.py
leaves unchecked, found by a mutation audit: the evaluation over every test batch in eval
mode, the refusals of retraining settings and the fixes they suggest, the training mode
and batch order of each epoch, the divergence checks, the full-batch Adam replayed by
hand over several epochs, the forecaster's splits, its seeds and its command line. Each
test replays the rule on a tiny example (float64 where numbers matter) rather than
comparing with numbers the code once printed."""

from __future__ import annotations

import copy
import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import jsonl
from test_engine import _cfg
from test_report_engine_rules import TwoHeads, _batch, _retrain_cfg, _tiny_genotype
from torch import nn

from diffnas.config import ConfigError, load_config
from diffnas.data import BatchLoader
from diffnas.engine import forecast
from diffnas.engine.best import BestEpoch, FullBatchTrainTask
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import (
    DropPathSchedule,
    TrainTask,
    check_augment_fits,
    check_retrain_batch,
    evaluate,
    retrain_dir,
    run_retrain,
)


# --- evaluation -------------------------------------------------------------------------
def test_evaluate_averages_over_every_image_of_every_batch_in_eval_mode():
    """evaluate(): the mean cross-entropy and accuracy over all the images of all the
    batches (of unequal sizes), the model in eval mode (BatchNorm's running statistics),
    equal to one pass over the concatenated images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    batches = [_batch(seed, n) for seed, n in ((1, 5), (2, 3), (3, 2))]
    batches = [(x.double(), y) for x, y in batches]
    model.train()
    got = evaluate(model, batches)
    assert not model.training
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    assert got["test_acc"] == pytest.approx((logits.argmax(-1) == y).double().mean().item())


# --- refusals before anything runs --------------------------------------------------------
def test_a_retraining_batch_is_measured_against_the_retraining_subset_not_the_dataset():
    """retrain.train_subset=32 of 100 images: a batch of 40 has no full batch and is
    refused, naming the 32 images; the dataset's 100 do not count."""
    cfg = load_config(None, ["retrain.batch_size=32", "retrain.train_subset=32"])
    cfg.retrain.batch_size = 40  # past load_config, which refuses it against the subset
    with pytest.raises(ConfigError, match="exceeds the 32 training images"):
        check_retrain_batch(cfg, 100)
    cfg.retrain.batch_size = 32
    check_retrain_batch(cfg, 100)


def test_diffnas_train_checks_the_retraining_batch_and_augmentation_even_when_disabled():
    """retrain.enabled=false skips the checks of a search (it will not retrain), but
    ``diffnas train`` (always=True) retrains anyway, so it is checked; only a search's
    message says the search has not started."""
    cfg = load_config(None, ["retrain.enabled=false", "retrain.batch_size=64",
                             "retrain.cutout=0", "retrain.crop_padding=0"])
    check_retrain_batch(cfg, 10)
    with pytest.raises(ConfigError, match="exceeds the 10 training images") as train:
        check_retrain_batch(cfg, 10, always=True)
    assert "(the search has not started)" not in str(train.value)
    cfg.retrain.enabled = True
    with pytest.raises(ConfigError, match=r"lower retrain\.batch_size \(the search has not "
                                          r"started\)"):
        check_retrain_batch(cfg, 10)
    cfg.retrain.enabled, cfg.retrain.cutout = False, 8
    check_augment_fits(cfg, 8)
    with pytest.raises(ConfigError, match=r"retrain\.cutout=8 is not smaller than the 8x8"):
        check_augment_fits(cfg, 8, always=True)


@pytest.mark.parametrize("side", [4, 8, 32])
@pytest.mark.parametrize("key", ["cutout", "crop_padding"])
def test_a_refused_augmentation_suggests_the_darts_proportion_of_the_side(side, key):
    """The fix offered: a cutout of half the side (16 of 32), a crop padding of an eighth
    of it (4 of 32), at least 1 pixel; the suggestion itself fits."""
    cfg = load_config(None, ["retrain.cutout=0", "retrain.crop_padding=0"])
    setattr(cfg.retrain, key, side)
    fix = side // 2 if key == "cutout" else max(1, side // 8)
    with pytest.raises(ConfigError, match=rf"retrain\.{key}={fix}, or 0 for none"):
        check_augment_fits(cfg, side)
    setattr(cfg.retrain, key, fix)
    check_augment_fits(cfg, side)


def test_drop_path_on_a_network_without_it_is_named_once_and_zero_says_nothing(caplog):
    """A drop-path probability for a network with no ``drop_path_prob`` would be ignored
    silently: it is named with the network's class; retrain.drop_path=0 warns nothing."""
    with caplog.at_level(logging.WARNING, logger="diffnas"):
        DropPathSchedule(nn.Linear(2, 2), 0.0)
        assert caplog.records == []
        DropPathSchedule(nn.Linear(2, 2), 0.2)
    assert len(caplog.records) == 1
    assert "retrain.drop_path=0.2 does nothing: the Linear network" in caplog.text


# --- the retraining task ------------------------------------------------------------------
def test_each_retraining_epoch_trains_in_training_mode_on_its_own_shuffle():
    """TrainTask.batches(e): the model back in training mode (the previous epoch ended in
    eval mode), and the loader's order of epoch e: epochs see other orders, each all the
    images once."""
    x = torch.arange(24.0).reshape(24, 1).expand(24, 6).contiguous()
    y = torch.arange(24) % 3
    loader = BatchLoader(x, y, 6, seed=1, drop_last=True)
    model = TwoHeads()
    task = TrainTask(model, loader, None, _retrain_cfg())
    orders = []
    for epoch in (0, 1, 0):
        model.eval()
        orders.append(torch.cat([xb[:, 0] for xb, _ in task.batches(epoch)]).long().tolist())
        assert model.training, epoch
    assert all(sorted(o) == list(range(24)) for o in orders)
    assert orders[0] != orders[1] and orders[0] == orders[2]


def test_the_logged_training_accuracy_is_the_fraction_of_the_batch_right_before_the_step():
    """A step's ``acc``: the fraction of the batch the main head classifies right, with
    the weights the step started from."""
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = _batch(3, 16)
    with torch.no_grad():
        want = (model(x)[0].argmax(-1) == y).double().mean().item()
    stats = TrainTask(model, None, None, _retrain_cfg()).step((x, y))
    assert stats["acc"] == pytest.approx(want)
    assert 0 < want < 1  # a fraction that a count or a sum would not equal


def test_a_non_finite_retraining_loss_stops_before_the_weights_change():
    """An infinite input makes the loss non-finite: the step raises, naming retrain.lr,
    and leaves the weights as they were (no NaN step taken)."""
    torch.manual_seed(0)
    model = TwoHeads()
    before = copy.deepcopy(model.state_dict())
    x, y = _batch(1)
    x[0, 0] = math.inf
    with pytest.raises(FloatingPointError, match=r"retrain loss is .*lower retrain\.lr"):
        TrainTask(model, None, None, _retrain_cfg()).step((x, y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # (no step first)
@pytest.mark.parametrize("broken", ["nan_test_loss", "inf_unused_weight"])
def test_an_epoch_whose_weights_or_test_loss_diverged_is_refused_by_its_number(broken):
    """end_epoch refuses an epoch whose test loss is NaN (finite weights, a NaN test
    image) and one with a non-finite weight that the test pass does not use (the
    auxiliary head): either is named as epoch e + 1 with the lr it trained at."""
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = _batch(1)
    if broken == "nan_test_loss":
        x[0, 0] = math.nan
    else:
        with torch.no_grad():
            model.aux.weight[0, 0] = math.inf
    task = TrainTask(model, None, [(x, y)], _retrain_cfg(lr=0.1))
    with pytest.raises(FloatingPointError, match=r"retrain epoch 3: the weights diverged .* "
                                                 r"at retrain\.lr=0\.1;"):
        task.end_epoch(2)


def test_a_retraining_task_reloaded_after_one_epoch_goes_on_down_the_same_cosine():
    """TrainTask.state_dict after epoch 0 of 4, loaded into a new task: epochs 1..3 log
    the lr of the cosine from lr to lr_min (lr_min + (lr - lr_min)(1 + cos(pi e/4))/2),
    as the uninterrupted task does: the schedule's position is saved, not restarted."""
    cfg = _retrain_cfg(epochs=4, lr=0.2, lr_min=0.02)
    x, y = _batch()
    torch.manual_seed(0)
    first = TrainTask(TwoHeads(), None, [(x, y)], cfg)
    first.step((x, y))
    first.end_epoch(0)
    state = copy.deepcopy(first.state_dict())
    torch.manual_seed(1)
    task = TrainTask(TwoHeads(), None, [(x, y)], cfg)
    task.load_state_dict(state)
    logged = []
    for epoch in (1, 2, 3):
        task.step((x, y))
        logged.append(task.end_epoch(epoch)["lr"])
    want = [cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * e / 4)) / 2
            for e in (1, 2, 3)]
    assert logged == pytest.approx(want, rel=1e-9)


# --- a whole retraining --------------------------------------------------------------------
def test_a_retraining_cut_short_ramps_drop_path_and_counts_the_epochs_it_did(
        tmp_path, monkeypatch):
    """run_retrain with retrain.drop_path=0.3 over 3 epochs, stopped after 2: the network
    trains at drop-path 0, then 0.1 (0.3 * e / 3), and result.json counts 2 epochs done
    (2 metrics rows), not the 3 asked for."""
    from diffnas.engine import distributed as dp

    seen = []
    real_step = TrainTask.step

    def recorded(self, batch):
        seen.append(dp.unwrap(self.model).drop_path_prob)
        return real_step(self, batch)

    monkeypatch.setattr(TrainTask, "step", recorded)
    cfg = _cfg("retrain.epochs=3", "retrain.drop_path=0.3", "retrain.train_subset=32")
    result = run_retrain(cfg, _tiny_genotype(), tmp_path, stop_after=2)
    assert seen == pytest.approx([0.0] * 2 + [0.1] * 2)
    assert result["epochs_done"] == 2
    assert json.loads((tmp_path / "retrain/result.json").read_text())["epochs_done"] == 2
    assert [r["epoch"] for r in jsonl(tmp_path / "retrain/metrics.jsonl")] == [0, 1]


def test_the_retraining_batch_order_follows_the_run_s_seed(tmp_path, monkeypatch):
    """Two retrainings of the same data with seeds 0 and 1 shuffle their training images
    differently (and each sees each image once an epoch)."""
    labels: list[list[int]] = []
    real_step = TrainTask.step

    def recorded(self, batch):
        labels[-1].extend(batch[1].tolist())
        return real_step(self, batch)

    monkeypatch.setattr(TrainTask, "step", recorded)
    from diffnas.data import load_dataset

    data = load_dataset("digits", train_subset=32, test_subset=16, seed=0)
    g = _tiny_genotype()
    for seed in (0, 1):
        labels.append([])
        cfg = _cfg("retrain.epochs=1", "retrain.train_subset=32", f"seed={seed}",
                   "retrain.cutout=0", "retrain.crop_padding=0")
        run_retrain(cfg, g, tmp_path / str(seed), data=data)
    assert sorted(labels[0]) == sorted(labels[1]) and labels[0] != labels[1]


def test_diffnas_train_refuses_augmentation_as_large_as_the_images_when_retrain_is_off(
        tmp_path):
    """run_retrain (``diffnas train``) checks the augmentation against the images it
    loaded even with retrain.enabled=false (set for the search it did not run)."""
    cfg = _cfg("retrain.enabled=false", "retrain.cutout=0", "retrain.crop_padding=0")
    cfg.retrain.cutout = 8
    with pytest.raises(ConfigError, match=r"retrain\.cutout=8 is not smaller than the 8x8"):
        run_retrain(cfg, _tiny_genotype(), tmp_path)
    assert not (tmp_path / "retrain/metrics.jsonl").exists()

def test_a_retraining_resumed_on_other_images_is_refused(tmp_path):
    """run_retrain cut after 1 of 2 epochs, resumed with another training subset of the
    same dataset: refused, naming what differs, before it trains on."""
    from diffnas.data import load_dataset

    cfg = _cfg("retrain.epochs=2", "retrain.train_subset=32")
    g = _tiny_genotype()
    run_retrain(cfg, g, tmp_path, stop_after=1,
                data=load_dataset("digits", train_subset=32, test_subset=16, seed=0))
    other = load_dataset("digits", train_subset=32, test_subset=16, seed=1)
    with pytest.raises(ValueError, match=r"computed on other data .*differs: .*train_x"):
        run_retrain(cfg, g, tmp_path, resume=True, data=other)
    assert len(jsonl(tmp_path / "retrain/metrics.jsonl")) == 1



def test_retrain_dir_pins_the_genotype_of_a_resume_and_not_of_a_new_run(tmp_path):
    """retrain_dir (graph and plugin engines): a new run may retrain another genotype in
    the directory; a resume with another genotype is refused."""
    a, b = _tiny_genotype(0), _tiny_genotype(1)
    assert retrain_dir(tmp_path, a, resume=False) == tmp_path / "retrain"
    with pytest.raises(ValueError, match="retraining another genotype"):
        retrain_dir(tmp_path, b, resume=True)
    retrain_dir(tmp_path, b, resume=False)
    retrain_dir(tmp_path, b, resume=True)


# --- the best epoch and the full-batch retraining -------------------------------------------
def test_a_first_epoch_of_zero_accuracy_and_infinite_loss_is_still_the_best_so_far():
    """Before any epoch there is no best: the first epoch is kept whatever it scored (0
    accuracy, an infinite or NaN loss), so restore() tests trained weights and the
    result names epoch 0, not -1."""
    for loss in (math.inf, math.nan):
        best = BestEpoch()
        assert best.update(nn.Linear(2, 1), 0, 0.0, loss)
        assert best.record["epoch"] == 0 and best.weights is not None


class _Quadratic(FullBatchTrainTask):
    """A full-batch task on a float64 linear model: loss 50 * mean squared error (steep
    enough that the clip acts), validation in eval mode, recording the training mode of
    each step."""

    def __init__(self, retrain, x, y, accs=None, seed=0):
        torch.manual_seed(seed)
        super().__init__(nn.Linear(3, 1).double(), retrain)
        self.x, self.y, self.modes, self.accs, self.epoch = x, y, [], accs, 0

    def train_batch(self, epoch):
        self.epoch = epoch
        return self.x, self.y

    def loss(self, batch):
        self.modes.append(self.model.training)
        x, y = batch
        loss = 50 * (self.model(x).squeeze(-1) - y).pow(2).mean()
        return loss, {"loss": loss.item()}

    def validate(self):
        self.model.eval()
        return {"acc": self.accs[self.epoch] if self.accs else 0.5, "loss": 1.0}


def test_a_full_batch_retraining_is_adam_with_l2_decay_replayed_by_hand_over_epochs():
    """Three epochs of FullBatchTrainTask equal Adam written out: g = clip(grad of this
    epoch's loss alone, grad_clip) + weight_decay * w (L2, not decoupled decay), biased
    moments corrected, w -= lr * m / (sqrt(v) + 1e-8); every epoch trains in training
    mode though validation left the model in eval mode."""
    r = _retrain_cfg(lr=0.05, weight_decay=0.1, grad_clip=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, generator=g, dtype=torch.float64) * 4
    task = _Quadratic(r, x, y)
    w = [p.detach().clone() for p in task.model.parameters()]
    Loop(task, 3).run()
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    b1, b2 = 0.9, 0.999
    clipped = []
    for t in range(1, 4):
        ws = [p.clone().requires_grad_() for p in w]
        loss = 50 * (x @ ws[0].T + ws[1] - y[:, None]).pow(2).mean()
        grads = torch.autograd.grad(loss, ws)
        norm = math.sqrt(sum(float(gr.pow(2).sum()) for gr in grads))
        clipped.append(norm > r.grad_clip)
        scale = min(1.0, r.grad_clip / (norm + 1e-6))
        for i, gr in enumerate(grads):
            d = gr * scale + r.weight_decay * w[i]
            m[i] = b1 * m[i] + (1 - b1) * d
            v[i] = b2 * v[i] + (1 - b2) * d * d
            step = r.lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + 1e-8)
            w[i] = w[i] - step
    assert all(clipped)
    assert task.modes == [True, True, True]
    for got, want in zip(task.model.parameters(), w, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_a_resumed_full_batch_retraining_keeps_the_best_epoch_from_before_the_cut(tmp_path):
    """run_retrain_loop cut after 2 of 4 epochs and resumed: the best epoch (0, before the
    cut) and its weights, the last weights and the best-accuracy column equal those of an
    uninterrupted run."""
    from diffnas.engine.retrain import run_retrain_loop

    cfg = load_config(None, ["retrain.epochs=4", "progress=false"])
    for run in "ab":
        (tmp_path / run).mkdir()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    accs = [0.9, 0.5, 0.6, 0.4]
    r = _retrain_cfg(lr=0.05, grad_clip=1.0)
    whole = _Quadratic(r, x, y, accs)
    _, full = run_retrain_loop(whole, cfg, tmp_path / "a", resume=False)
    run_retrain_loop(_Quadratic(r, x, y, accs), cfg, tmp_path / "b", resume=False,
                     stop_after=2)
    resumed = _Quadratic(r, x, y, accs, seed=1)  # other weights until the checkpoint loads
    loop, rest = run_retrain_loop(resumed, cfg, tmp_path / "b", resume=True)
    assert loop.epoch == 4 and [h["epoch"] for h in rest] == [0, 1, 2, 3]
    assert len(resumed.modes) == 2  # it trained epochs 2 and 3 only
    assert resumed.best.record == whole.best.record == {"val_acc": 0.9, "val_loss": 1.0,
                                                         "epoch": 0}
    assert [h["best_val_acc"] for h in rest] == [h["best_val_acc"] for h in full] \
        == [0.9] * 4
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed.best.restore(resumed.model)
    whole.best.restore(whole.model)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- forecasting: settings --------------------------------------------------------------
def test_an_unknown_series_is_named_before_statsmodels_is_needed():
    with pytest.raises(ValueError, match=r"unknown series 'foo'; known: \('co2', 'sunspots'\)"):
        forecast.load_series("foo")


@pytest.mark.parametrize("key", ["hidden", "lookback", "epochs", "batch_size"])
def test_each_size_setting_of_the_forecaster_must_be_at_least_one(key):
    forecast.ForecastConfig(**{key: 1})
    with pytest.raises(ValueError, match=rf"{key} must be >= 1, got 0"):
        forecast.ForecastConfig(**{key: 0})


@pytest.mark.parametrize("settings, match", [
    ({"lr": math.nan}, "lr must be > 0, got nan"),
    ({"test_fraction": 0.5, "val_fraction": 0.5}, "must each be in .* and sum below 1"),
])
def test_a_nan_lr_and_splits_that_leave_no_training_data_are_refused(settings, match):
    """NaN is not > 0; fractions summing to exactly 1 leave nothing to train on."""
    with pytest.raises(ValueError, match=match):
        forecast.ForecastConfig(**settings)


def test_the_smallest_parameter_target_gets_one_hidden_unit():
    """matched_lstm searches from one hidden unit: the smallest LSTM forecaster (18
    parameters) is the match of a target of 18 or below."""
    one = forecast.LstmForecaster(1)
    assert forecast.n_params(one) == 4 * 1 * 2 + 9 + 1
    for target in (1, 18):
        assert forecast.matched_lstm(target).lstm.hidden_size == 1


# --- forecasting: the splits ------------------------------------------------------------
def _series(n: int) -> np.ndarray:
    t = np.arange(float(n))
    return 0.01 * t ** 2 + np.sin(t)


@pytest.mark.parametrize("lookback, refused", [(9, True), (8, False)])
def test_a_training_split_of_lookback_plus_one_differences_is_too_short(lookback, refused,
                                                                        monkeypatch):
    """21 values: 20 differences, a quarter each for test and validation, 10 to train:
    refused with lookback 9 (the message says train needs more than 10), accepted with
    lookback 8."""
    monkeypatch.setattr(forecast, "fit", lambda model, *args: model)
    cfg = forecast.ForecastConfig(hidden=2, lookback=lookback, epochs=1, test_fraction=0.25,
                                  val_fraction=0.25)
    if refused:
        with pytest.raises(ValueError, match=r"split 10/5/5 .* train needs more than 10"):
            forecast.run_forecast(cfg, _series(21))
    else:
        assert forecast.run_forecast(cfg, _series(21))["split"]["test"] == 5


def test_a_series_too_short_for_a_test_difference_is_refused(monkeypatch):
    """Six differences at the default fractions leave no test (int(6 * 0.15) = 0): an
    RMSE over nothing would be NaN, so it is refused."""
    monkeypatch.setattr(forecast, "fit", lambda model, *args: model)
    with pytest.raises(ValueError, match="val and test at least 1 each"):
        forecast.run_forecast(forecast.ForecastConfig(hidden=2, lookback=1, epochs=1),
                              _series(7))


def test_training_and_validation_windows_predict_their_own_chronological_differences(
        monkeypatch):
    """fit sees the standardised differences lookback..n_train-1 as training targets and
    n_train..n_train+n_val-1 as validation ones (none of validation in training, none of
    test in either); the split counts say so; the LSTM's hidden size is reported."""
    seen = []

    def recording(model, x, y, xv, yv, cfg):
        seen.append((x, y, xv, yv))
        return model

    monkeypatch.setattr(forecast, "fit", recording)
    series = _series(101)
    cfg = forecast.ForecastConfig(hidden=2, lookback=5, epochs=1, test_fraction=0.2,
                                  val_fraction=0.1)
    res = forecast.run_forecast(cfg, series)
    diff = np.diff(series)
    n_test, n_val, n_train = 20, 10, 70
    mu, sd = diff[:n_train].mean(), diff[:n_train].std()
    z = (diff - mu) / sd
    assert res["split"] == {"train": n_train - 5, "val": n_val, "test": n_test}
    assert len(seen) == 2
    for _x, y, xv, yv in seen:
        np.testing.assert_allclose(y.numpy(), z[5:n_train], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(yv.numpy(), z[n_train:n_train + n_val], rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(xv[-1, :, 0].numpy(), z[n_train - 1:n_train + n_val - 1],
                                   rtol=1e-5, atol=1e-6)
    hidden = res["lstm"]["hidden"]
    assert forecast.n_params(forecast.LstmForecaster(hidden)) == res["lstm"]["params"]


def test_a_forecast_run_is_reproducible_whatever_the_global_random_state(monkeypatch):
    """run_forecast seeds the initialisations itself: two runs of one config, with other
    draws from the global generator before them, report the same errors."""
    monkeypatch.setattr(forecast, "fit", lambda model, *args: model)
    cfg = forecast.ForecastConfig(hidden=3, lookback=4, epochs=1)
    results = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        results.append(forecast.run_forecast(cfg, _series(80)))
    assert results[0] == results[1]


class _LastStep(nn.Module):
    """w * (the last input of the window) + b, float64."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1).double()
        with torch.no_grad():
            self.lin.weight.fill_(0.3)
            self.lin.bias.fill_(-0.2)

    def forward(self, x):
        return self.lin(x[-1]).squeeze(-1)


def test_forecast_fit_is_clipped_adam_on_seeded_mini_batches_replayed_by_hand():
    """fit: each epoch a permutation from a generator seeded with cfg.seed, mini-batches
    of batch_size, MSE, gradient norm clipped at 1, Adam at cfg.lr; validation on every
    epoch only picks the kept one (here validation = training data, which the last epoch
    fits best)."""
    cfg = forecast.ForecastConfig(epochs=2, lr=0.05, batch_size=4, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 10, 1, generator=g, dtype=torch.float64) * 3
    y = 5 * x[0, :, 0] + 1
    model = forecast.fit(_LastStep(), x, y, x, y, cfg)
    w = torch.tensor([0.3, -0.2], dtype=torch.float64)
    m, v, t = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0
    order = torch.Generator().manual_seed(cfg.seed)
    clipped = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(10, generator=order)
        for i in range(0, 10, cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            xb, yb = x[0, b, 0], y[b]
            err = w[0] * xb + w[1] - yb
            grad = torch.stack([(2 * err * xb).mean(), (2 * err).mean()])
            norm = float(grad.norm())
            clipped += norm > 1
            grad = grad * min(1.0, 1.0 / (norm + 1e-6))
            t += 1
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            w = w - cfg.lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    assert clipped >= 3
    got = torch.stack([model.lin.weight[0, 0], model.lin.bias[0]]).detach()
    torch.testing.assert_close(got, w, rtol=1e-9, atol=1e-12)


# --- forecasting: the command line --------------------------------------------------------
def test_the_command_line_passes_every_setting_with_its_type_and_writes_the_result(
        tmp_path, capsys, monkeypatch):
    """``--test-fraction`` and ``--batch-size`` (dashes for the underscores) reach the
    config as a float and an int; the result is printed as a table and written to --out
    as the JSON of what run_forecast returned."""
    got = {}
    fake = {k: {"rmse": 1.5, "mae": 0.5, "params": 7} for k in ("naive", "darts_cell", "lstm")}

    def fake_run(cfg):
        got["cfg"] = cfg
        return fake

    monkeypatch.setattr(forecast, "run_forecast", fake_run)
    out = tmp_path / "f.json"
    assert forecast.main(["--test-fraction", "0.2", "--batch-size", "8", "--lr", "0.01",
                          "--out", str(out)]) == 0
    cfg = got["cfg"]
    assert (cfg.test_fraction, cfg.batch_size, cfg.lr) == (0.2, 8, 0.01)
    assert isinstance(cfg.batch_size, int) and isinstance(cfg.test_fraction, float)
    assert json.loads(out.read_text()) == fake
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["model", "naive", "darts_cell", "lstm"]


def test_a_bad_setting_on_the_command_line_is_an_error_line_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as stop:
        forecast.main(["--test-fraction", "0.6", "--val-fraction", "0.6"])
    assert stop.value.code == 2
    assert "error: test_fraction=0.6 and val_fraction=0.6" in capsys.readouterr().err


def test_the_co2_series_has_its_missing_weeks_interpolated():
    pytest.importorskip("statsmodels")
    values = forecast.load_series("co2")
    assert values.dtype == np.float64 and len(values) == 2284
    assert np.isfinite(values).all()
