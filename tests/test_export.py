"""Export of the retrained network: the exported file computes what PyTorch computes
(within 1e-5), checked here independently of the exporter's own check."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffnas.cli import main
from diffnas.export import (
    ExportError,
    export_run,
    is_export,
    load_retrained,
    max_output_diff,
    run_exported,
)

TINY_RUN = [
    "data.name=digits", "data.train_subset=64", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=1",
    "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
    "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=64",
    "retrain.network={C: 4, layers: 3}", "retrain.auxiliary_weight=0.4", "retrain.cutout=0",
    "progress=false",
]
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
FORMATS = ["torchscript",
           pytest.param("onnx", marks=pytest.mark.skipif(
               not HAS_ONNX, reason="needs onnx + onnxruntime: pip install 'diffnas[export]'"))]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["search", f"out_dir={out}", "name=tiny", *TINY_RUN]) == 0
    return out / "tiny"


def test_load_retrained_rebuilds_the_saved_network(run_dir):
    model, shape = load_retrained(run_dir)
    assert (shape.in_channels, shape.resolution, shape.num_classes) == (1, 8, 10)
    saved = torch.load(run_dir / "retrain/model.pt", weights_only=True)
    assert set(model.state_dict()) == set(saved)  # auxiliary head included
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert not model.training


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_round_trip_matches_pytorch(run_dir, tmp_path, fmt):
    out = tmp_path / f"m.{fmt}"
    res = export_run(run_dir, fmt, out)
    assert res.path == out and out.is_file() and res.max_abs_diff <= 1e-5
    # independent check: fresh inputs, a batch size the exporter never saw
    model, _ = load_retrained(run_dir)
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = model(x)
    got = run_exported(out, fmt, x)
    assert got.shape == (7, 10)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_check_detects_a_different_model(run_dir, tmp_path, fmt):
    out = export_run(run_dir, fmt, tmp_path / "m").path
    model, _ = load_retrained(run_dir)
    with torch.no_grad():
        model.classifier.bias.add_(0.5)  # the exported file no longer matches this model
    x = [torch.randn(3, 1, 8, 8)]
    assert max_output_diff(model, out, fmt, x) == pytest.approx(0.5, abs=1e-4)


def test_export_command_default_path(run_dir):
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    assert (run_dir / "export" / "model.pt").is_file()


def test_export_without_retraining_is_a_clear_error(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("retrain"))
    with pytest.raises(FileNotFoundError, match="no retrained model"):
        export_run(partial, "torchscript")
    assert main(["export", str(partial), "--format", "torchscript"]) == 2


def test_export_of_a_run_still_retraining_names_the_process_holding_it(run_dir, tmp_path):
    """A run whose retraining is still going has no model yet: the error says the run is
    in use and by which process, not to run the retraining (it runs)."""
    from diffnas.engine.runlock import run_lock

    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("retrain"))
    with run_lock(partial), pytest.raises(
            FileNotFoundError, match=rf"still going .*\(pid {os.getpid()}\) holds it"):
        export_run(partial, "torchscript")
    with pytest.raises(FileNotFoundError, match="run or finish the retraining first"):
        export_run(partial, "torchscript")  # freed: the usual error


def test_a_search_without_retraining_says_how_to_retrain_it(tmp_path, capsys, monkeypatch):
    """A search made with retrain.enabled=false sent its user in a circle (export: "run or
    finish the retraining"; train --resume: "the run stopped before retraining began";
    with --genotype: "continue it with diffnas search --resume", which only reprints the
    genotype). Each now gives the command that retrains it as a new run, which works as
    printed and exports."""
    import shlex

    assert main(["search", f"out_dir={tmp_path}", "name=s", *TINY_RUN,
                 "retrain.enabled=false"]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "s"
    command = shlex.join(["diffnas", "train", "--config", str(run / "config.yaml"),
                          "--genotype", str(run / "search" / "genotype.json"),
                          f"out_dir={tmp_path}", "name=s-retrain"])
    assert f"no retraining (retrain.enabled=false); to retrain this genotype as a new run: " \
           f"{command}" in printed
    for argv in (["export", str(run), "--format", "torchscript"], ["train", "--resume", str(run)],
                 ["train", "--resume", str(run), "--genotype", str(run / "search/genotype.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{run} is a search made with retrain.enabled=false" in err and command in err
    with monkeypatch.context() as m:  # --resume . gave out_dir=. name=-retrain (inside it)
        m.chdir(run)
        assert main(["train", "--resume", "."]) == 2
        assert command in capsys.readouterr().err
    assert main(shlex.split(command)[1:]) == 0
    assert main(["export", str(tmp_path / "s-retrain"), "--format", "torchscript"]) == 0


def test_weights_that_do_not_fit_the_recorded_network_are_a_clear_error(run_dir, tmp_path,
                                                                       capsys):
    """config.yaml edited to another network (here: wider) under the saved model.pt was a
    torch RuntimeError traceback; now an error naming both files."""
    edited = tmp_path / "edited"
    shutil.copytree(run_dir, edited)
    cfg = edited / "config.yaml"
    # (its digest line dropped, as an edit is otherwise refused before the weights are read)
    cfg.write_text(cfg.read_text().split("\n", 1)[1].replace("C: 4", "C: 6"))
    assert main(["export", str(edited), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert f"{edited / 'retrain/model.pt'} does not fit the network {cfg}" in err
    assert "size mismatch" in err and "Traceback" not in err


def test_an_out_path_that_would_lose_the_model_is_refused(run_dir, tmp_path):
    """model.json (the description) would overwrite a model named X.json; a directory
    would fail deep inside torch's writer."""
    with pytest.raises(ExportError, match=r"\.json is the name of the model's description"):
        export_run(run_dir, "torchscript", tmp_path / "model.json", check=False)
    with pytest.raises(ExportError, match="is a directory"):
        export_run(run_dir, "torchscript", tmp_path, check=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_an_error(run_dir):
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(run_dir, "tflite")


def test_an_out_suffix_of_the_other_format_is_refused(run_dir, tmp_path):
    """--format onnx --out m.pt wrote an ONNX file a deployer's torch.jit.load fails on."""
    with pytest.raises(ExportError, match=r"m\.pt: \.pt is the suffix of torchscript files, "
                                          r"not onnx; use .*m\.onnx"):
        export_run(run_dir, "onnx", tmp_path / "m.pt", check=False)
    with pytest.raises(ExportError, match=r"\.onnx is the suffix of onnx files, not torchscript"):
        export_run(run_dir, "torchscript", tmp_path / "m.onnx", check=False)
    assert list(tmp_path.iterdir()) == []


def test_a_resolution_other_than_the_trained_one_is_refused(run_dir, capsys):
    """--resolution is for runs that record no input side; the trained side wins, and a
    different one would make model.json describe inputs the model never saw."""
    with pytest.raises(ExportError, match=r"trained on 8x8 inputs; --resolution 16"):
        load_retrained(run_dir, resolution=16)
    assert load_retrained(run_dir, resolution=8)[1].resolution == 8
    assert main(["export", str(run_dir), "--format", "torchscript", "--no-check"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["max_abs_diff"] is None  # valid JSON


def test_a_failed_check_leaves_the_previous_export(run_dir, tmp_path, monkeypatch):
    """The file appears at --out only after it passed the output check: a failing check
    keeps the earlier export byte for byte and leaves no temporary file."""
    out = tmp_path / "m.pt"
    export_run(run_dir, "torchscript", out)
    before = out.read_bytes()
    monkeypatch.setattr("diffnas.export.max_output_diff", lambda *a, **k: 1.0)
    with pytest.raises(ExportError, match="differ from PyTorch by 1 .*nothing was written"):
        export_run(run_dir, "torchscript", out, seed=1)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.pt"]


def test_a_users_json_beside_the_export_is_not_replaced(run_dir, tmp_path):
    mine = tmp_path / "net.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(ExportError, match="net.json exists and is not a model description"):
        export_run(run_dir, "torchscript", tmp_path / "net.pt", check=False)
    assert mine.read_text() == '{"mine": 1}' and not (tmp_path / "net.pt").exists()
    export_run(run_dir, "torchscript", tmp_path / "again.pt", check=False)
    export_run(run_dir, "torchscript", tmp_path / "again.pt", check=False)  # its own: fine


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--atol", "nan", "--atol must be a finite number >= 0"),
    ("--atol", "-1", "--atol must be a finite number >= 0"),
    ("--resolution", "0", "--resolution must be between 1 and"),
    ("--resolution", "100000", "--resolution must be between 1 and"),
])
def test_bad_export_flags_are_named(run_dir, capsys, flag, value, message):
    assert main(["export", str(run_dir), "--format", "torchscript", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_an_output_path_under_a_file_is_a_one_line_error(run_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["export", str(run_dir), "--format", "torchscript", "--out",
                  str(afile / "m.pt")],
                 ["plot", str(run_dir), "--out", str(afile / "plots")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"diffnas: error: {afile}") and "\n" not in err, err


def test_result_data_without_its_normalisation_is_refused_before_writing(run_dir, tmp_path,
                                                                        capsys):
    """model.json needs the data's mean and std: a record without them is refused before
    the model file is written, not after."""
    import json

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    record = json.loads((run / "retrain" / "result.json").read_text())
    del record["data"]["mean"], record["data"]["std"]
    (run / "retrain" / "result.json").write_text(json.dumps(record))
    out = tmp_path / "m.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    assert "its 'data' entry lacks mean, std" in capsys.readouterr().err
    assert not out.exists()


def test_export_never_replaces_a_run_file_and_a_users_only_with_force(run_dir, tmp_path,
                                                                      capsys):
    """--out naming the run's own weights or checkpoint is refused even with --force (it
    was replaced, and the retraining lost); a user's file is kept unless --force."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    for target in (run / "retrain/model.pt", run / "search/checkpoint.pt"):
        before = target.read_bytes()
        for force in ([], ["--force"]):
            assert main(["export", str(run), "--format", "torchscript", "--out", str(target),
                         *force]) == 2
            assert f"--out {target}: that path is the run {run}'s own" in \
                capsys.readouterr().err
        assert target.read_bytes() == before
    load_retrained(run)  # still loads
    mine = tmp_path / "thing.pt"
    mine.write_text("my precious")
    with pytest.raises(ValueError, match="thing.pt: that file is not a model diffnas wrote"):
        export_run(run, "torchscript", mine, check=False)
    assert mine.read_text() == "my precious" and not mine.with_suffix(".json").exists()
    export_run(run, "torchscript", mine, check=False, force=True)
    assert is_export(mine)
    # the run's own export/ folder: an export from before the marker, without a
    # description beside it (no data in result.json), is replaced by export again
    (run / "export").mkdir()
    (run / "export" / "model.pt").write_bytes(b"an old export")
    export_run(run, "torchscript", check=False)
    assert is_export(run / "export" / "model.pt")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_is_known_by_its_marker(run_dir, tmp_path, fmt):
    """Running export again replaces its own file, known by the marker in the file even
    when the description beside it is gone."""
    out = export_run(run_dir, fmt, tmp_path / "m").path
    out.with_suffix(".json").unlink()
    assert is_export(out)
    export_run(run_dir, fmt, out)  # replaced: no error
    other = tmp_path / ("x" + out.suffix)
    other.write_bytes(b"PK\x03\x04 not a model")
    assert not is_export(other)


def test_a_users_file_beside_an_earlier_exports_description_is_kept(run_dir, tmp_path):
    """The model.json an export wrote made any file of the same stem "ours": a user's
    notes.txt (or own model) at --out beside it was replaced without --force."""
    export_run(run_dir, "torchscript", tmp_path / "model.pt", check=False)
    notes = tmp_path / "model.txt"
    notes.write_text("my notes")
    assert not is_export(notes)
    with pytest.raises(ValueError, match="model.txt: that file is not a model diffnas wrote"):
        export_run(run_dir, "onnx", notes, check=False)
    assert notes.read_text() == "my notes"
    assert is_export(tmp_path / "model.pt")


def test_an_unwritable_export_folder_names_the_target(run_dir, tmp_path, monkeypatch,
                                                      capsys):
    def denied(*args, dir=None, **kw):
        raise PermissionError(13, "Permission denied", f"{dir}/.tmp123")

    monkeypatch.setattr("diffnas.report.outputs.tempfile.mkstemp", denied)
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {run_dir / 'export/model.pt'} (Permission denied" in err
    assert "pass --out to write elsewhere" in err and ".tmp" not in err
