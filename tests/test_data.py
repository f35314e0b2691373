"""Datasets from local files, clear errors, deterministic loaders and augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from diffnas.data import (
    Augment,
    BatchLoader,
    DatasetNotFoundError,
    load_dataset,
    split_train_val,
)
from diffnas.data.custom import DataFormatError
from diffnas.data.images import read_idx


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(root: Path, n_train: int = 20, n_test: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_train, 28, 28))
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    _write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))
    return images


def test_idx_reader_and_fashion_loader(tmp_path):
    images = _fake_fashion(tmp_path)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    d = load_dataset("fashion_mnist", root=str(tmp_path), resolution=14)
    assert d.train_x.shape == (20, 1, 14, 14) and d.test_x.shape == (10, 1, 14, 14)
    assert d.num_classes == 10 and d.train_y.dtype == torch.long


def test_fashion_train_and_test_images_of_different_sizes_are_refused(tmp_path):
    """A 4x4 training file with the 28x28 test file loaded, and a whole search and
    retraining ran on it (adaptive pooling swallowed the test size)."""
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((20, 4, 4), dtype=np.int64))
    with pytest.raises(DataFormatError, match=r"\(4, 4\) images but .*t10k-images.* \(28, 28\)"):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_missing_dataset_path_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"not found in: {tmp_path}.*apt-get install"):
        load_dataset("fashion_mnist", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="needs data.root"):
        load_dataset("cifar10")


def test_every_files_check_belongs_to_a_dataset_and_refuses_an_empty_root(tmp_path):
    """The checks run before a run directory is made: each names a dataset the engines
    load (a misspelt name would silently check nothing), says what is missing under an
    empty root, and passes where the files are (here Fashion-MNIST's); a dataset with no
    check (shipped data) passes."""
    from diffnas.data import DATASETS, check_dataset_files
    from diffnas.data.graph import GRAPH_DATASETS
    from diffnas.data.registry import DATASET_FILES
    from diffnas.data.text import TEXT_DATASETS

    known = set(DATASETS.names()) | set(GRAPH_DATASETS.names()) | set(TEXT_DATASETS)
    assert set(DATASET_FILES.names()) <= known
    assert {"cifar10", "fashion_mnist", "npz", "folder", "cora", "ptb"} <= set(DATASET_FILES)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in DATASET_FILES.names():
        with pytest.raises(DatasetNotFoundError, match=str(empty)):
            check_dataset_files(name, str(empty))
    check_dataset_files("digits", str(empty))
    check_dataset_files("karate", None)
    _fake_fashion(empty)
    check_dataset_files("fashion_mnist", str(empty))
    assert load_dataset("fashion_mnist", root=str(empty)).train_x.shape[0] == 20


def test_cifar10_from_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    d = load_dataset("cifar10", root=str(tmp_path))
    assert d.train_x.shape == (20, 3, 32, 32) and d.test_x.shape == (4, 3, 32, 32)
    # channel layout: CIFAR rows are RRR..GGG..BBB, so channel means differ per channel
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"].reshape(4, 3, 32, 32)
    assert d.test_x.shape[1] == 3 and raw.shape[1] == 3


class _RunsCode:
    """Unpickling this calls ``list.append`` on a global list: the stand-in for a
    crafted batch whose pickle names ``os.system``."""

    def __reduce__(self):
        return (_RAN.append, ("ran",))


_RAN: list[str] = []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches_are_read_without_running_code(tmp_path, protocol):
    """A CIFAR batch is a pickle: a plain pickle.load runs whatever a crafted file names.
    The real files (Python 2 pickles) and those written by any protocol still load."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                 "labels": list(rng.integers(0, 10, 2)), "filenames": [b"a.png", "b.png"]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    assert load_dataset("cifar10", root=str(tmp_path)).train_x.shape == (10, 3, 32, 32)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": _RunsCode(), "labels": []}, f, protocol=protocol)
    with pytest.raises(DataFormatError, match=r"data_batch_3: not a readable CIFAR-10 batch "
                                              r"\(refused to load \S*getattr: "):
        load_dataset("cifar10", root=str(tmp_path))
    assert _RAN == []


def test_digits_ships_in_the_wheel():
    d = load_dataset("digits", train_subset=100, seed=3)
    assert d.train_x.shape == (100, 1, 8, 8) and d.test_x.shape[0] == 360


def test_loader_order_depends_only_on_seed_and_epoch():
    x, y = torch.arange(20).float().view(20, 1, 1, 1), torch.arange(20)
    a = BatchLoader(x, y, 4, seed=1)
    b = BatchLoader(x, y, 4, seed=1)
    a.set_epoch(3)
    b.set_epoch(0)
    list(b)  # consuming other epochs first changes nothing
    b.set_epoch(3)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    b.set_epoch(4)
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert sorted(torch.cat([yb for _, yb in a]).tolist()) == list(range(20))


