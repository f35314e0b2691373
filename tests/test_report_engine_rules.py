"""Rules of the retraining loop, the best-epoch keeper, cost counting, forecasting, the
report, export and the run plumbing that a mutation audit could break: each test replays
a rule by hand on a tiny model (a cosine schedule, a linear drop-path ramp, a clipped SGD
step, the MACs of a 3x3 convolution) rather than comparing with numbers the code once
printed."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SHAPE, StatelessTask, tiny_space
from test_engine import _cfg
from torch import nn

from diffnas.config import RetrainConfig
from diffnas.engine.best import BestEpoch, FullBatchTrainTask
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import DropPathSchedule, TrainTask
from diffnas.report.cost import count_flops, count_macs, count_parameters, flops_by_module


# --- helpers ---------------------------------------------------------------------------
class TwoHeads(nn.Module):
    """A main and an auxiliary linear head; the auxiliary one only in training mode, as
    DARTS networks do."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.aux = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        return (self.main(x), self.aux(x)) if self.training else self.main(x)


def _batch(seed: int = 0, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g) * 5, torch.randint(0, 3, (n,), generator=g)


def _retrain_cfg(**kw) -> RetrainConfig:
    base = {"epochs": 4, "lr": 0.1, "lr_min": 0.01, "momentum": 0.9, "weight_decay": 0.01,
            "grad_clip": 0.05, "auxiliary_weight": 0.4}
    return RetrainConfig(**{**base, **kw})


def _grad_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))


def _tiny_genotype(seed: int = 0):
    from diffnas.genotype.discretize import discretize

    g = torch.Generator().manual_seed(seed)
    return discretize({"normal": torch.randn(5, 8, generator=g),
                       "reduce": torch.randn(5, 8, generator=g)}, tiny_space())


# --- retraining: the step, the schedule, drop-path ----------------------------------------
def test_a_retraining_step_is_sgd_on_main_plus_weighted_auxiliary_loss_clipped_at_grad_clip():
    """Two TrainTask steps equal SGD replayed by hand: loss = CE(main) + auxiliary_weight *
    CE(aux), gradient norm clipped to grad_clip, then weight decay and momentum."""
    cfg = _retrain_cfg()
    torch.manual_seed(0)
    model = TwoHeads()
    twin = copy.deepcopy(model)
    task = TrainTask(model, None, None, cfg)
    buf = None
    for seed in (1, 2):
        x, y = _batch(seed)
        task.step((x, y))
        twin.zero_grad()
        main, aux = twin(x)
        (F.cross_entropy(main, y) + cfg.auxiliary_weight * F.cross_entropy(aux, y)).backward()
        norm = _grad_norm(twin)
        assert norm > cfg.grad_clip  # the clip is exercised
        scale = cfg.grad_clip / (norm + 1e-6)
        with torch.no_grad():
            d = [p.grad * scale + cfg.weight_decay * p for p in twin.parameters()]
            buf = d if buf is None else [cfg.momentum * b + g for b, g in zip(buf, d)]
            for p, b in zip(twin.parameters(), buf):
                p -= cfg.lr * b
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_retraining_lr_of_each_epoch_is_the_cosine_from_lr_to_lr_min():
    """The lr an epoch trains with (logged as ``lr``) is lr_min + (lr - lr_min) *
    (1 + cos(pi e / E)) / 2 for epoch e of E."""
    cfg = _retrain_cfg(epochs=5, lr=0.2, lr_min=0.02)
    torch.manual_seed(0)
    x, y = _batch()
    task = TrainTask(TwoHeads(), None, [(x, y)], cfg)
    logged = []
    for epoch in range(cfg.epochs):
        task.step((x, y))
        logged.append(task.end_epoch(epoch)["lr"])
    want = [cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * e / cfg.epochs)) / 2
            for e in range(cfg.epochs)]
    assert logged == pytest.approx(want, rel=1e-9, abs=1e-12)


class _Recorder(StatelessTask):
    """A loop task of one batch per epoch that records the model's drop-path probability
    while it trains."""

    def __init__(self, model) -> None:
        self.model, self.seen = model, []

    def step(self, batch):
        self.seen.append(self.model.drop_path_prob)
        return {"loss": 0.0}


