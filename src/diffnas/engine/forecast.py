"""Time-series forecasting with a DARTS recurrent cell, against an LSTM of about the same
parameter count, on a real bundled series.

The series is the Mauna Loa weekly CO2 record of ``statsmodels`` (2,284 weeks from 1958,
missing weeks interpolated; ``pip install 'diffnas[timeseries]'``). The models read the
last ``lookback`` first differences (standardised with training statistics) and predict
the next one; the forecast is the last value plus that difference, and errors are
reported in the series' units (ppm) on a chronological test split, with the naive
"same as last week" forecast as a floor to beat.

    python -m diffnas.engine.forecast --genotype DARTS_RNN_V2 --out forecast.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffnas.genotype import Genotype, GenotypeError, resolve_genotype
from diffnas.supernet.rnn import Dropouts, FixedCell

SERIES = ("co2", "sunspots")


def load_series(name: str = "co2") -> np.ndarray:
    """A real univariate series bundled with statsmodels (float64, no missing values)."""
    if name not in SERIES:
        raise ValueError(f"unknown series {name!r}; known: {SERIES}")
    try:
        from statsmodels import datasets
    except ImportError:
        raise ImportError("forecasting needs statsmodels: pip install 'diffnas[timeseries]'"
                          ) from None
    if name == "co2":
        values = datasets.co2.load_pandas().data["co2"].interpolate().to_numpy()
    else:
        values = datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy()
    return np.asarray(values, dtype=np.float64)


class CellForecaster(nn.Module):
    """A fixed DARTS recurrent cell over the inputs, a linear head on the last state."""

    def __init__(self, genotype: Genotype, hidden: int) -> None:
        super().__init__()
        self.cell = FixedCell(genotype, 1, hidden, Dropouts())
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B, 1)
        h0 = x.new_zeros(x.shape[1], self.cell.nhid)
        return self.head(self.cell(x, h0)[1]).squeeze(-1)


class LstmForecaster(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][-1]).squeeze(-1)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def matched_lstm(target: int) -> LstmForecaster:
    """The LSTM whose parameter count is closest to ``target``."""
    # LSTM(1, H) + Linear(H, 1): 4H(1 + H) + 8H + H + 1 parameters
    best = min(range(1, 1024), key=lambda h: abs(4 * h * (1 + h) + 9 * h + 1 - target))
    return LstmForecaster(best)


def windows(z: np.ndarray, lookback: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N, 1) inputs of ``lookback`` consecutive values and the (N,) next values."""
    idx = np.arange(len(z) - lookback)[:, None] + np.arange(lookback)[None]
    x = torch.tensor(z[idx].T[:, :, None], dtype=torch.float32)
    y = torch.tensor(z[lookback:], dtype=torch.float32)
    return x, y


