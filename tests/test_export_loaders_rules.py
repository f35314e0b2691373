"""Rules of model export (``diffnas.export``) and of the batch loaders
(``diffnas.data.loaders``) that a second mutation audit found unchecked.

Loaders: the refusals of bad sizes (lengths, batch size, ranks) and of a search split
outside (0, 1), the batch count for every data size against every batch size (larger
than the data included), each input kept with its label, a different order for every
(seed, epoch) pair, fresh augmentation draws per batch and per epoch.
Export: the traced file and the output check use the network in eval mode (BatchNorm
statistics, no dropout), the JSON form of a result, nothing written when the check
fails, a missing package named with its extra, the overrides reaching the run config,
a malformed genotype named with its file, the description of a run's own file refused
as such, and how a plugin loader's resize is described. Each test replays the rule on a
tiny example rather than comparing with text the code once printed."""

from __future__ import annotations

import errno
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from test_corrupt_inputs import _fake_run
from torch import nn

from diffnas.data import Augment, BatchLoader, split_train_val
from diffnas.export import (
    ExportError,
    ExportResult,
    export_model,
    export_run,
    load_retrained,
    max_output_diff,
    model_info,
    resize_text,
    run_exported,
)
from diffnas.spaces import DataShape


# --- loaders: refusals -------------------------------------------------------------------
@pytest.mark.parametrize(("n_x", "n_y", "batch", "world", "message"), [
    (5, 4, 2, 1, "5 inputs but 4 labels"),
    (4, 4, 0, 1, "batch_size must be positive, got 0"),
    (4, 4, -2, 1, "batch_size must be positive, got -2"),
    (8, 8, 6, 4, "batch_size 6 must divide by world_size 4"),
])
def test_a_loader_of_bad_sizes_is_refused_naming_them(n_x, n_y, batch, world, message):
    with pytest.raises(ValueError, match=message):
        BatchLoader(torch.zeros(n_x, 1), torch.zeros(n_y), batch, world_size=world,
                    drop_last=True)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.25, 1.5])
def test_a_search_split_outside_zero_one_is_refused(fraction):
    """Both bounds are excluded: 0 would leave no images to train the weights on, 1 none
    to train the architecture on."""
    x, y = torch.zeros(10, 1), torch.arange(10)
    with pytest.raises(ValueError, match=rf"search_split must be in \(0, 1\), got {fraction}"):
        split_train_val(x, y, fraction, seed=0)


# --- loaders: batches --------------------------------------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7])
def test_batch_count_and_sizes_for_every_data_size(batch, drop_last):
    """n samples in batches of b: ceil(n / b) batches (the last one partial) or, with
    ``drop_last``, floor(n / b) full ones; a batch larger than the data gives one
    partial batch or none. No batch is empty and no sample appears twice."""
    for n in range(1, 10):
        loader = BatchLoader(torch.arange(n).float().view(n, 1), torch.arange(n), batch,
                             seed=n, drop_last=drop_last)
        full, rest = divmod(n, batch)
        sizes = [batch] * full + ([] if drop_last or rest == 0 else [rest])
        got = [len(yb) for _, yb in loader]
        assert got == sizes and len(loader) == len(sizes), (n, batch, drop_last)
        seen = torch.cat([yb for _, yb in loader]).tolist() if sizes else []
        assert len(set(seen)) == len(seen) == sum(sizes)
        if not drop_last:
            assert sorted(seen) == list(range(n))
        assert len(sizes) == (n // batch if drop_last else math.ceil(n / batch))


@pytest.mark.parametrize("world", [1, 2])
def test_each_input_stays_with_its_label(world):
    """Shuffled and sharded over ranks, every batch pairs each input with its own label."""
    n = 24
    x, y = torch.arange(n).double().view(n, 1, 1, 1) * 3, torch.arange(n)
    for rank in range(world):
        loader = BatchLoader(x, y, 6, seed=2, rank=rank, world_size=world, drop_last=True)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for xb, yb in loader:
                assert torch.equal(xb.flatten(), yb.double() * 3)


def test_every_seed_and_epoch_pair_gives_its_own_order():
    """The order of an epoch depends on the seed and the epoch together: seed s at epoch
    e + 1 is not seed s + 1 at epoch e (runs of neighbouring seeds must not replay each
    other's epochs one epoch apart)."""
    n = 12
    orders = {}
    for seed in range(4):
        loader = BatchLoader(torch.zeros(n, 1), torch.arange(n), n, seed=seed)
        for epoch in range(4):
            loader.set_epoch(epoch)
            orders[(seed, epoch)] = tuple(torch.cat([yb for _, yb in loader]).tolist())
    assert len(set(orders.values())) == len(orders)


def _cutout_masks(loader: BatchLoader) -> list[torch.Tensor]:
    return [(xb == 0)[:, 0] for xb, _ in loader]


def test_augmentation_draws_anew_for_each_batch_and_each_epoch():
    """Identical images in batches of 4 (no shuffle): the cutouts differ between the
    batches of an epoch and between epochs (each a draw of its own), are applied at every
    epoch, and an epoch replayed repeats its cutouts."""
    x, y = torch.ones(16, 1, 8, 8), torch.arange(16)
    loader = BatchLoader(x, y, 4, shuffle=False, augment=Augment(cutout=3), seed=5)
    epochs = []
    for epoch in (0, 1, 3):
        loader.set_epoch(epoch)
        masks = _cutout_masks(loader)
        assert all(m.flatten(1).any(1).all() for m in masks)  # every image cut
        assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)
        epochs.append(torch.stack(masks))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    loader.set_epoch(1)
    assert torch.equal(torch.stack(_cutout_masks(loader)), epochs[1])