def test_loader_shards_the_same_global_batch():
    x, y = torch.arange(16).float().view(16, 1, 1, 1), torch.arange(16)
    full = list(BatchLoader(x, y, 8, seed=0))
    r0 = list(BatchLoader(x, y, 8, seed=0, rank=0, world_size=2, drop_last=True))
    r1 = list(BatchLoader(x, y, 8, seed=0, rank=1, world_size=2, drop_last=True))
    for f, a, b in zip(full, r0, r1, strict=True):
        assert torch.equal(torch.cat([a[1], b[1]]), f[1])
    # a last partial batch would give the ranks unequal or empty slices
    with pytest.raises(ValueError, match="needs drop_last=True"):
        BatchLoader(x[:10], y[:10], 4, rank=1, world_size=2)


def test_split_is_disjoint_and_complete():
    x, y = torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10)
    (tx, ty), (vx, vy) = split_train_val(x, y, 0.5, seed=0)
    assert sorted(ty.tolist() + vy.tolist()) == list(range(10)) and len(ty) == 5
    with pytest.raises(ValueError, match="search_split"):
        split_train_val(x, y, 1.0, 0)


def test_augment_crop_is_a_shifted_window_and_cutout_zeroes_a_square():
    x = torch.arange(36).float().view(1, 1, 6, 6).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = Augment(crop_padding=2)(x, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):  # every crop equals some 6x6 window of the padded image
        windows = [padded[i, 0, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i, 0], w) for w in windows)
    cut = Augment(cutout=2)(torch.ones(16, 1, 8, 8), g)
    zeros = (cut == 0).sum(dim=(1, 2, 3))
    assert ((zeros >= 1) & (zeros <= 4)).all() and (zeros == 4).any()
    flipped = Augment(flip=True)(x, torch.Generator().manual_seed(1))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))


def test_the_crop_pads_with_black_not_with_the_mean_pixel():
    """Normalised data: the reference pads raw images with black, then normalises, so the
    border is -mean/std per channel (0 would be the mean colour)."""
    from diffnas.data.base import prepare

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (32, 3, 6, 6), generator=g, dtype=torch.uint8)
    data = prepare("toy", raw, torch.zeros(32), raw[:4], torch.zeros(4), 2, 255.0)
    black = (torch.zeros(1, 3, 1, 1) - raw.float().div(255).mean(dim=(0, 2, 3), keepdim=True)) \
        / raw.float().div(255).std(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(torch.tensor(data.black), black.flatten(), atol=1e-5)
    out = Augment(crop_padding=6, fill=data.black)(data.train_x[:16], g)
    for i in range(16):  # a 6-pixel shift in some direction shows only the border colour
        for c in range(3):
            values = set(out[i, c].flatten().tolist()) - set(data.train_x[i, c].flatten().tolist())
            assert values <= {data.black[c]}
    assert any(torch.equal(out[i, c], torch.full((6, 6), data.black[c]))
               for i in range(16) for c in range(3))


def test_a_constant_channel_is_not_blown_up_by_normalisation(caplog):
    """An opaque alpha channel has std 0 over the training images: dividing by a floor of
    1e-6 made the crop's border -1e6 and a half-transparent test pixel about -5e5."""
    from diffnas.data.base import prepare

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (16, 4, 6, 6), generator=g, dtype=torch.uint8)
    raw[:, 3] = 255
    test = raw[:4].clone()
    test[0, 3] = 128
    data = prepare("rgba", raw, torch.zeros(16), test, torch.zeros(4), 2, 255.0)
    assert "channel(s) [3]" in caplog.text
    assert data.black[3] == pytest.approx(0.0)  # pads opaque: the only alpha training has
    assert data.train_x[:, 3].abs().max() == 0
    assert data.test_x[0, 3].min() == pytest.approx(128 / 255 - 1)
    # the varying channels are normalised by their std as before
    std = raw[:, :3].float().div(255).std(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(data.std[:3]) / 255, std)


def test_a_nearly_constant_channel_is_not_blown_up_either(caplog):
    """Opaque alpha but for five anti-aliased pixels one level lower: its std is 0.02
    levels, and a transparent test pixel became -12,904 (the crop border -50.6) when
    "almost constant" compared the std with the channel's own range."""
    from diffnas.data.base import prepare

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (256, 4, 8, 8), generator=g, dtype=torch.uint8)
    raw[:, 3] = 255
    raw[0, 3, 0, :5] = 254  # 5 of 16,384 pixels
    test = raw[:4].clone()
    test[0, 3] = 0
    data = prepare("rgba", raw, torch.zeros(256), test, torch.zeros(4), 2, 255.0)
    assert "channel(s) [3]" in caplog.text
    assert data.test_x[0, 3].min() == pytest.approx(-1.0, abs=0.01)
    assert abs(data.black[3]) < 0.01 and data.train_x[:, 3].abs().max() < 0.01