@dataclass
class ForecastConfig:
    series: str = "co2"
    genotype: str = "DARTS_RNN_V2"
    hidden: int = 32  # DARTS cell hidden size; the LSTM is sized to match its parameters
    lookback: int = 52
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    test_fraction: float = 0.15
    val_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.series not in SERIES:
            raise ValueError(f"unknown series {self.series!r}; known: {', '.join(SERIES)}")
        for key in ("hidden", "lookback", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        # a test split to report on, a validation split to pick the best epoch with, and
        # something left to train on
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1
                and self.test_fraction + self.val_fraction < 1):
            raise ValueError(f"test_fraction={self.test_fraction} and val_fraction="
                             f"{self.val_fraction} must each be in (0, 1) and sum below 1")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
        cfg: ForecastConfig) -> nn.Module:
    """Adam on MSE; keeps the weights of the best validation epoch."""
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best, best_state = math.inf, None
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(y.numel(), generator=g)
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x[:, b]), y[b])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.no_grad():
            v = nn.functional.mse_loss(model(xv), yv).item()
        if v < best:
            best, best_state = v, {k: t.clone() for k, t in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def run_forecast(cfg: ForecastConfig, series: np.ndarray | None = None) -> dict:
    """Train the DARTS-cell and the matched LSTM forecasters; test RMSE/MAE in series units."""
    values = load_series(cfg.series) if series is None else np.asarray(series, np.float64)
    diff = np.diff(values)
    n = len(diff)
    n_test, n_val = int(n * cfg.test_fraction), int(n * cfg.val_fraction)
    n_train = n - n_test - n_val
    if n_train <= cfg.lookback + 1 or min(n_test, n_val) < 1:
        raise ValueError(f"series of {len(values)} points split {n_train}/{n_val}/{n_test} "
                         f"(train/val/test differences) leaves too little for lookback "
                         f"{cfg.lookback}: train needs more than {cfg.lookback + 1}, val "
                         "and test at least 1 each")
    mu, sd = diff[:n_train].mean(), diff[:n_train].std() + 1e-12
    z = (diff - mu) / sd
    x, y = windows(z, cfg.lookback)  # target j is diff index lookback + j
    first = np.arange(len(y)) + cfg.lookback
    tr, va, te = first < n_train, (first >= n_train) & (first < n_train + n_val), \
        first >= n_train + n_val
    # level forecast: value before the predicted difference + predicted difference
    prev = torch.tensor(values[first[te]], dtype=torch.float64)
    truth = torch.tensor(values[first[te] + 1], dtype=torch.float64)

    def errors(pred_z: torch.Tensor) -> dict:
        err = prev + pred_z.double() * sd + mu - truth
        return {"rmse": err.pow(2).mean().sqrt().item(), "mae": err.abs().mean().item()}

    genotype = resolve_genotype(cfg.genotype)
    if genotype.space != "darts_rnn":
        raise GenotypeError(f"genotype {cfg.genotype!r} is for space {genotype.space!r}; the "
                            "forecaster needs a recurrent cell (darts_rnn), e.g. DARTS_RNN_V2")
    torch.manual_seed(cfg.seed)
    cell = CellForecaster(genotype, cfg.hidden)
    torch.manual_seed(cfg.seed)
    lstm = matched_lstm(n_params(cell))
    out = {"config": asdict(cfg), "points": len(values),
           "split": {"train": int(tr.sum()), "val": int(va.sum()), "test": int(te.sum())},
           "naive": errors(torch.full((int(te.sum()),), -mu / sd))}
    for name, model in (("darts_cell", cell), ("lstm", lstm)):
        fit(model, x[:, tr], y[tr], x[:, va], y[va], cfg)
        with torch.no_grad():
            out[name] = {"params": n_params(model), **errors(model.eval()(x[:, te]))}
    out["lstm"]["hidden"] = lstm.lstm.hidden_size
    return out


#: the --help text of each ForecastConfig field
FIELD_HELP = {
    "series": "the bundled series to forecast",
    "genotype": "the recurrent cell: a genotype file or a published name",
    "hidden": "the DARTS cell's hidden size; the LSTM is sized to about its parameter count",
    "lookback": "past steps (first differences) each prediction reads",
    "epochs": "training epochs of each model (the best validation epoch is kept)",
    "batch_size": "windows per batch",
    "lr": "learning rate (Adam)",
    "test_fraction": "the last fraction of the series, reported on",
    "val_fraction": "the fraction before it, which picks the best epoch",
    "seed": "seed of the initialisation and batch order",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f, v in asdict(ForecastConfig()).items():
        extra = {"choices": SERIES} if f == "series" else {}
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v,
                        help=FIELD_HELP[f], **extra)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    a = vars(ap.parse_args(argv))
    out_path = a.pop("out")
    if out_path and not Path(out_path).parent.is_dir():  # found before training, not after
        ap.exit(2, f"{ap.prog}: error: --out {out_path}: the directory "
                   f"{Path(out_path).parent} does not exist\n")
    try:
        res = run_forecast(ForecastConfig(**a))
    except (ValueError, ImportError) as exc:  # GenotypeError included: a bad input, said
        ap.exit(2, f"{ap.prog}: error: {exc}\n")
    print(f"{'model':<11} {'params':>7} {'test RMSE':>10} {'test MAE':>9}")
    for k in ("naive", "darts_cell", "lstm"):
        r = res[k]
        print(f"{k:<11} {r.get('params', 0):>7} {r['rmse']:>10.4f} {r['mae']:>9.4f}")
    if out_path:
        from diffnas.engine.checkpoint import atomic_write_text

        atomic_write_text(json.dumps(res, indent=1) + "\n", Path(out_path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
