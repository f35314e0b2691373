"""Forecasting with the DARTS cell vs a parameter-matched LSTM (tiny, synthetic series)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffnas.engine.forecast import (
    CellForecaster,
    ForecastConfig,
    matched_lstm,
    n_params,
    run_forecast,
    windows,
)
from diffnas.genotype import published_genotype


@pytest.mark.parametrize("hidden", [8, 32, 100])
def test_lstm_matches_the_cell_parameter_count(hidden):
    cell = CellForecaster(published_genotype("DARTS_RNN_V2"), hidden)
    lstm = matched_lstm(n_params(cell))
    # DARTS cell: W0 (1+H, 2H) + 8 (H, 2H) + head; the LSTM is the closest size
    assert n_params(cell) == (1 + hidden) * 2 * hidden + 8 * hidden * 2 * hidden + hidden + 1
    assert abs(n_params(lstm) - n_params(cell)) / n_params(cell) < 0.05
    smaller, larger = matched_lstm(n_params(lstm) - 1), matched_lstm(n_params(lstm) + 1)
    assert smaller.lstm.hidden_size <= lstm.lstm.hidden_size <= larger.lstm.hidden_size


def test_windows_line_up_inputs_and_targets():
    z = np.arange(10.0)
    x, y = windows(z, 3)
    assert x.shape == (3, 7, 1) and y.tolist() == list(range(3, 10))
    assert x[:, 2, 0].tolist() == [2.0, 3.0, 4.0]


def test_forecasters_learn_a_periodic_series_better_than_naive():
    t = np.arange(400)
    series = np.sin(2 * np.pi * t / 12) + 0.01 * t  # period 12 with a drift
    cfg = ForecastConfig(hidden=8, lookback=13, epochs=8, lr=1e-2, batch_size=32)
    res = run_forecast(cfg, series)
    assert res["split"]["test"] > 40
    for name in ("darts_cell", "lstm"):
        assert res[name]["rmse"] < 0.5 * res["naive"]["rmse"], (name, res)
    assert torch.isfinite(torch.tensor(res["darts_cell"]["mae"]))


@pytest.mark.parametrize("settings, match", [
    ({"test_fraction": 0.0}, r"test_fraction=0.0 and val_fraction=0.15 must each be in"),
    ({"test_fraction": -0.2}, "must each be in"),
    ({"val_fraction": 0.0}, "must each be in"),
    ({"test_fraction": 0.6, "val_fraction": 0.6}, "sum below 1"),
    ({"series": "foo"}, "unknown series 'foo'"),
    ({"lookback": 0}, "lookback must be >= 1"),
    ({"lr": 0.0}, "lr must be > 0"),
])
def test_settings_that_would_report_nothing_are_refused(settings, match):
    """A zero test split used to report RMSE nan; a zero validation split kept the last
    epoch while the docs promise the best validation one."""
    with pytest.raises(ValueError, match=match):
        ForecastConfig(**settings)


def test_a_short_series_and_a_convolutional_genotype_are_named(capsys):
    from diffnas.engine.forecast import main

    with pytest.raises(ValueError, match=r"split .* leaves too little for lookback 20"):
        run_forecast(ForecastConfig(lookback=20), np.arange(30.0))
    with pytest.raises(SystemExit) as stop:
        main(["--genotype", "DARTS_V2", "--epochs", "1"])
    assert stop.value.code == 2
    assert "for space 'darts_cnn'; the forecaster needs a recurrent cell" in \
        capsys.readouterr().err


def test_an_out_path_in_a_missing_directory_is_refused_before_training(tmp_path, capsys,
                                                                      monkeypatch):
    """It failed with a traceback after the whole training, and the result was lost."""
    from diffnas.engine import forecast

    def never(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(forecast, "run_forecast", never)
    out = tmp_path / "nodir" / "f.json"
    with pytest.raises(SystemExit) as stop:
        forecast.main(["--epochs", "1", "--out", str(out)])
    assert stop.value.code == 2
    assert f"--out {out}: the directory {out.parent} does not exist" in capsys.readouterr().err
