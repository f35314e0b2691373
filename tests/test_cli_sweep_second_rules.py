"""Second mutation audit of the command line (``diffnas.cli``) and the ``diffnas latency``
commands (``hardware/cli.py``): rules the first audit's tests left unchecked. A command
line without a command, or ``latency measure`` without ``--out``, is a usage error (exit
2), not a traceback; ``measure``'s ``--seed`` and ``--chunk`` default to the library's own
``build_dataset`` defaults; ``--threads`` reaches the timing settings; Ctrl-C is reported
by rank 0 alone, whatever the other ranks' numbers, and an in-process call keeps its
caller's SIGINT handler; a retraining resumes with its own config (``--config``
refused), ``train --resume`` of a search that never retrains says how to retrain it, and
a dry run's refusal claims nothing false. Each rule is replayed by hand on a tiny example
(no search runs here)."""

from __future__ import annotations

import argparse
import inspect

import pytest

from diffnas.cli import main


def _parsed(argv: list[str]) -> argparse.Namespace:
    from diffnas.cli import build_parser

    return build_parser().parse_args(argv)


# --- usage errors ------------------------------------------------------------------------
def test_no_command_is_a_usage_error_naming_the_commands(capsys):
    """``diffnas`` alone: argparse's usage error (exit 2) listing the commands, as for any
    other malformed command line, not a traceback."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: diffnas" in err and "search" in err and "latency" in err


def test_measure_without_out_is_a_usage_error_naming_out(tmp_path, monkeypatch, capsys):
    """``--out`` is where the records go: leaving it out is refused before any timing, and
    nothing is written anywhere (no default file in the working directory)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["latency", "measure", "-n", "1"])
    assert info.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_measure_seed_and_chunk_default_to_the_librarys_build_dataset():
    """``latency measure`` with no ``--seed``/``--chunk`` samples and interleaves as
    ``build_dataset`` does by default (one dataset, whichever way it was built)."""
    from diffnas.hardware.dataset import build_dataset

    defaults = {k: v.default for k, v in inspect.signature(build_dataset).parameters.items()}
    args = _parsed(["latency", "measure", "--out", "l.jsonl"])
    assert (args.seed, args.chunk) == (defaults["seed"], defaults["chunk"])



@pytest.mark.parametrize("command", [
    ["latency", "measure", "--out", "l.jsonl"],
    ["latency", "report", "--genotype", "DARTS_V2"],
    ["latency", "sweep", "--config", "c.yaml", "--predictor", "p.pt", "--out", "sw"],
], ids=["measure", "report", "sweep"])
@pytest.mark.parametrize("threads", [0, 3])
def test_threads_reach_the_timing_settings(command, threads):
    """``--threads 0`` (as the environment sets them) or ``--threads 3`` is what the
    timing uses, not the default 1."""
    from diffnas.hardware.cli import _settings

    assert _settings(_parsed([*command, "--threads", str(threads)])).threads == threads

# --- Ctrl-C and resume ---------------------------------------------------------------------
@pytest.mark.parametrize("rank", ["1", "2", "7"])
def test_ctrl_c_on_any_rank_but_zero_says_nothing(monkeypatch, capsys, rank):
    """Under torchrun every rank receives Ctrl-C; rank 0 alone says so (once, not once per
    rank), whichever the other ranks' numbers."""
    from diffnas.cli import _interrupted

    args = argparse.Namespace(command="search", resume="runs/r", seeds=None, overrides=[],
                              dry_run=False, _run_dir="runs/r", genotype=None)
    monkeypatch.setenv("RANK", rank)
    _interrupted(args, process_entry=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    _interrupted(args, process_entry=False)
    assert capsys.readouterr().err == ("diffnas: interrupted; resume with: diffnas search "
                                       "--resume runs/r\n")


def test_train_resume_of_a_search_without_retraining_says_how_to_retrain_it(tmp_path,
                                                                            capsys):
    """``train --resume RUN`` (no ``--genotype``) of a finished search made with
    ``retrain.enabled=false``: it never began a retraining, so the answer is the command
    that retrains its genotype as a new run, not a demand for ``--genotype``; nothing is
    written into the run."""
    from diffnas.config import load_config, save_config
    from diffnas.engine.rundir import mark_made_by, retrain_command
    from diffnas.genotype import resolve_genotype

    run = tmp_path / "s"
    (run / "search").mkdir(parents=True)
    save_config(load_config(None, ["retrain.enabled=false"]), run / "config.yaml")
    mark_made_by(run, "search")
    resolve_genotype("DARTS_V2").save(run / "search" / "genotype.json")
    (run / "search" / "DONE").write_text("")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a search made with retrain.enabled=false" in err
    assert retrain_command(run) in err and "--genotype is required" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_dry_run_resume_without_genotype_does_not_call_a_recorded_genotype_missing(
        tmp_path, capsys):
    """``train --dry-run --resume RUN`` builds from the flags alone and needs
    ``--genotype``; the refusal must not claim that RUN's recorded genotype does not exist
    when it does."""
    from diffnas.engine.rundir import mark_made_by
    from diffnas.genotype import resolve_genotype

    run = tmp_path / "t"
    (run / "retrain").mkdir(parents=True)
    mark_made_by(run, "train")
    resolve_genotype("DARTS_V2").save(run / "retrain" / "genotype.json")
    assert main(["train", "--dry-run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--genotype is required" in err and "does not exist" not in err


def test_ctrl_c_of_an_in_process_call_keeps_the_callers_sigint_handler(monkeypatch, capsys):
    """``main([...])`` called in-process (a notebook, a test) keeps its caller's SIGINT
    handler after a Ctrl-C; only the process's own entry (it read ``sys.argv``) lets a
    second SIGINT end the process at once."""
    import signal

    from diffnas.cli import _interrupted

    def own(signum, frame):  # the caller's handler
        raise KeyboardInterrupt

    args = argparse.Namespace(command="list", _interrupt_hint=None)
    monkeypatch.setenv("RANK", "0")
    before = signal.signal(signal.SIGINT, own)
    try:
        _interrupted(args, process_entry=False)
        assert signal.getsignal(signal.SIGINT) is own
        _interrupted(args, process_entry=True)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err == "diffnas: interrupted\n" * 2


def test_a_retraining_resumes_with_its_own_config_and_refuses_another(tmp_path):
    """``train --resume RUN`` of a run ``diffnas train`` made continues with the run's
    saved config (a search ``--resume`` of it is what is refused); a ``--config`` beside
    ``--resume`` is refused, naming the flag to drop."""
    from diffnas.cli import _resume_config
    from diffnas.config import ConfigError, load_config, save_config
    from diffnas.engine.rundir import mark_made_by

    run = tmp_path / "t"
    (run / "retrain").mkdir(parents=True)
    save_config(load_config(None, ["seed=5"], search=False), run / "config.yaml")
    mark_made_by(run, "train")
    args = argparse.Namespace(resume=str(run), config=None, overrides=[])
    assert _resume_config(args, search=False).seed == 5
    args.config = str(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=rf"--resume {run} continues with the run's own "
                                          r"config\.yaml; drop --config"):
        _resume_config(args, search=False)