@pytest.mark.parametrize("offset", [1000.0, 100000.0, -3000.0])
def test_data_stored_with_an_offset_is_normalised_and_padded_like_the_same_data_without(
        offset, caplog):
    """Kelvin-like data (a constant added to every pixel): a 0 border was tens of stds
    from every pixel (retraining at chance), and at 1e5 the std/largest-value rule called
    the channel flat and squeezed it to std 3e-4. Normalisation is offset-free, so the
    normalised images and the crop's border must be those of the data without offset."""
    from diffnas.data.base import prepare

    caplog.set_level("INFO", logger="diffnas.data.base")
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 17, (64, 1, 8, 8), generator=g).float()  # digits-like 0..16
    test = torch.randint(0, 17, (8, 1, 8, 8), generator=g).float()
    y = torch.zeros(64)
    plain = prepare("plain", raw, y, test, y[:8], 2, 1.0)
    shifted = prepare("shifted", raw * 5 + offset, y, test * 5 + offset, y[:8], 2, 1.0)
    assert "barely vary" not in caplog.text
    torch.testing.assert_close(shifted.train_x, plain.train_x, atol=2e-3, rtol=0)
    torch.testing.assert_close(shifted.test_x, plain.test_x, atol=2e-3, rtol=0)
    assert shifted.black == pytest.approx(plain.black, abs=2e-3)
    assert plain.black[0] == pytest.approx(-raw.mean().item() / raw.std().item(), rel=1e-5)
    assert "pads them with that value" in caplog.text


def test_the_test_subset_is_the_same_for_every_seed_the_training_subset_follows_it():
    """Seeds of one study are scored on the same test images (and seed 0 keeps the subset
    it always had); the training subset still follows the seed."""
    from diffnas.data.base import subset

    a, b = (load_dataset("digits", train_subset=100, test_subset=50, seed=s) for s in (0, 3))
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, b.train_x)
    full = load_dataset("digits")
    assert torch.equal(a.test_y, subset(full.test_x, full.test_y, 50, 0 + 1)[1])


def test_a_retraining_begun_before_the_fixed_test_subset_keeps_its_own(tmp_path):
    """Runs made before made_by.txt drew their test subset from seed + 1: continuing such a
    retraining keeps those images (its logged epochs were scored on them); anything else
    uses the fixed subset. The choice is made once, at the retraining's first start: a run
    without made_by.txt (one driven from Python) keeps the fixed subset when resumed."""
    from diffnas.engine.rundir import mark_made_by, test_subset_seed

    legacy, fresh, made = tmp_path / "legacy", tmp_path / "fresh", tmp_path / "made"
    (legacy / "retrain").mkdir(parents=True)
    (legacy / "retrain/metrics.jsonl").write_text('{"epoch": 0}\n')  # begun by old code
    assert test_subset_seed(legacy, 3) == 4
    assert test_subset_seed(legacy, 3) == 4  # and recorded
    fresh.mkdir()  # no made_by.txt, first start: the fixed subset...
    assert test_subset_seed(fresh, 3) is None
    (fresh / "retrain/metrics.jsonl").write_text('{"epoch": 0}\n')
    assert test_subset_seed(fresh, 3) is None  # ...kept when resumed after epochs logged
    made.mkdir()
    mark_made_by(made, "train")
    (made / "retrain").mkdir()
    (made / "retrain/metrics.jsonl").write_text('{"epoch": 0}\n')
    assert test_subset_seed(made, 3) is None
    old = load_dataset("digits", test_subset=50, seed=3, test_seed=4)
    new = load_dataset("digits", test_subset=50, seed=3)
    assert not torch.equal(old.test_y, new.test_y)


def test_the_log_says_how_many_images_a_subset_keeps(caplog):
    """The loader's line counts every image; with data.test_subset the score is over fewer,
    which the log did not say."""
    caplog.set_level("INFO", logger="diffnas.data")
    load_dataset("digits", train_subset=100, test_subset=50)
    assert "digits: using 100 of 1437 train / 50 of 360 test images" in caplog.text


def test_a_subset_larger_than_the_dataset_says_all_images_are_used(caplog):
    import logging

    from diffnas.data import load_dataset

    with caplog.at_level(logging.WARNING):
        d = load_dataset("digits", train_subset=5000, test_subset=100)
    assert len(d.train_x) == 1437 and len(d.test_x) == 100
    assert "a train subset of 5000 asked for, but the dataset has 1437 train images" \
        in caplog.text and "test subset" not in caplog.text
