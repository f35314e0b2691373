"""Damaged input files and bad flag values: one clear error naming the file (or the flag)
and what to do, never a raw traceback. Every corrupt file is built in tmp_path."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffnas.cli import main
from diffnas.config import load_config, save_config
from diffnas.data import load_dataset
from diffnas.data.images import read_idx
from diffnas.engine.callbacks import read_json
from diffnas.export import load_retrained
from diffnas.genotype import Genotype, GenotypeError, published_genotype
from diffnas.report.plots import load_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_RUN = ["data.name=digits",
            "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1}",
            "retrain.network={C: 4, layers: 3}", "progress=false"]


def cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error ``diffnas argv`` prints (it must exit with status 2)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffnas: error: ") and "\n" not in err, err
    return err


# --- dataset files ---------------------------------------------------------------------
def _write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    data = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.astype(np.uint8).tobytes()
    if compress:
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))


def _fake_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, 4))}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "junk", "not_a_batch", "odd_size", "label_17",
                                    "pixel_300"])
def test_damaged_cifar_batch_is_named(tmp_path, damage):
    batch = _fake_cifar(tmp_path) / "data_batch_3"
    raw = batch.read_bytes()
    pixels = np.zeros((1, 3072), np.int64)
    pixels[0, 5] = 300  # wrapped to 44 by a plain uint8 cast
    batch.write_bytes({"truncated": raw[: len(raw) // 2], "junk": b"\x00junk" * 50,
                       "not_a_batch": pickle.dumps([1, 2, 3]),
                       "odd_size": pickle.dumps({"data": np.zeros(100, np.uint8),
                                                 "labels": [0]}),
                       "label_17": pickle.dumps({"data": np.zeros((1, 3072), np.uint8),
                                                 "labels": [17]}),
                       "pixel_300": pickle.dumps({"data": pixels, "labels": [0]})}[damage])
    with pytest.raises(ValueError, match=f"{batch}: .*damaged") as err:
        load_dataset("cifar10", root=str(tmp_path))
    assert {"label_17": "labels 17..17, expected 0..9", "pixel_300": "values 0..300"}.get(
        damage, "") in str(err.value)


def test_fashion_labels_out_of_range_are_named(tmp_path):
    _fake_fashion(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_idx(labels, np.full(10, 12))
    with pytest.raises(ValueError, match=f"{labels}: labels 12..12, expected 0..9; .*damaged"):
        load_dataset("fashion_mnist", root=str(tmp_path))


@pytest.mark.parametrize("damage", ["junk_gz", "truncated_gz", "corrupt_deflate"])
def test_undecompressable_idx_file_is_named(tmp_path, damage):
    _fake_fashion(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if damage == "corrupt_deflate":  # a good gzip header, garbage after it
        raw = raw[:10] + bytes(b ^ 0xFF for b in raw[10:])
    path.write_bytes({"junk_gz": b"this is not gzip data", "truncated_gz": raw[: len(raw) // 2],
                      "corrupt_deflate": raw}[damage])
    with pytest.raises(ValueError, match=f"{path}: cannot be decompressed.*damaged"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_idx_payload_of_the_wrong_size_is_named(tmp_path):
    short, tiny = tmp_path / "short-idx3-ubyte", tmp_path / "tiny-idx3-ubyte"
    _write_idx(short, np.zeros((5, 28, 28)), compress=False)
    short.write_bytes(short.read_bytes()[:-100])  # the header still says 5 images
    with pytest.raises(ValueError, match=f"{short}: its header says 5x28x28 .*damaged"):
        read_idx(short)
    tiny.write_bytes(b"\x00\x00\x08")  # not even a header
    with pytest.raises(ValueError, match=f"{tiny}: 3 bytes, too short .*damaged"):
        read_idx(tiny)


def test_idx_images_and_labels_of_different_counts_are_named(tmp_path):
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19))  # 20 images
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz holds 20 images but "
                                         ".*train-labels-idx1-ubyte.gz 19 labels"):
        load_dataset("fashion_mnist", root=str(tmp_path))


# --- run artefacts: export and report ---------------------------------------------------
def _fake_run(tmp_path: Path, config: str | None = None, overrides: list[str] | None = None,
              result: str | None = None, state: dict | None = None) -> Path:
    """A run directory with a saved config and, when given, retrain/result.json and
    retrain/model.pt (nothing is trained)."""
    run = tmp_path / "run"
    (run / "retrain").mkdir(parents=True)
    save_config(load_config(config, TINY_RUN if overrides is None else overrides,
                            device=False), run / "config.yaml")
    if result is not None:
        (run / "retrain" / "result.json").write_text(result)
    if state is not None:
        torch.save(state, run / "retrain" / "model.pt")
    return run


GOOD_RESULT = json.dumps({"test_acc": 0.9, "genotype": published_genotype("DARTS_V2").to_dict()})


@pytest.mark.parametrize("command", [["export", "--format", "torchscript"], ["report"]])
def test_damaged_result_json_is_named(tmp_path, capsys, command):
    run = _fake_run(tmp_path, result='{"test_acc": 0.9\n', state={})
    err = cli_error([command[0], str(run), *command[1:]], capsys)
    assert f"{run / 'retrain' / 'result.json'}: damaged, not valid JSON" in err


def test_result_json_that_is_not_an_object_is_named(tmp_path):
    run = _fake_run(tmp_path, result="[1, 2]", state={})
    with pytest.raises(ValueError, match="result.json: damaged, holds a JSON list"):
        load_retrained(run)
    with pytest.raises(ValueError, match="result.json: damaged, holds a JSON list"):
        load_run(run)
    (run / "retrain" / "result.json").write_text('{"test_acc": 0.9}')
    with pytest.raises(ValueError, match="result.json: damaged, no 'genotype'"):
        load_retrained(run)
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=f"{binary}: damaged, not valid JSON"):
        read_json(binary, "restore it")


@pytest.mark.parametrize("text", ["", "{", "[1, 2]"])
def test_damaged_resume_records_are_named(tmp_path, text):
    """retrain/data.json and retrain/test_subset.json holding a list were an AttributeError
    and a TypeError on resume, and cut-short ones a JSON error naming no file."""
    from diffnas.engine import rundir

    out = tmp_path / "retrain"
    out.mkdir()
    data = load_dataset("digits", test_subset=8, train_subset=8)
    (out / rundir.DATA_FILE).write_text(text)
    with pytest.raises(ValueError, match=f"{out / rundir.DATA_FILE}: damaged"):
        rundir.check_same_data(out, data, resume=True)
    record = out / rundir.TEST_SUBSET_FILE
    record.write_text(text)
    with pytest.raises(ValueError, match=f"{record}: damaged"):
        rundir.test_subset_seed(tmp_path, 0)
    record.write_text('{"seed": "1"}')
    with pytest.raises(ValueError, match=f"{record}: damaged, 'seed' is '1', not a number"):
        rundir.test_subset_seed(tmp_path, 0)
    for seed in (None, 3):  # what a good record holds is what it returns
        record.write_text(json.dumps({"seed": seed}))
        assert rundir.test_subset_seed(tmp_path, 0) == seed


@pytest.mark.parametrize("damage", ["empty", "truncated", "junk", "a_list"])
def test_damaged_model_pt_is_named(tmp_path, capsys, damage):
    run = _fake_run(tmp_path, result=GOOD_RESULT, state={"w": torch.zeros(64)})
    weights = run / "retrain" / "model.pt"
    raw = weights.read_bytes()
    if damage == "a_list":
        torch.save([torch.zeros(2)], weights)
    else:
        weights.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                             "junk": b"hello junk" * 20}[damage])
    err = cli_error(["export", str(run), "--format", "torchscript"], capsys)
    named = (f"state dict {weights} is unreadable" in err
             or f"{weights} does not hold a diffnas state dict" in err)
    assert named and "retraining" in err, err


@pytest.mark.parametrize(("config", "overrides", "kind"), [
    ("gnn_cora.yaml", ["data.name=karate", "search.space.hidden=8"], "a graph"),
    ("darts_rnn_ptb.yaml", [], "a language-model run"),
])
def test_graph_and_language_model_runs_are_not_exported(tmp_path, capsys, monkeypatch,
                                                        config, overrides, kind):
    """Said as such, also where onnx is not installed: not 'install onnx' first, and then,
    once installed, that the run cannot be exported at all."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # (import onnx raises ImportError)
    run = _fake_run(tmp_path, CONFIGS / config, overrides, result=json.dumps(
        {"test_acc": 0.5, "genotype": {"space": "gnn", "cells": {}}}),
        state={"cell.ops.0.weight": torch.zeros(8, 8)})
    err = cli_error(["export", str(run), "--format", "onnx"], capsys)
    assert f"{run} is {kind}" in err and "cannot be exported" in err
    assert "image classifier" in err and "onnx or torchscript" in err