def test_drop_path_rises_linearly_from_zero_over_the_epochs():
    """Epoch e of E trains with drop_path * e / E (DARTS's schedule: 0 at the first epoch),
    a resumed loop included."""
    model = nn.Module()
    model.drop_path_prob = 0.0
    task = _Recorder(model)
    Loop(task, 4, [DropPathSchedule(model, 0.3)]).run()
    assert task.seen == pytest.approx([0.3 * e / 4 for e in range(4)])
    task.seen.clear()
    resumed = Loop(task, 4, [DropPathSchedule(model, 0.3)])
    resumed.epoch = 2
    resumed.run()
    assert task.seen == pytest.approx([0.3 * 2 / 4, 0.3 * 3 / 4])


def test_the_retrained_result_is_tested_on_plain_images_and_counted_without_the_aux_head(
        tmp_path, monkeypatch):
    """Retraining trains on full batches only (72 images, batches of 16: 4 steps an
    epoch). result.json's test loss and accuracy are model.pt's on the test images without
    any augmentation (cutout, crops and flips are for training only), the loss a mean
    over the images; ``params`` leaves out the auxiliary head, which the network has."""
    from diffnas.data import load_dataset
    from diffnas.engine.retrain import build_network, run_retrain
    from diffnas.spaces import DataShape

    batches = []
    real_step = TrainTask.step

    def counted(self, batch):
        batches.append(len(batch[1]))
        return real_step(self, batch)

    monkeypatch.setattr(TrainTask, "step", counted)
    cfg = _cfg("retrain.epochs=2", "retrain.batch_size=16", "retrain.cutout=4",
               "retrain.crop_padding=2", "retrain.auxiliary_weight=0.4")
    data = load_dataset("digits", train_subset=72, test_subset=40, seed=0)
    g = _tiny_genotype()
    result = run_retrain(cfg, g, tmp_path, data=data)
    assert batches == [16] * (2 * (72 // 16))
    _, model = build_network(cfg, g, DataShape(data.in_channels, data.resolution,
                                               data.num_classes))
    model.load_state_dict(torch.load(tmp_path / "retrain/model.pt", weights_only=True))
    assert model.auxiliary_head is not None
    model.eval()
    with torch.no_grad():
        logits = model(data.test_x)
    loss = F.cross_entropy(logits, data.test_y, reduction="sum").item() / len(data.test_y)
    acc = (logits.argmax(-1) == data.test_y).float().mean().item()
    assert result["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["test_acc"] == pytest.approx(acc)
    assert result["params"] == sum(p.numel() for n, p in model.named_parameters()
                                   if not n.startswith("auxiliary_head"))


# --- the best epoch (graph and plugin retrainings) --------------------------------------
def _weights(model: nn.Module) -> list[float]:
    return [float(p.detach().flatten()[0]) for p in model.parameters()]


def test_the_best_epoch_is_the_highest_accuracy_with_the_lower_loss_breaking_a_tie():
    """update() keeps an epoch of higher accuracy, or of equal accuracy and lower loss; its
    weights are a copy (later training does not change them) that restore() loads back."""
    model = nn.Linear(2, 1)
    best = BestEpoch()
    epochs = [(0.5, 1.0, True), (0.7, 0.9, True), (0.7, 0.95, False), (0.7, 0.9, False),
              (0.7, 0.8, True), (0.6, 0.1, False)]
    for epoch, (acc, loss, kept) in enumerate(epochs):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(epoch))
        assert best.update(model, epoch, acc, loss) is kept, epoch
    assert best.record == {"val_acc": 0.7, "val_loss": 0.8, "epoch": 4}
    assert _weights(model) == [5.0, 5.0]
    best.restore(model)
    assert _weights(model) == [4.0, 4.0]


def test_the_best_weights_survive_a_checkpoint(tmp_path):
    """A BestEpoch rebuilt from a saved state_dict restores the best epoch's weights."""
    model = nn.Linear(2, 1)
    best = BestEpoch()
    with torch.no_grad():
        model.weight.fill_(3.0)
    best.update(model, 0, 0.9, 0.1)
    torch.save(best.state_dict(), tmp_path / "best.pt")
    with torch.no_grad():
        model.weight.fill_(-1.0)
    again = BestEpoch()
    again.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True))
    again.restore(model)
    assert again.record["epoch"] == 0 and model.weight.eq(3.0).all()