@pytest.mark.parametrize("L", [2, 4])
def test_an_even_cutout_spans_half_its_side_before_the_drawn_pixel(L):
    """The reference Cutout zeroes rows y - L//2 .. y + L//2 - 1 around a drawn row y
    (clipped to the image), likewise for columns: for an even side the square reaches
    L//2 before the drawn pixel and L//2 - 1 after it, so a square clipped at the top or
    left edge occurs and one clipped at the bottom or right edge never does."""
    side = 6
    out = Augment(cutout=L)(torch.ones(400, 1, side, side), torch.Generator().manual_seed(0))
    rows, cols = set(), set()
    for o in out:
        zero = o[0] == 0
        rows.add(tuple(zero.any(1).nonzero().flatten().tolist()))
        cols.add(tuple(zero.any(0).nonzero().flatten().tolist()))
    expected = {tuple(r for r in range(y - L // 2, y + L // 2) if 0 <= r < side)
                for y in range(side)}
    assert rows == expected and cols == expected


# --- export: eval mode ---------------------------------------------------------------------
class _BnDrop(nn.Module):
    """A convolution, BatchNorm with running statistics far from a batch's own, and
    dropout: train and eval mode give very different outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.classifier = nn.Linear(2 * 4 * 4, 3)
        with torch.no_grad():
            self.bn.running_mean.fill_(3.0)
            self.bn.running_var.fill_(9.0)

    def forward(self, x):
        return self.classifier(self.drop(self.bn(self.conv(x))).flatten(1))


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The outputs of ``model`` in eval mode, computed by hand: BatchNorm with its running
    statistics, dropout the identity."""
    with torch.no_grad():
        h = model.conv(x)
        bn = model.bn
        h = (h - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
            bn.running_var.view(1, -1, 1, 1) + bn.eps)
        h = h * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        return model.classifier(h.flatten(1))


def test_export_traces_the_network_in_eval_mode(tmp_path):
    """A network handed over in training mode is traced in eval mode: the file computes
    the eval outputs (running statistics, no dropout) on any batch, to float64 rounding."""
    torch.manual_seed(0)
    model = _BnDrop().double().train()
    g = torch.Generator().manual_seed(1)
    example = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    path = export_model(model, example, tmp_path / "m.pt", "torchscript")
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(run_exported(path, "torchscript", x), _eval_outputs(model, x),
                               rtol=1e-12, atol=1e-12)


def test_the_output_check_compares_with_the_eval_outputs(tmp_path):
    """A network left in training mode is compared in eval mode: its own exported file
    differs by nothing, not by dropout noise and batch statistics."""
    torch.manual_seed(0)
    model = _BnDrop().double().eval()
    g = torch.Generator().manual_seed(2)
    path = export_model(model, torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64),
                        tmp_path / "m.pt", "torchscript")
    model.train()
    inputs = [torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) for n in (2, 5)]
    assert max_output_diff(model, path, "torchscript", inputs) <= 1e-12


# --- export: the result and what is written --------------------------------------------
@pytest.mark.parametrize("info", [None, Path("out") / "m.json"])
def test_a_result_as_json_keeps_full_paths_and_a_missing_description(info):
    res = ExportResult(Path("out") / "m.pt", "torchscript", (1, 1, 8, 8), None, 1e-5, info)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["path"] == str(Path("out") / "m.pt")
    assert d["info"] == (None if info is None else str(info))
    assert (d["format"], d["input_shape"], d["max_abs_diff"], d["atol"]) == \
        ("torchscript", [1, 1, 8, 8], None, 1e-5)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.classifier = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.classifier(self.conv(x).flatten(1))


DATA_RECORD = {"name": "npz", "mean": [0.5], "std": [2.0], "classes": ["a", "b", "c"],
               "input": [1, 4, 4]}


