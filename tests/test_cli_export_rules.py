"""Rules of the command line (``diffnas.cli``) and of model export (``diffnas.export``)
that a mutation audit found unchecked: the hints printed after an error or Ctrl-C (which
command goes on, for which run), exit codes, the genotype check before a run directory is
made, ``os_error_message``; export's shape inference from a state dict, the choice of the
retrained files, what counts as an earlier export, the output check over every batch and
its refusals. Each test replays the rule by hand on a tiny example rather than comparing
with text the code once printed."""

from __future__ import annotations

import errno
import json
import math
import shlex
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from test_config_cli_rules import _args
from test_export import TINY_RUN
from test_run_robustness import TINY, _interrupt
from torch import nn

from diffnas.cli import _interrupted, _resume_hint, _way_on, main, os_error_message
from diffnas.export import (
    MAX_RESOLUTION,
    ExportError,
    export_model,
    export_run,
    infer_shape,
    is_export,
    load_retrained,
    max_output_diff,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["search", f"out_dir={out}", "name=tiny", *TINY_RUN]) == 0
    return out / "tiny"


# --- resume hints and the way on after an error ----------------------------------------
def test_a_dry_run_has_no_resume_hint():
    """A dry run makes no run directory: even with --resume there is nothing to resume."""
    assert _resume_hint(_args(command="train", dry_run=True, resume="runs/r",
                              genotype="DARTS_V2")) is None
    assert _resume_hint(_args(command="train", resume="runs/r", genotype="DARTS_V2")) == \
        "diffnas train --resume runs/r --genotype DARTS_V2"


def test_a_train_resume_hint_repeats_the_resume_s_overrides_quoted():
    overrides = ["device=cpu", "data.root=/my data"]
    hint = _resume_hint(_args(command="train", resume="runs/r 1", genotype="my g.json",
                              overrides=overrides))
    assert shlex.split(hint) == ["diffnas", "train", "--resume", "runs/r 1", "--genotype",
                                 "my g.json", *overrides]


def test_a_seeds_hint_only_for_a_seeds_parent(tmp_path):
    """``search --seeds ... --resume RUN`` refuses a run without seeds.json: no hint then."""
    from diffnas.engine.rundir import SEEDS_FILE

    run = tmp_path / "par"
    run.mkdir()
    args = _args(seeds="0,1", _run_dir=str(run))
    assert _resume_hint(args) is None
    (run / SEEDS_FILE).write_text('{"seeds": [0, 1]}\n')
    assert _resume_hint(args) == f"diffnas search --seeds 0,1 --resume {run}"


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOENT, errno.EIO])
def test_only_a_full_disk_says_free_some_space(code):
    """A permission error or a missing file is not cured by freeing space."""
    assert _way_on(_args(_run_dir="runs/r"), OSError(code, "some reason")) == ""
    full = _way_on(_args(_run_dir="runs/r"), OSError(errno.ENOSPC, "full"))
    assert "free some space" in full


def test_a_diverged_search_says_to_lower_the_search_lrs_until_it_is_done(tmp_path):
    """Before search/DONE a new search with lower lrs is the way on; once the search is
    done, its genotype is retrained in a new run with a lower retrain.lr."""
    from diffnas.engine.rundir import retrain_command

    run = tmp_path / "r"
    (run / "search").mkdir(parents=True)
    diverged = FloatingPointError("the weights diverged")
    assert _way_on(_args(), diverged) == ""  # no run directory: nothing to say
    during = _way_on(_args(_run_dir=str(run)), diverged)
    assert "search.strategy.w_optim.lr or a_optim.lr" in during and "retrain.lr" not in during
    (run / "search" / "genotype.json").write_text("{}")
    assert "search.strategy.w_optim.lr" in _way_on(_args(_run_dir=str(run)), diverged)
    (run / "search" / "DONE").write_text("")
    done = _way_on(_args(_run_dir=str(run)), diverged)
    command = shlex.join(["diffnas", "train", "--config", str(run / "config.yaml"),
                          "--genotype", str(run / "search" / "genotype.json"),
                          f"out_dir={tmp_path}", "name=r-retrain"])
    assert command == retrain_command(run)
    assert done.endswith(f"lower retrain.lr: {command} retrain.lr=...)")
    assert "w_optim" not in done


