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
    # every domain's components, each marked with the space it serves
    assert main(["list", "ops"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "gat (graph, for the gnn space)" in out and "tanh (recurrent, for the darts_rnn " \
        "space)" in out
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {"cora (graph, for the gnn space)", "ptb (text, for the darts_rnn space)",
            "npz"} <= set(out)


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
    """A search and retraining from the command line; called in-process (a notebook), the
    command leaves the ``diffnas`` logger as it found it: the caller's own handler back in
    place, open, and nothing of the run's (its log.txt, a console stream) still attached."""
    import io
    import logging

    logger, mine = logging.getLogger("diffnas"), logging.StreamHandler(io.StringIO())
    logger.addHandler(mine)
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
        "retrain.cutout=4",  # (16, CIFAR's, is refused: as large as the 8x8 digits)
    ]
    try:
        assert main(argv) == 0
        assert logger.handlers == [mine] and not mine.stream.closed
    finally:
        logger.removeHandler(mine)
    out = capsys.readouterr().out
    assert "Genotype(normal=" in out and "test accuracy:" in out
    assert (tmp_path / "r/config.yaml").exists()
    log = (tmp_path / "r/log.txt").read_text()
    logger.warning("after the command")  # not written into the finished run's log
    assert (tmp_path / "r/log.txt").read_text() == log and "after the command" not in log
    assert main(argv) == 2  # the same run directory is not overwritten
    assert "--resume" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path / "r")]) == 0  # a finished run: no-op


def test_resume_keeps_the_runs_settings(tmp_path, capsys):
    """--resume refuses --config and overrides that change what the run computes; where
    it runs may change. A multi-seed parent is resumed with --seeds only."""
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("search: {epochs: 1}\n")
    assert main(["search", "--resume", str(run), "search.epochs=10"]) == 2
    assert "only device, progress, plots, data.root, plugins may change" in capsys.readouterr().err
    assert main(["search", "--resume", str(run), "--config",
                 str(ROOT / "configs/darts_fashion_mnist.yaml")]) == 2
    assert "drop --config" in capsys.readouterr().err
    (tmp_path / "par").mkdir()
    (tmp_path / "par" / "seeds.json").write_text('{"seeds": [0]}\n')
    (tmp_path / "par" / "config.yaml").write_text("search: {epochs: 1}\n")
    assert main(["search", "--resume", str(tmp_path / "par")]) == 2
    assert "multi-seed run" in capsys.readouterr().err