@pytest.fixture
def described_run(tmp_path, monkeypatch) -> Path:
    """A run directory whose retraining result records its data; the retrained network
    (read by ``load_retrained``) is a tiny one of 1 x 4 x 4 inputs and 3 classes."""
    import diffnas.export as export

    run = tmp_path / "run"
    (run / "retrain").mkdir(parents=True)
    (run / "retrain" / "result.json").write_text(
        json.dumps({"test_acc": 0.5, "genotype": {}, "data": DATA_RECORD}))
    torch.manual_seed(0)
    monkeypatch.setattr(export, "load_retrained",
                        lambda *a, **k: (_Tiny().eval(), DataShape(1, 4, 3)))
    return run


def test_the_description_is_written_only_beside_a_checked_model(described_run, tmp_path,
                                                                  monkeypatch):
    """A passed check writes the model and, beside it, model_info's description; a failed
    one at a new path leaves neither (no description of a model that is not there)."""
    res = export_run(described_run, "torchscript", tmp_path / "a" / "m.pt")
    assert res.info == tmp_path / "a" / "m.json"
    assert json.loads(res.info.read_text()) == model_info(described_run, (1, 4, 4))
    monkeypatch.setattr("diffnas.export.max_output_diff", lambda *a, **k: 1.0)
    with pytest.raises(ExportError, match="nothing was written"):
        export_run(described_run, "torchscript", tmp_path / "b" / "m.pt")
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []


def test_a_missing_package_is_named_with_the_extra_that_installs_it(described_run, tmp_path,
                                                                    monkeypatch):
    """Without onnxruntime an ONNX export with its check is refused, naming the package
    and ``pip install 'diffnas[export]'``, before anything is written; without the check
    it is not needed."""
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"checking an ONNX export needs the 'onnxruntime' "
                                          r"package: pip install 'diffnas\[export\]'"):
        export_run(described_run, "onnx", out)
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert export_run(described_run, "onnx", out, check=False).max_abs_diff is None
    assert out.is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_the_description_of_a_run_file_is_refused_as_the_run_s_own(described_run, existing):
    """--out RUN/summary.pt is free, but its description would be RUN/summary.json, a file
    of the run (its multi-seed summary): refused as the run's own, whether or not it is
    there yet, and nothing is written."""
    summary = described_run / "summary.json"
    (described_run / "config.yaml").write_text("data: {name: npz}\n")
    if existing:
        summary.write_text('{"runs": []}')
    with pytest.raises(ValueError, match=rf"{summary}: that path is the run .*'s own"):
        export_run(described_run, "torchscript", described_run / "summary.pt", check=False)
    assert summary.read_text() == '{"runs": []}' if existing else not summary.exists()
    assert not (described_run / "summary.pt").exists()


@pytest.mark.parametrize(("code", "refused"), [(errno.EACCES, True), (errno.EROFS, True),
                                               (errno.ENOSPC, False)])
def test_a_write_denied_midway_names_the_target_and_other_errors_pass(described_run, tmp_path,
                                                                      monkeypatch, code,
                                                                      refused):
    """A write the folder's permissions deny (EACCES, EROFS) after the early check passed
    is the one-line refusal naming --out, not the temporary file; another OSError (a full
    disk: ENOSPC) is left as it is."""
    def denied(model, example, path, fmt):
        raise OSError(code, "some reason", str(path))

    monkeypatch.setattr("diffnas.export.export_model", denied)
    out = tmp_path / "m.pt"
    if refused:
        with pytest.raises(ValueError, match=rf"cannot write {out} \(some reason; .*"
                                             r"choose another --out"):
            export_run(described_run, "torchscript", out)
    else:
        with pytest.raises(OSError, match="some reason") as caught:
            export_run(described_run, "torchscript", out)
        assert caught.value.errno == code
    assert not out.exists()


# --- export: the run's own files -------------------------------------------------------
def _saved_run(tmp_path: Path, genotype: dict | None = None, extra: tuple = (),
               edit=None) -> Path:
    """A run of DARTS_V2 (4 nodes) on 1 x 8 x 8 inputs of 10 classes, its retrained
    weights those of a freshly built network (nothing trained)."""
    from test_export import TINY_RUN

    from diffnas.config import load_config
    from diffnas.engine.retrain import build_network
    from diffnas.genotype import published_genotype

    overrides = [*TINY_RUN, "search.space.nodes=4", *extra]
    v2 = published_genotype("DARTS_V2")
    cfg = load_config(None, overrides, device=False)
    _, net = build_network(cfg, v2, DataShape(1, 8, 10))
    result = {"test_acc": 0.1, "genotype": v2.to_dict() if genotype is None else genotype}
    state = net.state_dict()
    return _fake_run(tmp_path, overrides=overrides, result=json.dumps(result),
                     state=state if edit is None else edit(state))