class _Scripted(FullBatchTrainTask):
    """A full-batch task on a linear model whose validation figures are scripted."""

    def __init__(self, retrain, val):
        torch.manual_seed(0)
        super().__init__(nn.Linear(6, 3), retrain)
        self.val = list(val)
        self.x, self.y = _batch()

    def train_batch(self, epoch):
        return self.x, self.y

    def loss(self, batch):
        x, y = batch
        loss = 100 * F.cross_entropy(self.model(x), y)
        return loss, {"loss": loss.item()}

    def validate(self):
        acc, loss = self.val.pop(0)
        return {"acc": acc, "loss": loss}


def test_a_full_batch_retraining_is_adam_with_clipped_gradients_and_keeps_the_most_accurate_epoch():
    """FullBatchTrainTask: Adam at retrain.lr with retrain.weight_decay, gradients clipped
    to norm grad_clip; the kept epoch is the one of highest validation accuracy (not of
    highest loss)."""
    r = _retrain_cfg(lr=0.03, weight_decay=0.002, grad_clip=0.5)
    task = _Scripted(r, [(0.2, 0.3), (0.9, 0.2), (0.5, 0.9)])
    x, y = task.x, task.y
    (100 * F.cross_entropy(task.model(x), y)).backward()
    assert _grad_norm(task.model) > 0.5  # the clip is exercised
    group = task.optimizer.param_groups[0]
    assert isinstance(task.optimizer, torch.optim.Adam)
    assert (group["lr"], group["weight_decay"]) == (0.03, 0.002)
    loop = Loop(task, 3)
    loop.run()
    assert _grad_norm(task.model) == pytest.approx(0.5, rel=1e-4)
    assert task.best.record["epoch"] == 1
    assert [h["best_val_acc"] for h in loop.history] == [0.2, 0.9, 0.9]


# --- cost -------------------------------------------------------------------------------
def test_macs_and_flops_of_convolutions_and_a_linear_layer_by_hand():
    """A 3x3 convolution costs out_channels * H_out * W_out * in_channels * 9 MACs (its
    bias none), a linear layer in * out; FLOPs are 2 per MAC, per module and in total."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(5 * 3 * 3, 3))
    conv1 = 4 * 5 * 5 * 2 * 9
    conv2 = 5 * 3 * 3 * 4 * 9
    linear = 5 * 3 * 3 * 3
    assert count_macs(model, (2, 5, 5)) == conv1 + conv2 + linear
    assert count_flops(model, (2, 5, 5)) == 2 * (conv1 + conv2 + linear)
    by_module = flops_by_module(model, (2, 5, 5))
    assert (by_module["0"], by_module["1"], by_module["3"]) == (2 * conv1, 2 * conv2, 2 * linear)
    assert by_module[""] == 2 * (conv1 + conv2 + linear)


def test_the_auxiliary_head_costs_nothing_at_inference_and_counting_keeps_the_mode():
    """The DARTS papers count a network without its auxiliary head: MACs and FLOPs of one
    inference (eval mode) and parameters equal those of the same network built without
    it; counting leaves the model in the mode it was in."""
    space, g = tiny_space(), _tiny_genotype()
    torch.manual_seed(0)
    with_aux = space.build_network(g, C=4, layers=3, auxiliary=True)
    torch.manual_seed(0)
    without = space.build_network(g, C=4, layers=3, auxiliary=False)
    with_aux.drop_path_prob = without.drop_path_prob = 0.3
    shape = (TINY_SHAPE.in_channels, TINY_SHAPE.resolution, TINY_SHAPE.resolution)
    assert with_aux.auxiliary_head is not None
    assert count_parameters(with_aux) == count_parameters(without)
    assert count_parameters(with_aux, exclude=()) > count_parameters(without)
    for model in (with_aux, without):
        model.train()
    assert count_macs(with_aux, shape) == count_macs(without, shape)
    assert with_aux.training
    assert flops_by_module(with_aux, shape)[""] == flops_by_module(without, shape)[""]
    assert with_aux.training
    with_aux.eval()
    count_macs(with_aux, shape)
    assert not with_aux.training


def test_frozen_parameters_are_not_counted():
    """count_parameters counts trainable parameters only."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 3 * 2 + 2


