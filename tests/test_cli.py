"""The command line: listing, dry runs, and clear errors (exit code 2, message on stderr)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffnas.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_list_commands(capsys):
    assert main(["list", "ops"]) == 0
    assert "sep_conv_3x3" in capsys.readouterr().out.split()
    assert main(["list", "strategies"]) == 0
    assert "darts" in capsys.readouterr().out.split()
    assert main(["list", "genotypes"]) == 0
    assert "DARTS_V2" in capsys.readouterr().out.split()


def test_train_dry_run_prints_params_and_macs(capsys):
    code = main(
        [
            "train",
            "--genotype",
            "DARTS_V2",
            "--config",
            str(ROOT / "configs/darts_cifar10.yaml"),
            "--dry-run",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert abs(summary["params"] - 3.3e6) < 0.1e6
    assert 400e6 < summary["macs"] < 700e6  # the paper reports ~530M multiply-adds


@pytest.mark.parametrize(
    "argv, match",
    [
        (["search", "search.epohcs=3"], "unknown config key"),
        (["train", "--genotype", "NOPE_V9", "--dry-run"], "genotype file not found"),
        (
            ["search", "data.root=/nonexistent/dir", "search.epochs=1", "name=x"],
            "not found in: /nonexistent/dir",
        ),
    ],
)
def test_errors_are_reported_not_raised(tmp_path, capsys, argv, match):
    argv = argv + [f"out_dir={tmp_path}"] if argv[0] == "search" else argv
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_search_command_end_to_end(tmp_path, capsys):
    argv = [
        "search",
        f"out_dir={tmp_path}",
        "name=r",
        "data.name=digits",
        "progress=false",
        "data.train_subset=32",
        "data.test_subset=16",
        "data.batch_size=16",
        "search.epochs=1",
        "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2}",
        "retrain.epochs=1",
        "retrain.batch_size=16",
        "retrain.train_subset=32",
        "retrain.network={C: 4, layers: 3}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Genotype(normal=" in out and "test accuracy:" in out
    assert (tmp_path / "r/config.yaml").exists()
    assert main(argv) == 2  # the same run directory is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path / "r")]) == 0  # a finished run: no-op