def test_overrides_given_to_export_reach_the_run_config(tmp_path):
    """An older run of an npz that records no input side: export reads the side from the
    data, found at the moved place a ``data.root=`` override names (without it, where the
    config says, it is gone, and --resolution is asked for)."""
    import numpy as np

    moved = tmp_path / "moved.npz"
    g = np.random.default_rng(0)
    np.savez(moved, x_train=g.integers(0, 255, (20, 8, 8), dtype=np.uint8),
             y_train=np.arange(20) % 10, x_test=g.integers(0, 255, (10, 8, 8), dtype=np.uint8),
             y_test=np.arange(10))
    run = _saved_run(tmp_path, extra=("data.name=npz", f"data.root={tmp_path / 'gone.npz'}"))
    with pytest.raises(ExportError, match="pass --resolution"):
        load_retrained(run)
    _, shape = load_retrained(run, overrides=[f"data.root={moved}"])
    assert (shape.in_channels, shape.resolution, shape.num_classes) == (1, 8, 10)


def test_a_malformed_genotype_is_named_with_its_file(tmp_path):
    from diffnas.genotype import GenotypeError

    run = _saved_run(tmp_path, genotype={"space": "darts_cnn", "cells": {"normal": [1]}})
    with pytest.raises(GenotypeError, match=rf"{run / 'retrain' / 'result.json'}: "
                                            r"malformed genotype: cell 'normal'"):
        load_retrained(run)


def _without_one_cell_weight(state):
    return {k: v for k, v in state.items() if k != next(k for k in state if ".ops." in k)}


def _with_a_stray_entry(state):
    return {**state, "cells.0.stray.weight": torch.zeros(3)}


@pytest.mark.parametrize("edit", [_without_one_cell_weight, _with_a_stray_entry])
def test_weights_missing_or_holding_a_stray_entry_do_not_fit(tmp_path, edit):
    """Every saved tensor must fill a parameter or buffer of the network and every one of
    those must be saved: a weight left at its random initialisation would export a
    network other than the retrained one."""
    run = _saved_run(tmp_path, edit=edit)
    with pytest.raises(ExportError, match=r"model\.pt does not fit the network"):
        load_retrained(run)


_RAN: list[str] = []


def _ran(what: str) -> None:
    _RAN.append(what)


class _RunsCode:
    """Unpickling this calls this module's ``_ran``: a stand-in for a crafted model.pt
    whose pickle names ``os.system``."""

    def __reduce__(self):
        return (_ran, ("ran",))


def test_retrained_weights_are_read_without_running_code(tmp_path):
    """retrain/model.pt is read as weights only: a pickle that names a function is
    refused as unreadable, naming the file, and the function is never called."""
    run = _saved_run(tmp_path, edit=lambda state: {**state, "x": _RunsCode()})
    with pytest.raises(ValueError, match=rf"{run / 'retrain' / 'model.pt'} is unreadable"):
        load_retrained(run)
    assert _RAN == []


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_the_default_path_carries_the_suffix_of_its_format(described_run, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    res = export_run(described_run, fmt, check=False)
    assert res.path == described_run / "export" / f"model{suffix}" and res.path.is_file()
    assert res.info == described_run / "export" / "model.json"


# --- export: how the images were resized ------------------------------------------------
def test_a_plugin_loader_that_resizes_is_named_and_a_builtin_one_is_not(monkeypatch):
    """A plugin's loader that takes ``resolution`` resizes as it reads: model.json points
    at its code. A loader of diffnas taking it is described by the interpolation."""
    from diffnas.data import DATASETS

    def mine(root=None, download=False, resolution=None):
        raise AssertionError("not loaded")

    mine.__module__ = "my_plugin.data"
    monkeypatch.setitem(DATASETS._items, "audit_mine", mine)
    assert "by the loader of dataset 'audit_mine' (a plugin that resizes as it reads" in \
        resize_text("audit_mine", 16, 16)

    def ours(root=None, download=False, resolution=None):
        raise AssertionError("not loaded")

    ours.__module__ = "diffnas.data.audit"
    monkeypatch.setitem(DATASETS._items, "audit_ours", ours)
    assert "torch.nn.functional.interpolate" in resize_text("audit_ours", 16, 16)

    def plain(root=None, download=False):
        raise AssertionError("not loaded")

    plain.__module__ = "my_plugin.data"
    monkeypatch.setitem(DATASETS._items, "audit_plain", plain)
    assert "torch.nn.functional.interpolate" in resize_text("audit_plain", 16, 16)