# --- forecasting ------------------------------------------------------------------------
class _LastStep(nn.Module):
    """w * (the last input of the window), w starting at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.lin.weight)

    def forward(self, x):
        return self.lin(x[-1]).squeeze(-1)


def test_forecast_fit_keeps_the_weights_of_the_best_validation_epoch():
    """Training towards y = 2x while validation wants y = -2x: the validation error grows
    every epoch, so the kept weights are the first epoch's, one Adam step of lr from 0
    (lr * sign of the gradient), not the last epoch's."""
    from diffnas.engine.forecast import ForecastConfig, fit

    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(1, 32, 1, generator=g), torch.randn(1, 16, 1, generator=g)
    cfg = ForecastConfig(epochs=4, lr=0.1, batch_size=32)
    model = fit(_LastStep(), x, 2 * x[0, :, 0], xv, -2 * xv[0, :, 0], cfg)
    assert model.lin.weight.item() == pytest.approx(0.1, abs=1e-5)


@pytest.mark.parametrize("target", [500, 5_000, 40_000])
def test_the_matched_lstm_has_the_parameter_count_closest_to_the_target(target):
    """No LSTM forecaster one hidden unit smaller or larger is closer to the target."""
    from diffnas.engine.forecast import LstmForecaster, matched_lstm, n_params

    lstm = matched_lstm(target)
    h = lstm.lstm.hidden_size
    gap = abs(n_params(lstm) - target)
    for other in (h - 1, h + 1):
        assert gap <= abs(n_params(LstmForecaster(other)) - target), (h, other)


def test_forecasts_standardise_with_training_statistics_and_the_naive_errors_by_hand(
        monkeypatch):
    """The differences are standardised with the training split's mean and std (no peek
    at validation or test), and the naive forecast (next = last) errs by each test
    difference: RMSE sqrt(mean d^2), MAE mean |d|."""
    from diffnas.engine import forecast

    seen = {}
    real_windows = forecast.windows

    def recording(z, lookback):
        seen["z"] = z
        return real_windows(z, lookback)

    monkeypatch.setattr(forecast, "windows", recording)
    monkeypatch.setattr(forecast, "fit", lambda model, *args: model)  # no training needed
    series = (np.arange(120.0) ** 2) / 50 + np.sin(np.arange(120.0))
    cfg = forecast.ForecastConfig(hidden=2, lookback=4, epochs=1)
    res = forecast.run_forecast(cfg, series)
    diff = np.diff(series)
    n = len(diff)
    n_test, n_val = int(n * cfg.test_fraction), int(n * cfg.val_fraction)
    n_train = n - n_test - n_val
    z = seen["z"]
    assert abs(z[:n_train].mean()) < 1e-9 and z[:n_train].std() == pytest.approx(1.0)
    d = diff[n - n_test:]
    assert res["split"]["test"] == n_test
    assert res["naive"]["rmse"] == pytest.approx(math.sqrt(np.mean(d ** 2)), rel=1e-9)
    assert res["naive"]["mae"] == pytest.approx(np.mean(np.abs(d)), rel=1e-9)


# --- logging ----------------------------------------------------------------------------
def test_a_command_s_logging_scope_takes_its_handlers_off_and_puts_a_user_s_back(tmp_path):
    """setup_logging inside logging_scope replaces a user's handler (taken off, not
    closed); leaving the scope closes the run's log.txt handler and puts the user's back.
    A Ctrl-C inside the scope is written to the run's log.txt."""
    from diffnas.engine.logs import logging_scope, setup_logging

    logger = logging.getLogger("diffnas")
    saved = list(logger.handlers), logger.level, logger.propagate
    mine = logging.FileHandler(tmp_path / "mine.log")
    for h in saved[0]:
        logger.removeHandler(h)
    logger.addHandler(mine)
    try:
        with pytest.raises(KeyboardInterrupt), logging_scope():
            setup_logging(tmp_path, verbose=False)
            assert mine not in logger.handlers
            ours = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
            logger.info("started")
            raise KeyboardInterrupt("SIGTERM")
        assert logger.handlers == [mine] and mine.stream is not None  # not closed
        assert ours and ours[0].stream is None  # closed
        text = (tmp_path / "log.txt").read_text()
        assert "started" in text and "interrupted by SIGTERM" in text
    finally:
        logger.removeHandler(mine)
        mine.close()
        for h in saved[0]:
            logger.addHandler(h)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]