def test_a_diverged_train_run_is_retrained_with_the_genotype_it_was_given(tmp_path):
    """A ``diffnas train`` run has no search/genotype.json: the way on names the
    --genotype the command was given."""
    run = tmp_path / "t"
    run.mkdir()
    way = _way_on(_args(command="train", _run_dir=str(run), genotype="DARTS_V1"),
                  FloatingPointError("diverged"))
    command = shlex.join(["diffnas", "train", "--config", str(run / "config.yaml"),
                          "--genotype", "DARTS_V1", f"out_dir={tmp_path}", "name=t-retrain"])
    assert f"{command} retrain.lr=..." in way


def test_a_command_s_own_interrupt_hint_wins(monkeypatch, capsys):
    """A command that goes on when run again (``args._interrupt_hint``) says so on
    Ctrl-C, not a resume command."""
    monkeypatch.delenv("RANK", raising=False)
    _interrupted(_args(_run_dir="runs/r", _interrupt_hint="run the same command again"),
                 process_entry=False)
    assert capsys.readouterr().err == "diffnas: interrupted; run the same command again\n"
    _interrupted(_args(_run_dir="runs/r"), process_entry=False)
    assert capsys.readouterr().err == "diffnas: interrupted; resume with: diffnas search " \
        "--resume runs/r\n"


@pytest.mark.parametrize("signum", [2, 15, 1])
def test_a_stop_signal_exits_with_128_plus_its_number(monkeypatch, capsys, signum):
    """Ctrl-C (no signum: SIGINT), SIGTERM and SIGHUP end as a shell reports a signal."""
    import diffnas.strategies.base as base
    from diffnas.engine.signals import Terminated

    def stopped():
        raise KeyboardInterrupt if signum == 2 else Terminated(signum)

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(base, "_import_penalty_modules", stopped)
    assert main(["list", "ops"]) == 128 + signum
    assert capsys.readouterr().err == "diffnas: interrupted\n"


def _torchrun_rank(monkeypatch, rank: int) -> None:
    import diffnas.engine.distributed as dist_mod

    for var in dist_mod.TORCHRUN_VARS:
        monkeypatch.setenv(var, "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))


def test_an_error_on_another_rank_names_the_rank(monkeypatch, capsys):
    """An error that may differ between ranks (a file) is printed by every rank, each
    saying which one it is; rank 0 as plain ``diffnas``."""
    argv = ["train", "--genotype", "/nonexistent/g.json", "--dry-run"]
    _torchrun_rank(monkeypatch, 1)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffnas (rank 1): error: ") and "g.json" in err
    _torchrun_rank(monkeypatch, 0)
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("diffnas: error: ")


def test_an_unknown_name_on_another_rank_is_left_to_rank_zero(monkeypatch, capsys):
    """An unknown registry name is the same on every rank: rank 0 alone says it."""
    import diffnas.strategies.base as base
    from diffnas.registry import UnknownNameError

    def unknown():
        raise UnknownNameError("unknown penalty 'nope'")

    monkeypatch.setattr(base, "_import_penalty_modules", unknown)
    _torchrun_rank(monkeypatch, 1)
    assert main(["list", "ops"]) == 2
    assert capsys.readouterr().err == ""
    _torchrun_rank(monkeypatch, 0)
    assert main(["list", "ops"]) == 2
    assert "unknown penalty 'nope'" in capsys.readouterr().err


# --- search: flags and the first lines ---------------------------------------------------
def test_workers_zero_without_seeds_is_refused_too(tmp_path, capsys):
    """--workers belongs to --seeds: a falsy 0 is still a --workers given."""
    out = tmp_path / "runs"
    assert main(["search", "--workers", "0", f"out_dir={out}", "name=a", *TINY]) == 2
    assert "--workers sets the parallel processes of --seeds" in capsys.readouterr().err
    assert not out.exists()


def test_an_unnamed_run_is_named_after_its_config_and_a_resume_prints_no_defaults_note(
        tmp_path, capsys, monkeypatch):
    """``--config X.yaml`` without name=: the run directory is ``X-<time>``. A resume
    reads the run's own config.yaml, so the built-in-defaults note is not repeated."""
    import diffnas.engine.search as search

    monkeypatch.setattr(search, "run_search", _interrupt)
    config = tmp_path / "my_tiny.yaml"
    config.write_text("progress: false\n")
    out = tmp_path / "runs"
    assert main(["search", "--config", str(config), f"out_dir={out}", *TINY]) == 130
    [run] = out.iterdir()
    assert run.name.startswith("my_tiny-"), run.name
    capsys.readouterr()
    assert main(["search", "--resume", str(run)]) == 130
    printed = capsys.readouterr().out
    assert f"run directory: {run}" in printed and "no --config" not in printed


# --- os_error_message -------------------------------------------------------------------
def test_an_existing_folder_is_not_called_a_file(tmp_path):
    """Only a *file* in the way of a folder is reported as such."""
    (tmp_path / "d").mkdir()
    err = FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "d"))
    assert os_error_message(err) == f"{tmp_path / 'd'}: File exists"