# --- flags and genotype files -------------------------------------------------------------
def test_bad_budget_item_names_the_flag(tmp_path, capsys):
    err = cli_error(["bench", "nb201", "--strategy", "rea", "--budget", "10,x", "--table",
                     str(tmp_path / "t.csv")], capsys)
    assert "--budget: 'x' is not an integer" in err
    err = cli_error(["bench", "nb201", "--strategy", " , ", "--budget", "10", "--table",
                     str(tmp_path / "t.csv")], capsys)
    assert "--strategy: empty" in err


def test_damaged_bench_summary_file_is_named(tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text('{"outcomes": [')
    err = cli_error(["bench", "nb201-summary", str(bad)], capsys)
    assert f"{bad}: damaged, not valid JSON" in err


def test_binary_genotype_file_is_named(tmp_path, capsys):
    png = tmp_path / "cell.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(GenotypeError, match=f"{png}: not a genotype file"):
        Genotype.load(png)
    err = cli_error(["train", "--genotype", str(png), "--dry-run", *TINY_RUN], capsys)
    assert f"{png}: not a genotype file" in err



@pytest.mark.parametrize("command", [["plot"], ["report"], ["search", "--resume"]])
def test_a_missing_run_directory_and_a_folder_that_is_not_one_are_told_apart(
        command, tmp_path, capsys):
    missing = tmp_path / "runs" / "typo"
    assert f"{missing}: no such run directory" in cli_error([*command, str(missing)], capsys)
    assert f"{tmp_path} is not a run directory (no config.yaml)" in cli_error(
        [*command, str(tmp_path)], capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert f"{afile} is a file, not a run directory" in cli_error([*command, str(afile)], capsys)