# --- checkpoints, metrics files, run directories ------------------------------------------
def test_the_rng_states_of_torch_numpy_and_python_come_back():
    """set_rng_state(rng_state()) makes torch, numpy and Python's random draw again what
    they drew after the state was taken (a plugin's step may use any of them)."""
    import random

    from diffnas.engine.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = rng_state()
    first = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random())
    torch.manual_seed(10)
    np.random.seed(20)
    random.seed(30)
    set_rng_state(state)
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()) == first


def test_a_checkpoint_every_n_epochs_still_saves_the_last_one(tmp_path):
    """Checkpoint(every=2) in a 3-epoch loop saves after epoch 2 and after the last
    epoch (3), not after epoch 1."""
    from diffnas.engine.callbacks import Checkpoint
    from diffnas.engine.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    model = nn.Module()
    model.drop_path_prob = 0.0
    loop = Loop(_Recorder(model), 3, [Checkpoint(path, every=2)])
    loop.run(stop_after=1)
    assert not path.exists()
    loop.run(stop_after=1)
    assert load_checkpoint(path)["epoch"] == 2
    loop.run()
    assert load_checkpoint(path)["epoch"] == 3


def test_a_resume_drops_the_rows_of_the_epochs_it_runs_again(tmp_path):
    """A checkpoint after epoch 1 (loop.epoch 2) and a crash after epoch 2's row was
    written: the resume keeps rows 0 and 1 only, so epoch 2 is not logged twice."""
    from diffnas.engine.callbacks import JsonLines, drop_epochs_from

    path = tmp_path / "m.jsonl"
    rows = "".join(f'{{"epoch": {e}, "loss": 1.0}}\n' for e in range(4))
    path.write_text(rows)
    drop_epochs_from(path, 2)
    assert [r["epoch"] for r in map(json.loads, path.read_text().splitlines())] \
        == [0, 1]
    path.write_text(rows)
    model = nn.Module()
    model.drop_path_prob = 0.0
    loop = Loop(_Recorder(model), 4, [JsonLines(path)])
    loop.epoch = 2
    loop.run()
    epochs = [json.loads(ln)["epoch"] for ln in path.read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_a_resumed_retraining_is_pinned_to_its_genotype(tmp_path):
    """pin_genotype: a resume with another genotype than retrain/genotype.json records is
    refused, with the same one it goes on; a new run records the genotype it is given."""
    from diffnas.engine.rundir import pin_genotype
    from diffnas.genotype import Genotype

    a, b = _tiny_genotype(0), _tiny_genotype(1)
    assert a.to_dict() != b.to_dict()
    pin_genotype(tmp_path, a, resume=False)
    with pytest.raises(ValueError, match="retraining another genotype"):
        pin_genotype(tmp_path, b, resume=True)
    pin_genotype(tmp_path, a, resume=True)
    pin_genotype(tmp_path, b, resume=False)
    assert Genotype.load(tmp_path / "genotype.json").to_dict() == b.to_dict()


def test_data_whose_images_changed_by_a_percent_are_other_data():
    """same_data compares float summaries within a relative 1e-4: images scaled by 1.01
    are other data, a rounding difference of 1e-6 relative is not; a field only the new
    data has is a difference too."""
    from diffnas.engine.rundir import data_fingerprint, same_data

    @dataclasses.dataclass
    class Images:
        x: torch.Tensor
        y: torch.Tensor

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 1, 4, 4, generator=g) + 0.5, torch.arange(20)
    before = data_fingerprint(Images(x, y))
    assert same_data(before, data_fingerprint(Images(x * (1 + 1e-6), y))) == []
    assert same_data(before, data_fingerprint(Images(x * 1.01, y))) == ["x"]
    assert same_data(before, data_fingerprint(Images(x, y.flip(0)))) == ["y"]
    assert same_data(before, {**before, "names": ["a", "b"]}) == ["names"]