def test_retrain_resume_refuses_another_genotype(tmp_path, capsys):
    from diffnas.genotype import resolve_genotype

    argv = ["train", "--genotype", "DARTS_V2", f"out_dir={tmp_path}", "name=t",
            "data.name=digits", "progress=false", "data.test_subset=16",
            "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=32",
            "retrain.network={C: 4, layers: 3}", "retrain.cutout=4"]
    assert main(argv) == 0
    other = resolve_genotype("DARTS_V1")
    other.save(tmp_path / "v1.json")
    assert main(["train", "--genotype", str(tmp_path / "v1.json"), "--resume",
                 str(tmp_path / "t")]) == 2
    assert "retraining another genotype" in capsys.readouterr().err
    assert main(["train", "--genotype", "DARTS_V2", "--resume", str(tmp_path / "t")]) == 0
    # as the README says: --resume RUN alone continues with the genotype the run recorded
    assert main(["train", "--resume", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    assert main(["train", "--dry-run"]) == 2
    assert "--genotype is required" in capsys.readouterr().err


def test_overrides_may_follow_a_flag(capsys):
    """``--config C a=1 --dry-run b=2``: the overrides after the flag count too, and an
    unknown flag is still an error."""
    argv = ["train", "--genotype", "DARTS_V2", "--config", str(ROOT / "configs/darts_cifar10.yaml"),
            "retrain.network.C=8", "--dry-run", "retrain.network.layers=5"]
    assert main(argv) == 0
    small = capsys.readouterr().out
    assert main(argv[:-1]) == 0
    assert capsys.readouterr().out != small  # layers=5 took effect
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--no-such-flag"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments:" in err and "--no-such-flag" in err


def test_a_dataset_read_from_data_root_with_none_set_writes_no_run_directory(tmp_path,
                                                                              capsys):
    """data.root unset for CIFAR-10 (or npz, folder, Cora) is refused before the run
    directory is made; a dry run, which reads no data, still works without it."""
    for config in ("darts_cifar10.yaml", "gnn_cora.yaml"):
        argv = ["search", "--config", str(ROOT / "configs" / config), f"out_dir={tmp_path}",
                "name=r"]
        assert main(argv) == 2
        assert "data.root is not set" in capsys.readouterr().err
    assert main(["train", "--genotype", "DARTS_V2", "--config",
                 str(ROOT / "configs/darts_cifar10.yaml"), f"out_dir={tmp_path}"]) == 2
    assert main(["search", "--config", str(ROOT / "configs/darts_cifar10.yaml"),
                 "--seeds", "0", "--workers", "1", f"out_dir={tmp_path}"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert main(["train", "--genotype", "DARTS_V2", "--config",
                 str(ROOT / "configs/darts_cifar10.yaml"), "--dry-run"]) == 0


def test_absent_dataset_files_write_no_run_directory(tmp_path, capsys):
    """Files absent from data.root are refused before the run directory is made (it used
    to be made, holding a config alone), for search, --seeds and train, and for every kind
    of data that reads files: images, text, graphs."""
    empty, out = tmp_path / "empty", tmp_path / "runs"
    empty.mkdir()
    cases = [("darts_cifar10.yaml", "CIFAR-10 files missing", "DARTS_V2"),
             ("darts_fashion_mnist.yaml", f"IDX files not found in: {empty}", "DARTS_V2"),
             ("darts_rnn_ptb.yaml", f"missing {empty / 'ptb.train.txt'}", "DARTS_RNN_V2"),
             ("gnn_cora.yaml", f"missing {empty / 'ind.cora.x'}", None)]
    for config, says, genotype in cases:
        argv = ["--config", str(ROOT / "configs" / config), f"out_dir={out}", f"data.root={empty}"]
        assert main(["search", *argv]) == 2
        assert says in capsys.readouterr().err, config
        if genotype:  # (no published gnn genotype)
            assert main(["train", "--genotype", genotype, *argv]) == 2
            assert says in capsys.readouterr().err, config
    argv = ["search", "--seeds", "0,1", "--workers", "1", "--config",
            str(ROOT / "configs/darts_cifar10.yaml"), f"out_dir={out}", f"data.root={empty}"]
    assert main(argv) == 2
    assert "CIFAR-10 files missing" in capsys.readouterr().err
    assert not out.exists()


def test_train_resume_knows_the_genotype_even_when_the_data_was_unreadable(tmp_path, capsys):
    """The genotype is recorded with the run directory, before the data is read: a run
    stopped by files found damaged only on reading resumes with `train --resume RUN
    data.root=...`."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(b"not a pickle")
    argv = ["train", "--genotype", "DARTS_V1", "--config", str(ROOT / "configs/darts_cifar10.yaml"),
            f"out_dir={tmp_path / 'runs'}", "name=t", f"data.root={bad}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'data_batch_1'}" in err
    run = tmp_path / "runs/t"
    assert f"continue it with: diffnas train --resume {run} --genotype DARTS_V1;" in err
    from diffnas.genotype import Genotype, resolve_genotype

    recorded = Genotype.load(tmp_path / "runs/t/retrain/genotype.json")
    assert recorded == resolve_genotype("DARTS_V1")


def test_a_reader_that_stops_reading_is_not_an_error():
    """``diffnas list | head -1``: the closed pipe ends the command quietly with the status
    a shell gives SIGPIPE (141), not a traceback or an error line on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "diffnas.cli", "list", "ops"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", "/tmp/abs"])
def test_a_run_name_that_is_a_path_is_refused(name, tmp_path, capsys):
    """name= is the run folder inside out_dir: '../x' used to write outside out_dir."""
    out = tmp_path / "runs"
    argv = ["search", f"out_dir={out}", f"name={name}", "retrain.enabled=false"]
    assert main(argv) == 2
    assert f"name={name}: the run directory's own name" in capsys.readouterr().err
    assert not out.exists() and sorted(tmp_path.iterdir()) == []
