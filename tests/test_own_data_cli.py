"""Your own data (npz, folder) through the commands that size a network without loading
the images: `train --dry-run` and `export` read the input shape from the files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from diffnas.cli import main
from diffnas.export import load_retrained

RUN = [  # a search + retrain on an 8x8 grayscale npz, shrunk to seconds
    "data.name=npz", "data.train_subset=32", "data.test_subset=16", "data.batch_size=16",
    "search.epochs=1", "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2}",
    "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=32",
    "retrain.network={C: 4, layers: 3}", "retrain.auxiliary_weight=0", "retrain.cutout=4",
    "progress=false",
]


def _digits_npz(path: Path, classes: int = 10) -> Path:
    d = load_digits()
    keep = d.target < classes
    x, y = (d.images[keep] * 15).astype(np.uint8), d.target[keep].astype(np.int64)
    np.savez(path, x_train=x[:120], y_train=y[:120], x_test=x[120:160], y_test=y[120:160])
    return path


def test_dry_run_reads_the_shape_of_an_npz(tmp_path, capsys):
    path = _digits_npz(tmp_path / "d.npz", classes=4)
    argv = ["train", "--genotype", "DARTS_V2", "--dry-run", "data.name=npz", f"data.root={path}",
            "retrain.network={C: 4, layers: 3}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["input"] == [1, 8, 8] and summary["classes"] == 4
    assert main([*argv, "data.resolution=16"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["input"] == [1, 16, 16]


def test_dry_run_names_a_missing_npz(tmp_path, capsys):
    argv = ["train", "--genotype", "DARTS_V2", "--dry-run", "data.name=npz",
            f"data.root={tmp_path / 'nope.npz'}"]
    assert main(argv) == 2
    assert "nope.npz" in capsys.readouterr().err


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    path = _digits_npz(out / "d.npz")
    assert main(["search", f"out_dir={out}", "name=mine", f"data.root={path}", *RUN]) == 0
    return out / "mine", path


def test_export_finds_the_side_of_an_npz_run(npz_run):
    run, _ = npz_run
    _, shape = load_retrained(run)  # no resolution in the config: read from the npz
    assert (shape.in_channels, shape.resolution, shape.num_classes) == (1, 8, 10)


def test_export_without_the_data_reads_the_side_the_retraining_recorded(npz_run, tmp_path):
    """The data may be gone by export time: the side comes from retrain/result.json's
    ``data.input``; a result without it (an older run) asks for --resolution."""
    import json
    import shutil

    run, path = npz_run
    moved = tmp_path / "elsewhere.npz"
    path.rename(moved)
    try:
        assert load_retrained(run)[1].resolution == 8
        old = tmp_path / "old_run"
        shutil.copytree(run, old)
        result = json.loads((old / "retrain/result.json").read_text())
        del result["data"]["input"]
        (old / "retrain/result.json").write_text(json.dumps(result))
        with pytest.raises(Exception, match="pass --resolution"):
            load_retrained(old)
        assert load_retrained(old, resolution=8)[1].resolution == 8
    finally:
        moved.rename(path)
    # with the data back, the older run's side is read from it, and a --resolution that
    # differs is refused (it was taken, and model.json described 16x16 inputs)
    with pytest.raises(Exception, match=r"trained on 8x8 inputs; --resolution 16"):
        load_retrained(old, resolution=16)
    assert load_retrained(old)[1].resolution == 8


def test_model_json_names_how_the_training_images_were_resized(tmp_path):
    """model.json said "resize to input_shape" without the method a deployment must match."""
    from diffnas.export import _configured_data, resize_text

    assert _configured_data(tmp_path, "resolution") is None  # no config.yaml
    (tmp_path / "config.yaml").write_text("data: {name: folder, resolution: 16}\n")
    assert _configured_data(tmp_path, "resolution") == 16

    assert resize_text("npz", None, 8).startswith("none: ")
    assert "Pillow's bilinear filter" in resize_text("folder", 16, 16)
    for name in ("npz", "fashion_mnist"):
        assert "interpolate: mode 'area' when shrinking" in resize_text(name, 16, 16)
    assert "see its loader" in resize_text("not_registered_here", 16, 16)


def test_export_writes_what_a_deployment_needs(npz_run, tmp_path):
    """model.json beside the exported model: fed raw pixels normalised as it says, the
    exported model gives the retrained model's outputs on the run's own test images."""
    import torch

    from diffnas.data import load_dataset
    from diffnas.export import export_run, run_exported

    run, path = npz_run
    res = export_run(run, "torchscript", tmp_path / "m.pt")
    assert res.info == tmp_path / "m.json"
    info = json.loads(res.info.read_text())
    assert info["classes"] == [str(i) for i in range(10)] and info["input_shape"][1:] == [1, 8, 8]
    assert info["resize"] == "none: the network trained on the images as stored (8x8)"
    raw = torch.from_numpy(np.load(path)["x_test"][:, None]).float()  # uint8 pixels as stored
    x = (raw - torch.tensor(info["mean"])[:, None, None]) / torch.tensor(info["std"])[:, None, None]
    model, _ = load_retrained(run)
    data = load_dataset("npz", str(path))
    torch.testing.assert_close(x, data.test_x, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(run_exported(res.path, "torchscript", x), model(x),
                                   rtol=1e-4, atol=1e-4)
    # test_acc was measured on a subset: model.json says which, and following it a deployer
    # gets the same figure (scoring every test image gave another one)
    assert info["test_images"] == (
        "data.test_subset=16 of the test images of npz (all of them where it has no more): "
        "torch.randperm(N, generator=torch.Generator().manual_seed(1))[:16] of its N test "
        "images in their stored order")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:16]
    labels = torch.from_numpy(np.load(path)["y_test"]).long()
    logits = run_exported(res.path, "torchscript", x[idx])
    assert (logits.argmax(1) == labels[idx]).float().mean().item() == \
        pytest.approx(info["test_acc"], abs=1e-9)