def test_a_retraining_begun_before_runs_recorded_their_maker_keeps_its_test_subset(tmp_path):
    """test_subset_seed: a retraining from before made_by.txt (metrics, no made_by.txt, no
    test_subset.json) drew its test subset with seed + 1, and goes on with it; a new one
    records None (the fixed subset); either is read back from retrain/test_subset.json."""
    from diffnas.engine.rundir import mark_made_by, test_subset_seed

    old, new = tmp_path / "old", tmp_path / "new"
    (old / "retrain").mkdir(parents=True)
    (old / "retrain" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    assert test_subset_seed(old, 5) == 6
    assert test_subset_seed(old, 9) == 6  # recorded: the seed it started with
    new.mkdir()
    mark_made_by(new, "search")
    assert test_subset_seed(new, 5) is None
    assert (new / "retrain" / "test_subset.json").is_file()


def test_a_run_stops_before_a_retraining_batch_larger_than_its_images_only():
    """check_retrain_batch refuses a batch larger than the retraining's images; a batch of
    exactly all of them is one full batch, and runs."""
    from diffnas.config import ConfigError, load_config
    from diffnas.engine.retrain import check_retrain_batch

    cfg = load_config(None, ["retrain.batch_size=64", "retrain.train_subset=64"])
    check_retrain_batch(cfg, 100)
    check_retrain_batch(cfg, 64)
    with pytest.raises(ConfigError, match="exceeds the 63 training images"):
        check_retrain_batch(cfg, 63)


def test_augmentation_as_large_as_the_images_is_refused_before_anything_runs():
    """check_augment_fits: a cutout square or a crop padding of the images' side is
    refused (a cutout of the side can erase a whole image); one pixel less is allowed."""
    from diffnas.config import ConfigError, load_config
    from diffnas.engine.retrain import check_augment_fits

    off = ["retrain.cutout=0", "retrain.crop_padding=0"]
    for key in ("cutout", "crop_padding"):
        check_augment_fits(load_config(None, [*off, f"retrain.{key}=7"]), 8)
        with pytest.raises(ConfigError, match=f"retrain.{key}=8 is not smaller than the 8x8"):
            check_augment_fits(load_config(None, [*off, f"retrain.{key}=8"]), 8)


def test_a_resume_may_change_where_a_run_runs_but_not_what_it_computes(tmp_path):
    """load_run_config takes the overrides of RESUME_OVERRIDES (device, data.root, ...)
    and refuses any other setting, before anything runs."""
    from diffnas.config import ConfigError, load_config, save_config
    from diffnas.engine.rundir import load_run_config

    save_config(load_config(None, ["search.epochs=3"]), tmp_path / "config.yaml")
    cfg = load_run_config(tmp_path, ["device=cpu", f"data.root={tmp_path}"], device=False)
    assert cfg.search.epochs == 3 and cfg.data.root == str(tmp_path)
    with pytest.raises(ConfigError, match=r"may change, not \['search.epochs=10'\]"):
        load_run_config(tmp_path, ["search.epochs=10"], device=False)


# --- compare ----------------------------------------------------------------------------
def test_a_p_value_of_exactly_the_threshold_is_not_a_clear_difference():
    """compare's pages say "Clear: p < 0.05": one seed against 19 higher ones gives the
    permutation test's smallest p, 1/20 = 0.05, which is not below 0.05."""
    from diffnas.report.compare import _adjust, _too_few_lines, difference

    d = difference([0.5], [0.6 + 0.001 * i for i in range(19)])
    assert d["p"] == pytest.approx(1 / 20) and d["smallest_p"] == pytest.approx(1 / 20)
    _adjust([{"vs_first": d}])
    assert not d["clear"]  # (1 - 0.95 is 0.050000000000000044 in floating point)
    # and the design (1 seed against 19) is named as too small to show a difference
    lines = _too_few_lines([{"label": "a"}, {"label": "b", "vs_first": d}])
    assert len(lines) == 1 and "1 and 19 unpaired seeds" in lines[0]


# --- the report and its plots -------------------------------------------------------------
def _run_data(tmp_path, result=None, search=(), retrain=()):
    from diffnas.config import load_config
    from diffnas.report.plots import RunData

    cfg = load_config(None, ["search.epochs=2", "retrain.epochs=2"])
    return RunData(tmp_path, cfg, None, list(search), [], list(retrain), result, "search")


def test_the_report_summary_gives_flops_as_twice_the_macs_and_the_last_search_epoch(tmp_path):
    """The summary's MACs and FLOPs rows (2 FLOPs per multiply-accumulate), and the search
    accuracy of the last epoch logged, not the first."""
    from diffnas.report.html import _summary_rows

    result = {"test_acc": 0.5, "epochs_done": 2, "params": 1000, "macs": 1_500_000}
    search = [{"epoch": 0, "val_acc": 0.25}, {"epoch": 1, "val_acc": 0.75}]
    rows = dict(_summary_rows(_run_data(tmp_path, result, search)))
    assert rows["MACs per image"] == "1.50 M"
    assert rows["FLOPs per image (2 x MACs)"] == "3.00 M"
    acc = [v for k, v in rows.items() if k.startswith("search validation accuracy")]
    assert acc == ["75.00%"]


def test_epochs_are_numbered_from_one_in_the_report_table_and_the_curves():
    """metrics.jsonl counts epochs from 0; the report's tables and the curves' x axes show
    epoch e as e + 1."""
    from diffnas.report.html import _metrics_table
    from diffnas.report.plots import curves_figure

    rows = [{"epoch": e, "loss": 1.0 / (e + 1), "acc": 0.5} for e in range(3)]
    table = _metrics_table(rows)
    cells = [int(c) for c in re.findall(r'<tr><td class="num">(\d+)</td>', table)]
    assert cells == [1, 2, 3]
    fig = curves_figure(rows, rows)
    for ax in fig.axes:
        for line in ax.lines:
            assert list(line.get_xdata()) == [1, 2, 3]


# --- export -----------------------------------------------------------------------------
class _FrozenBatch(nn.Module):
    """A network whose trace bakes in the batch size it was traced with."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(4, 3)

    def forward(self, x):
        return self.classifier(x.flatten(1))[: int(x.shape[0])]


def test_an_export_that_froze_the_batch_size_is_refused(tmp_path, monkeypatch):
    """export_run checks the file at a batch size other than the traced one: a network
    traced at batch 2 that returns 2 rows for 5 inputs is refused, and nothing is
    written."""
    from diffnas import export
    from diffnas.spaces import DataShape

    run = tmp_path / "run"
    (run / "retrain").mkdir(parents=True)
    (run / "retrain" / "result.json").write_text("{}")
    monkeypatch.setattr(export, "load_retrained", lambda *a, **k: (
        _FrozenBatch().eval(), DataShape(1, 2, 3)))
    with pytest.raises(export.ExportError, match="output shape"):
        export.export_run(run, "torchscript")
    assert not (run / "export" / "model.pt").exists()


class _Branch(nn.Module):
    """Doubles inputs of positive mean, negates the others: a trace keeps the branch of
    the example it was traced on."""

    def forward(self, x):
        return 2 * x if bool(x.mean() > 0) else -x


def test_the_output_check_reports_the_largest_difference_over_every_batch(tmp_path):
    """max_output_diff is the largest difference over all the batches it is given, the
    first included: traced on a positive batch, the file doubles a negative one, which
    the network negates (3 |x| apart)."""
    from diffnas.export import export_model, max_output_diff

    pos, neg = torch.full((2, 3), 0.5), torch.tensor([[-1.0, -2.0, 0.5], [-1.0, 0.0, 0.0]])
    path = export_model(_Branch(), pos, tmp_path / "m.pt", "torchscript")
    assert max_output_diff(_Branch(), path, "torchscript", [neg, pos]) == pytest.approx(6.0)


def test_a_zip_that_holds_no_model_is_not_an_export_even_beside_a_description(tmp_path):
    """is_export: a user's zip archive named like an export, beside a model.json diffnas
    wrote, holds no TorchScript model, so it is not replaced as an earlier export."""
    import zipfile

    from diffnas.export import DESCRIPTION_KEYS, is_export

    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes/readme.txt", "mine")
    (tmp_path / "model.json").write_text(json.dumps({k: 1 for k in DESCRIPTION_KEYS}))
    assert not is_export(path)