def test_an_os_error_without_a_reason_names_its_kind():
    assert os_error_message(FileNotFoundError(errno.ENOENT, None, "x.pt")) == \
        "x.pt: FileNotFoundError"


# --- train: the genotype is checked before the run directory is made --------------------
def test_a_genotype_of_a_bigger_cell_is_refused_before_the_run_directory(tmp_path, capsys):
    """DARTS_V2 has 4 intermediate nodes; a space of 2 cannot build it: refused with the
    space's reason before anything is written, not once training starts."""
    out = tmp_path / "runs"
    assert main(["train", "--genotype", "DARTS_V2", f"out_dir={out}", "name=t", *TINY_RUN,
                 "search.space.nodes=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffnas: error: ") and "search.space.nodes=4" in err, err
    assert not out.exists()


# --- export: shapes from a state dict ---------------------------------------------------
def _state(in_channels=3, classes=7, first_2d: bool = False) -> dict[str, torch.Tensor]:
    state = {"embed.weight": torch.zeros(5, 9)} if first_2d else {}
    state.update({"stem.0.weight": torch.zeros(6, in_channels, 3, 3),
                  "stem.1.weight": torch.zeros(6),
                  "cells.0.op.weight": torch.zeros(6, 6, 1, 1),
                  "classifier.weight": torch.zeros(classes, 24),
                  "classifier.bias": torch.zeros(classes)})
    return state


@pytest.mark.parametrize("first_2d", [False, True])
def test_infer_shape_reads_the_first_convolution_and_the_classifier(first_2d):
    from diffnas.data.images import BUILTIN_SHAPES

    shape = infer_shape(_state(3, 7, first_2d), "digits", None)
    assert (shape.in_channels, shape.resolution, shape.num_classes) == \
        (3, BUILTIN_SHAPES["digits"][1], 7)
    assert infer_shape(_state(), "digits", 16).resolution == 16  # the given side wins


def test_infer_shape_refuses_what_is_no_image_classifier_or_has_no_side():
    with pytest.raises(ExportError, match="pass --resolution"):
        infer_shape(_state(), "my_plugin_data", None)
    assert infer_shape(_state(), "my_plugin_data", 12).resolution == 12
    no_classifier = {k: v for k, v in _state().items() if not k.startswith("classifier")}
    no_conv = {k: v for k, v in _state().items() if v.dim() != 4}
    for state in (no_classifier, no_conv):
        with pytest.raises(ExportError, match="does not look like an image classification"):
            infer_shape(state, "digits", None)


# --- export: the run's files ------------------------------------------------------------
@pytest.mark.parametrize("gone", ["model.pt", "result.json"])
def test_a_run_missing_either_retrained_file_has_no_retrained_model(run_dir, tmp_path, gone):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    (run / "retrain" / gone).unlink()
    with pytest.raises(FileNotFoundError, match="has no retrained model"):
        load_retrained(run)


def test_export_model_refuses_an_unknown_format_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "m.tflite", "tflite")
    assert not (tmp_path / "m.tflite").exists()


def _torchscript_without_marker(path: Path) -> None:
    with warnings.catch_warnings():  # torch.jit is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(nn.Linear(2, 2).eval(), torch.zeros(1, 2)), str(path))


def test_an_export_from_before_the_marker_is_known_by_its_description_alone(tmp_path):
    """No marker: a TorchScript archive is ours only beside a description diffnas wrote;
    a zip that is no model is never ours, a description beside it or not."""
    from diffnas.export import DESCRIPTION_KEYS

    model = tmp_path / "m.pt"
    _torchscript_without_marker(model)
    assert not is_export(model)  # no description beside it
    (tmp_path / "m.json").write_text(json.dumps({"mine": 1}))
    assert not is_export(model)  # a user's own JSON
    (tmp_path / "m.json").write_text(json.dumps({k: 1 for k in DESCRIPTION_KEYS}))
    assert is_export(model)
    with zipfile.ZipFile(model, "w") as z:  # a user's zip archive under that name
        z.writestr("notes/readme.txt", "mine")
    assert zipfile.is_zipfile(model) and not is_export(model)


def test_an_onnx_file_without_nodes_is_not_an_export(tmp_path):
    onnx = pytest.importorskip("onnx")
    from diffnas.export import DESCRIPTION_KEYS

    empty = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    onnx.save(empty, str(tmp_path / "m.onnx"))
    (tmp_path / "m.json").write_text(json.dumps({k: 1 for k in DESCRIPTION_KEYS}))
    assert not is_export(tmp_path / "m.onnx")


def test_the_output_check_keeps_the_worst_batch(monkeypatch):
    """The exported file differing on the first batch only still counts."""
    import diffnas.export as export

    model = nn.Linear(3, 2).double().eval()
    inputs = [torch.randn(2, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)]
    offsets = {2: 0.25, 5: 0.0}

    def exported(path, fmt, x):
        return model(x) + offsets[x.shape[0]]

    monkeypatch.setattr(export, "run_exported", exported)
    assert max_output_diff(model, "m.pt", "torchscript", inputs) == pytest.approx(0.25)
    offsets.update({2: -0.5, 5: 0.125})
    assert max_output_diff(model, "m.pt", "torchscript", inputs) == pytest.approx(0.5)


def test_a_nan_difference_fails_the_check(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("diffnas.export.max_output_diff", lambda *a, **k: math.nan)
    with pytest.raises(ExportError, match="differ from PyTorch by nan"):
        export_run(run_dir, "torchscript", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_atol_zero_and_the_largest_resolution_are_accepted(run_dir, tmp_path):
    """The bounds are inclusive: atol 0 is an exact check, MAX_RESOLUTION a valid side
    (refused here only because the run recorded its own)."""
    res = export_run(run_dir, "torchscript", tmp_path / "m.pt", atol=0.0, check=False)
    assert res.atol == 0.0 and res.max_abs_diff is None
    assert res.input_shape == (1, 1, 8, 8)  # one example's shape, batch dimension first
    with pytest.raises(ExportError, match=rf"trained on 8x8 inputs; --resolution "
                                          rf"{MAX_RESOLUTION}"):
        export_run(run_dir, "torchscript", tmp_path / "n.pt", resolution=MAX_RESOLUTION)
    with pytest.raises(ExportError, match="must be between 1 and"):
        export_run(run_dir, "torchscript", tmp_path / "n.pt", resolution=MAX_RESOLUTION + 1)
