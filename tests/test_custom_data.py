"""Your own images: data.name=npz (one .npz file) and data.name=folder (train/ and test/
trees of class folders), loaded through load_dataset; every malformed input is a clear error;
a search and retraining through the command line on an npz file."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from diffnas.cli import main
from diffnas.config import load_config
from diffnas.data import DatasetNotFoundError, load_dataset
from diffnas.data.custom import CustomImageData, DataFormatError, peek_shape
from diffnas.genotype import Genotype

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]


def _digits(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` scikit-learn digits as uint8 images (0-16 scaled to 0-240)."""
    d = load_digits()
    return (d.images[:n] * 15).astype(np.uint8), d.target[:n].astype(np.int64)


def _npz(path: Path, **arrays) -> str:
    x, y = _digits()
    base = {"x_train": x[:150], "y_train": y[:150], "x_test": x[150:], "y_test": y[150:]}
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


# --- npz -------------------------------------------------------------------------------
def test_npz_grayscale_shapes_labels_and_train_statistics(tmp_path):
    x, y = _digits()
    d = load_dataset("npz", _npz(tmp_path / "d.npz"))
    assert isinstance(d, CustomImageData) and d.name == "npz"
    assert d.train_x.shape == (150, 1, 8, 8) and d.test_x.shape == (50, 1, 8, 8)
    assert torch.equal(d.train_y, torch.from_numpy(y[:150])) and d.train_y.dtype == torch.long
    assert torch.equal(d.test_y, torch.from_numpy(y[150:]))
    assert d.num_classes == 10 and d.classes == tuple(str(i) for i in range(10))
    # normalised with the training set's mean and std, the test set with the same numbers
    raw = torch.from_numpy(x).float() / 255
    mean, std = raw[:150].mean(), raw[:150].std()
    assert abs(d.train_x.mean().item()) < 1e-5 and abs(d.train_x.std().item() - 1) < 1e-5
    torch.testing.assert_close(d.test_x[:, 0], (raw[150:] - mean) / std)
    assert d.black == pytest.approx((-(mean / std).item(),), rel=1e-5)  # the crop pads black
    # recorded in pixel units, so a deployed model can normalise raw 0..255 pixels itself
    assert d.mean == pytest.approx((255 * mean.item(),), rel=1e-5)
    assert d.std == pytest.approx((255 * std.item(),), rel=1e-5)
    torch.testing.assert_close((torch.from_numpy(x[150:]).float() - d.mean[0]) / d.std[0],
                               d.test_x[:, 0])


def test_npz_channels_last_first_and_float_agree(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    ref = load_dataset("npz", _npz(tmp_path / "a.npz", x_train=nhwc, y_train=y, x_test=nhwc[:5],
                                   y_test=y[:5], classes=np.array(["a", "b", "c", "d"])))
    assert ref.train_x.shape == (20, 3, 6, 6) and ref.classes == ("a", "b", "c", "d")
    raw = torch.from_numpy(nhwc).float() / 255  # per-channel statistics, channels last
    expected = (raw - raw.mean((0, 1, 2))) / raw.std((0, 1, 2))
    torch.testing.assert_close(ref.train_x, expected.permute(0, 3, 1, 2))
    nchw = nhwc.transpose(0, 3, 1, 2)
    first = load_dataset("npz", _npz(tmp_path / "b.npz", x_train=nchw, y_train=y,
                                     x_test=nchw[:5], y_test=y[:5]))
    assert torch.equal(first.train_x, ref.train_x) and torch.equal(first.test_x, ref.test_x)
    floats = load_dataset("npz", _npz(tmp_path / "c.npz", x_train=nhwc / 255.0, y_train=y,
                                      x_test=nhwc[:5] / 255.0, y_test=y[:5]))
    torch.testing.assert_close(floats.train_x, ref.train_x, atol=1e-5, rtol=1e-5)
    assert floats.num_classes == 4 and floats.classes == ("0", "1", "2", "3")


def test_npz_ambiguous_layout_is_refused_unless_stored(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)  # 4x4 RGB, or 4 channels of 4x3?
    y = np.arange(8) % 2
    kw = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    with pytest.raises(DataFormatError, match=r"cannot tell channels-first.*layout='NHWC'"):
        load_dataset("npz", _npz(tmp_path / "amb.npz", **kw))
    d = load_dataset("npz", _npz(tmp_path / "ok.npz", layout="NHWC", **kw))
    assert d.train_x.shape == (8, 3, 4, 4)
    neither = rng.integers(0, 256, (8, 5, 6, 6), dtype=np.uint8)
    with pytest.raises(DataFormatError, match="neither dim 1 nor dim 3"):
        load_dataset("npz", _npz(tmp_path / "n.npz", x_train=neither, y_train=y, x_test=neither,
                                 y_test=y))
    # an explicit layout allows any channel count
    d = load_dataset("npz", _npz(tmp_path / "n2.npz", x_train=neither, y_train=y,
                                 x_test=neither, y_test=y, layout="NCHW"))
    assert d.in_channels == 5
    with pytest.raises(DataFormatError, match="layout must be one of"):
        load_dataset("npz", _npz(tmp_path / "bad.npz", layout="HWC", **kw))


def test_npz_a_guess_that_reads_non_square_images_asks_for_the_layout(tmp_path):
    """3x3 patches of 13 bands (NHWC): dim 1 alone holds a channel-like 3, but reading
    them channels-first gives 3x13 images where channels-last gives square ones; a resize
    would stretch the wrong axes, so the layout is asked for."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 3, 3, 13)).astype(np.float32)
    y = np.arange(8) % 2
    kw = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    with pytest.raises(DataFormatError, match=r"reads as NCHW \(3x13 images, not square\) or "
                       r"as NHWC \(3x3\); add layout='NHWC'"):
        load_dataset("npz", _npz(tmp_path / "hs.npz", **kw), resolution=3)
    d = load_dataset("npz", _npz(tmp_path / "hs2.npz", layout="NHWC", **kw))
    assert d.train_x.shape == (8, 13, 3, 3)
    # a guess whose other reading is not square either stays (non-square, resized)
    wide = rng.random((8, 3, 4, 6)).astype(np.float32)
    d = load_dataset("npz", _npz(tmp_path / "w.npz", x_train=wide, y_train=y, x_test=wide,
                                 y_test=y), resolution=4)
    assert d.train_x.shape == (8, 3, 4, 4)


def test_npz_class_names_stored_as_bytes_are_text(tmp_path):
    d = load_dataset("npz", _npz(tmp_path / "b.npz",
                                 classes=np.array([f"c{i}".encode() for i in range(10)])))
    assert d.classes[:2] == ("c0", "c1")


def test_npz_subsets_resolution_and_non_square(tmp_path, caplog):
    with caplog.at_level("INFO", logger="diffnas"):
        d = load_dataset("npz", _npz(tmp_path / "d.npz", classes=np.array(list("abcdefghij"))),
                         resolution=16, train_subset=40, test_subset=10, seed=3)
    assert d.train_x.shape == (40, 1, 16, 16) and d.test_x.shape == (10, 1, 16, 16)
    assert "1x8x8 (resized to 1x16x16: data.resolution)," in caplog.text  # what is used
    assert isinstance(d, CustomImageData) and d.classes[1] == "b"  # kept through subsets
    rect = np.zeros((10, 6, 8), dtype=np.uint8)
    rect[:, :3] = 200
    y = np.arange(10) % 2
    path = _npz(tmp_path / "r.npz", x_train=rect, y_train=y, x_test=rect, y_test=y)
    with pytest.raises(DataFormatError, match=r"6x8 \(height x width\), not square.*resolution"):
        load_dataset("npz", path)
    d = load_dataset("npz", path, resolution=4)
    assert d.train_x.shape == (10, 1, 4, 4)
    assert (d.train_x[:, 0, :2] > 0).all() and (d.train_x[:, 0, 2:] < 0).all()  # stretched


def test_npz_missing_paths_and_arrays(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="needs data.root"):
        load_dataset("npz")
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nope.npz'}: no such file"):
        load_dataset("npz", str(tmp_path / "nope.npz"))
    with pytest.raises(DatasetNotFoundError, match="is a directory"):
        load_dataset("npz", str(tmp_path))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataFormatError, match="not a .npz archive"):
        load_dataset("npz", str(tmp_path / "one.npy"))
    with pytest.raises(DataFormatError, match=r"missing array\(s\) y_test; it holds x_test, "):
        load_dataset("npz", _npz(tmp_path / "m.npz", y_test=None))
    with pytest.raises(DataFormatError, match=r"unexpected array\(s\) x_val"):
        load_dataset("npz", _npz(tmp_path / "u.npz", x_val=np.zeros(3)))
    with pytest.raises(DataFormatError, match="data.download=true applies only to cifar10"):
        load_dataset("npz", _npz(tmp_path / "d.npz"), download=True)


@pytest.mark.parametrize("arrays, match", [
    ({"y_test": np.full(50, 10)}, r"y_test has label 10 but y_train's labels are 0..9"),
    ({"y_train": np.r_[np.arange(149), -1]}, "label -1 is negative"),
    ({"y_train": np.arange(150) % 10 + 1, "y_test": np.arange(50) % 10 + 1},
     r"class\(es\) \[0\] have no training images"),
    ({"y_train": (np.arange(150) % 10).astype(np.float32)}, "labels must be integers.*float32"),
    ({"y_train": np.eye(10, dtype=np.int64)[np.arange(150) % 10]}, "one-hot"),
    ({"y_train": np.arange(149) % 10}, "149 labels for 150 images"),
    ({"y_test": np.arange(49) % 10}, "y_test: 49 labels for 50 images"),
    ({"classes": np.array(["a", "b"])}, "y_train has label 9 but classes has 2 names"),
    ({"y_train": np.zeros(150, dtype=np.int64), "y_test": np.zeros(50, dtype=np.int64)},
     "single class"),
    ({"x_test": np.zeros((50, 7, 7), dtype=np.uint8)}, r"x_test images are \(1, 7, 7\)"),
    ({"x_train": np.full((150, 8, 8), np.nan)}, "NaN or infinite"),
    ({"x_train": np.full((150, 8, 8), 1e300)}, "values up to 1e.300 are beyond float32"),
    ({"x_train": np.zeros((150, 64), dtype=np.uint8)}, r"got shape \(150, 64\)"),
    ({"x_train": np.zeros((150, 8, 8), dtype=bool)}, "dtype bool"),
    ({"x_test": np.zeros((50, 8, 8))}, "same scale"),
    ({"x_train": np.ones((150, 8, 8), dtype=np.int16), "x_test": np.ones((50, 8, 8))},
     "x_train is int16 but x_test is float64; store both on the same scale"),
    ({"x_train": np.full((150, 8, 8), 255.0), "x_test": np.full((50, 8, 8), 1.0)},
     "x_train's values reach 255 but x_test's reach 1; store both on the same scale"),
    ({"x_train": np.full((150, 8, 8), -128, np.int8), "x_test": np.full((50, 8, 8), 3, np.int8)},
     "x_train's values reach 128 but x_test's reach 3"),  # abs(int8 -128) overflows
    ({"y_train": np.r_[np.arange(149) % 10, 0].astype(np.uint64) + np.uint64(2**63 + 1) * (
        np.arange(150) == 149)},
     "label 9223372036854775809 is beyond int64"),
    ({"x_train": np.zeros((0, 8, 8), dtype=np.uint8), "y_train": np.zeros(0, np.int64)},
     r"x_train: no images \(0 in the array\)"),
    ({"x_train": np.zeros((150, 0, 0), dtype=np.uint8), "x_test": np.zeros((50, 0, 0), np.uint8)},
     r"x_train: images of shape \(150, 0, 0\) have a dimension of size 0"),
    # ID-like labels: the check of missing classes built set(range(2e9)) (gigabytes)
    ({"y_train": np.where(np.arange(150) % 2, 2_000_000_003, 1_000_000_003),
      "y_test": np.full(50, 1_000_000_003)}, r"class\(es\) \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] "
     r"have no training images"),
])
def test_npz_malformed_arrays_name_the_file_and_the_problem(tmp_path, arrays, match):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataFormatError, match=match) as err:
        load_dataset("npz", path)
    assert path in str(err.value)


@pytest.mark.parametrize("arrays, match", [
    ({"x_train": np.zeros((150, 8, 8), dtype=bool)}, "dtype bool"),
    ({"x_train": np.zeros((0, 8, 8), dtype=np.uint8), "y_train": np.zeros(0, np.int64)},
     "no images"),
    ({"x_test": np.zeros((50, 7, 7), dtype=np.uint8)}, r"x_test images are \(1, 7, 7\)"),
    ({"x_test": np.zeros((50, 8, 8))}, "x_train is uint8 but x_test is float64"),
])
def test_peek_shape_refuses_what_the_load_refuses(tmp_path, arrays, match):
    """``train --dry-run`` peeks at the headers: it passed boolean images and a test set
    of another shape, and crashed on empty arrays with numpy's own error."""
    path = _npz(tmp_path / "bad.npz", **arrays)
    for read in (lambda: peek_shape("npz", path), lambda: load_dataset("npz", path)):
        with pytest.raises(DataFormatError, match=match):
            read()


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_npz_is_named_not_a_zipfile_traceback(tmp_path):
    """A bad CRC raised zipfile.BadZipFile from the load (after the run directory
    existed) while the header-only peek passed it; a member that is not a .npy array came
    back as bytes and failed with an AttributeError."""
    import zipfile

    path = Path(_npz(tmp_path / "flip.npz"))
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    _flip_byte(path, info.header_offset + 30 + len(info.filename) + 200)  # inside the pixels
    with pytest.raises(DataFormatError, match=r"flip.npz: x_train is damaged.*write the file"):
        load_dataset("npz", str(path))
    raw = tmp_path / "raw.npz"
    with zipfile.ZipFile(raw, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(key, b"not an array")  # no .npy suffix: np.load gives bytes
    with pytest.raises(DataFormatError, match="raw.npz: x_train is damaged or not a .npy"):
        load_dataset("npz", str(raw))
    garbled = tmp_path / "garbled.npz"
    with zipfile.ZipFile(garbled, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", b"garbage, not a .npy header")
    for read in (lambda: peek_shape("npz", str(garbled)),
                 lambda: load_dataset("npz", str(garbled))):
        with pytest.raises(DataFormatError, match=r"garbled.npz: [xy]_train is damaged"):
            read()


# --- folder ----------------------------------------------------------------------------
CLASSES = {"cat": 3, "ant": 1, "bee": 2}  # name -> the digit whose images it holds


def _folder(root: Path, per_class: int = 4, mode: str = "L", side: int = 8) -> Path:
    x, y = _digits()
    for split, offset in (("train", 0), ("test", per_class)):
        for name, digit in CLASSES.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i, img in enumerate(x[y == digit][offset:offset + per_class]):
                im = PIL.fromarray(img).convert(mode)
                if side != 8:
                    im = im.resize((side, side), PIL.Resampling.NEAREST)
                im.save(d / f"img{i}.png")
    return root


def test_folder_reads_images_in_linked_subfolders_once(tmp_path):
    """A class folder's subfolder that is a symbolic link was skipped (``rglob`` does not
    follow links): its images silently missing. Now read, and a link loop ends."""
    from diffnas.data.custom import peek_count

    root = _folder(tmp_path / "f")
    more = _folder(tmp_path / "more")
    (root / "train" / "ant" / "extra").symlink_to(more / "train" / "ant")
    (root / "train" / "ant" / "loop").symlink_to(root / "train" / "ant")
    d = load_dataset("folder", str(root))
    assert d.train_y.tolist().count(0) == 8 and len(d.train_y) == 16
    assert peek_count("folder", str(root)) == 16


def test_folder_classes_sorted_labels_and_pixels(tmp_path):
    root = _folder(tmp_path / "f")
    d = load_dataset("folder", str(root))
    assert isinstance(d, CustomImageData) and d.name == "folder"
    assert d.classes == ("ant", "bee", "cat") and d.num_classes == 3
    assert d.train_x.shape == (12, 1, 8, 8) and d.test_x.shape == (12, 1, 8, 8)
    assert d.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class, sorted file
    x, y = _digits()
    expected = np.concatenate([x[y == CLASSES[c]][:4] for c in d.classes]).astype(np.float32)
    raw = torch.from_numpy(expected) / 255
    torch.testing.assert_close(d.train_x[:, 0], (raw - raw.mean()) / raw.std())
    assert abs(d.train_x.mean().item()) < 1e-5 and d.black == pytest.approx(
        (-(raw.mean() / raw.std()).item(),), rel=1e-5)
    rgb = load_dataset("folder", str(_folder(tmp_path / "rgb", mode="RGB")))
    assert rgb.in_channels == 3
    torch.testing.assert_close(rgb.train_x[:, 1], d.train_x[:, 0])  # gray saved as RGB


def test_folder_mixed_sizes_need_a_resolution(tmp_path):
    root = _folder(tmp_path / "f")
    big = root / "train" / "bee" / "big.png"
    PIL.new("L", (12, 12), 100).save(big)
    with pytest.raises(DataFormatError, match=f"{big}: 12x12 pixels but .* is 8x8.*resolution"):
        load_dataset("folder", str(root))
    d = load_dataset("folder", str(root), resolution=10)
    assert d.train_x.shape == (13, 1, 10, 10) and d.test_x.shape == (12, 1, 10, 10)
    assert d.resolution == 10
    wide = tmp_path / "w"
    _folder(wide, side=8)
    for p in sorted(wide.rglob("*.png")):
        PIL.new("L", (10, 6), 50).save(p)
    with pytest.raises(DataFormatError, match=r"6x10 \(height x width\), not square"):
        load_dataset("folder", str(wide))
    assert load_dataset("folder", str(wide), resolution=5).train_x.shape[-2:] == (5, 5)


def test_folder_missing_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="needs data.root"):
        load_dataset("folder")
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset("folder", str(tmp_path / "nope"))
    root = _folder(tmp_path / "f")
    for p in sorted((root / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "test").rmdir()
    with pytest.raises(DatasetNotFoundError, match=f"{root / 'test'} does not exist"):
        load_dataset("folder", str(root))


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r / "train" / "dog").mkdir(), "train/dog: empty class folder"),
    (lambda r: PIL.new("RGB", (8, 8)).save(r / "train" / "bee" / "rgb.png"),
     r"rgb.png: 3 channel\(s\) \(RGB\) but .* has 1"),
    (lambda r: (r / "train" / "ant" / "notes.txt").write_text("x"), "notes.txt: not an image"),
    (lambda r: (r / "train" / "cat" / "broken.png").write_bytes(b"not a png"),
     "broken.png: cannot read the image"),
    (lambda r: PIL.new("L", (8, 8)).save(r / "train" / "loose.png"),
     "loose.png: files directly in .* have no class"),
    (lambda r: (r / "test" / "dog").mkdir(), r"class folder\(s\) \['dog'\] have no training"),
    (lambda r: PIL.new("I;16", (8, 8)).save(r / "train" / "cat" / "deep.png"),
     "deep.png: PIL mode 'I(;16)?' .*not supported"),  # older Pillow opens it as 'I'
])
def test_folder_malformed_trees_name_the_path(tmp_path, damage, match):
    root = _folder(tmp_path / "f")
    damage(root)
    with pytest.raises(DataFormatError, match=match):
        load_dataset("folder", str(root))


def test_folder_needs_two_classes_and_ignores_hidden_files(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "train" / "ant" / ".DS_Store").write_text("x")  # hidden: not data
    assert load_dataset("folder", str(root)).train_x.shape[0] == 12
    one = tmp_path / "one"
    (one / "train" / "a").mkdir(parents=True)
    (one / "test").mkdir()
    PIL.new("L", (8, 8)).save(one / "train" / "a" / "x.png")
    with pytest.raises(DataFormatError, match=r"1 class folder\(s\) \['a'\]"):
        load_dataset("folder", str(one))


# --- shapes without loading, config, command line --------------------------------------
def test_peek_shape_matches_the_loaded_data(tmp_path):
    npz = _npz(tmp_path / "d.npz", x_train=np.zeros((150, 3, 8, 8), dtype=np.uint8),
               x_test=np.zeros((50, 3, 8, 8), dtype=np.uint8))
    assert peek_shape("npz", npz) == (3, 8, 10)
    assert peek_shape("npz", npz, resolution=32) == (3, 32, 10)
    root = str(_folder(tmp_path / "f", mode="RGB"))
    d = load_dataset("folder", root)
    assert peek_shape("folder", root) == (d.in_channels, d.resolution, d.num_classes) == (3, 8, 3)
    assert peek_shape("digits", None) is None and peek_shape("cifar10", "/x") is None
    with pytest.raises(DatasetNotFoundError):
        peek_shape("npz", str(tmp_path / "nope.npz"))
    # an object array (needs pickle) is the loader's error, naming the file and the fix
    obj = _npz(tmp_path / "obj.npz", y_train=np.array([[1], [1, 2]] * 75, dtype=object))
    for read in (lambda: peek_shape("npz", obj), lambda: load_dataset("npz", obj)):
        with pytest.raises(DataFormatError, match=f"{obj}: y_train is an array of Python "
                           r"objects .*y\.astype\(np\.int64\)"):
            read()
    names = _npz(tmp_path / "names.npz", classes=np.array([f"c{i}" for i in range(10)],
                                                          dtype=object))
    with pytest.raises(DataFormatError, match=r"classes is an .*dtype=str\) stores names"):
        peek_shape("npz", names)


def test_what_a_plugin_loader_returns_is_checked_by_name(monkeypatch):
    """A plugin's labels beyond its num_classes, or fewer labels than images, were torch
    IndexErrors mid-search ("Target 7 is out of bounds"); fractional labels were cut to
    integers. Now errors naming the dataset and the fault."""
    from diffnas.data.base import prepare
    from diffnas.data.registry import DATASETS

    x, y = _digits()
    xt, yt = torch.from_numpy(x[:, None]), torch.from_numpy(y)

    def register(**change):
        def loader(root=None, download=False):
            parts = {"train_y": yt[:150], "test_y": yt[150:], "num_classes": 10, **change}
            return prepare("mine", xt[:150], parts["train_y"], xt[150:], parts["test_y"],
                           num_classes=parts["num_classes"], scale=255.0)
        monkeypatch.setitem(DATASETS._items, "mine", loader)

    register()
    assert load_dataset("mine").num_classes == 10
    for change, match in (
            ({"num_classes": 5}, r"dataset 'mine': train label 9 is outside 0\.\.4 "
                                 r"\(num_classes=5\)"),
            ({"test_y": yt[150:] - 1}, "test label -1 is outside 0..9"),
            ({"train_y": yt[:140]}, r"train_y must hold one label per image: shape \(140,\) "
                                    "for 150 images"),
            ({"train_y": yt[:150] + 0.5}, "train labels must be class indices 0..K-1, got "
                                          "fractional values such as 0.5"),
            ({"num_classes": 1}, "num_classes is 1; classification needs at least two")):
        register(**change)
        with pytest.raises(DataFormatError, match=match):
            load_dataset("mine")
    register(train_y=yt[:150].double())  # whole numbers in a float tensor are labels
    assert load_dataset("mine").train_y.dtype == torch.int64


def test_a_search_refuses_damaged_npz_labels_before_its_run_directory(tmp_path, capsys):
    """What ``peek_shape`` can tell without loading the images (here: 1-based labels) is
    refused before a run directory is written, as missing files are."""
    x, y = _digits()
    bad = _npz(tmp_path / "bad.npz", y_train=y[:150] + 1)
    out = tmp_path / "runs"
    assert main(["search", "data.name=npz", f"data.root={bad}", f"out_dir={out}"]) == 2
    assert "class(es) [0] have no training images" in capsys.readouterr().err
    assert not out.exists()


def test_config_accepts_the_new_dataset_names():
    assert load_config(None, ["data.name=npz", "data.root=/x.npz"]).data.name == "npz"
    assert load_config(None, ["data.name=folder"]).data.name == "folder"


def test_search_and_retrain_on_an_npz_from_the_command_line(tmp_path, capsys):
    path = _npz(tmp_path / "mine.npz", classes=np.array([f"digit{i}" for i in range(10)]))
    argv = [  # the example recipe, shrunk to seconds
        "search", "--config", str(ROOT / "configs/own_data_example.yaml"), f"out_dir={tmp_path}",
        "name=r", f"data.root={path}", "device=cpu",
        "progress=false", "data.train_subset=32", "data.test_subset=16", "data.batch_size=16",
        "search.epochs=1", "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2}",
        "retrain.epochs=1", "retrain.batch_size=16", "retrain.train_subset=32",
        "retrain.network={C: 4, layers: 3}",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Genotype(normal=" in out and "test accuracy:" in out
    result = json.loads((tmp_path / "r/retrain/result.json").read_text())
    assert 0.0 <= result["test_acc"] <= 1.0
    assert "0=digit0, 1=digit1" in (tmp_path / "r/log.txt").read_text()  # labels -> names
    # what a user of the model needs is recorded with the result: names, normalisation
    assert result["data"]["classes"] == [f"digit{i}" for i in range(10)]
    assert result["data"]["input"] == [1, 8, 8] and len(result["data"]["mean"]) == 1


def test_a_retraining_batch_larger_than_the_data_is_refused_before_the_search(tmp_path, capsys):
    """20 training images and retrain.batch_size=32: the loop found it only after the
    whole search, and --resume cannot change retrain.*. Now refused before any search
    step; where the search did finish, the error says how to retrain its genotype."""
    from diffnas.engine.retrain import run_retrain
    from diffnas.engine.search import run_search

    x, y = _digits(40)
    path = _npz(tmp_path / "tiny.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:],
                y_test=y[20:])
    argv = ["search", f"out_dir={tmp_path}", "name=r", "data.name=npz", f"data.root={path}",
            "device=cpu", "progress=false", "data.batch_size=4", "search.epochs=1",
            "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2}", "retrain.epochs=1",
            "retrain.network={C: 4, layers: 3}", "retrain.batch_size=32", "retrain.cutout=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "retrain.batch_size=32 exceeds the 20 training images" in err
    assert "search has not started" in err
    assert not (tmp_path / "r").exists()  # own data is counted before the run directory
    # diffnas train retrains whatever retrain.enabled says: refused before its run too
    assert main(["train", "--genotype", "DARTS_V2", *argv[1:7],
                 "retrain.enabled=false", "retrain.batch_size=32", "retrain.cutout=0"]) == 2
    err = capsys.readouterr().err
    assert "retrain.batch_size=32 exceeds the 20 training images" in err
    assert "search has not started" not in err and not (tmp_path / "r").exists()
    # a search batch larger than the dataset's images: said before the run, with counts
    assert main([*argv, "data.batch_size=16", "retrain.batch_size=4"]) == 2
    assert ("data.batch_size=16 gives no full batch per epoch from the dataset's 20 training "
            "images: its split (data.search_split=0.5) leaves 10 images to train the weights "
            "and 10 the architecture (incomplete batches are dropped); lower data.batch_size "
            "or add images") in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # --seeds and latency sweep start each run as a resume: checked there too
    with pytest.raises(ValueError, match="retrain.batch_size=32 exceeds the 20 training"):
        run_search(load_config(None, argv[3:] + ["name=t"]), tmp_path / "t", resume=True)
    # a search that did run (e.g. resumed): the error names the way to its genotype
    cfg = load_config(None, argv[3:] + ["name=s", "retrain.enabled=false"])
    run_search(cfg, tmp_path / "s")
    cfg.retrain.enabled = True
    from diffnas.config import save_config

    save_config(cfg, tmp_path / "s" / "config.yaml")  # as the command line writes it
    with pytest.raises(ValueError, match=r"no full batch.*genotype is kept") as err:
        run_retrain(cfg, Genotype.load(tmp_path / "s/search/genotype.json"), tmp_path / "s")
    # the command it gives works as printed (the run's config names the run: a new name)
    command = str(err.value).split("as a new run beside this one: ")[1]
    argv = shlex.split(command.replace("retrain.batch_size=N", "retrain.batch_size=4"))
    assert argv[0] == "diffnas" and main(argv[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "s-retrain/retrain/result.json").is_file()


def test_augmentation_as_large_as_the_images_is_refused(tmp_path, capsys):
    """The retraining's cutout (CIFAR-10's 16 by default) and crop padding against the
    images' side: 16 erased every 8x8 digit, and that retraining learned nothing (loss
    ln 10, test loss 1e14). Refused before a run directory (built-in sets, your own data
    from its headers, data.resolution's side); at the retraining, where a dataset's side
    shows only then, with the command that retrains the search's genotype."""
    from diffnas.config import check_data_files, save_config
    from diffnas.data import Augment
    from diffnas.engine.retrain import run_retrain
    from diffnas.genotype import resolve_genotype

    g = torch.Generator().manual_seed(0)
    assert not Augment(cutout=16)(torch.ones(64, 1, 8, 8), g).any()  # every image erased
    assert Augment(cutout=7)(torch.ones(64, 1, 8, 8), g).flatten(1).any(1).all()
    base = ["search", f"out_dir={tmp_path}", "name=r", "progress=false", "search.epochs=1"]
    for extra, refused in (
            (["data.name=digits"], "retrain.cutout=16 is not smaller than the 8x8 training "
             "images: a cutout square that large erases more than half of an image on "
             "average, all of it at some centres; DARTS erases half the side (16 of "
             "CIFAR-10's 32): retrain.cutout=4, or 0 for none"),
            (["data.name=digits", "data.resolution=16", "retrain.cutout=8",
              "retrain.crop_padding=16"], "retrain.crop_padding=16 is not smaller than the "
             "16x16 training images: some random crops would hold padding alone; DARTS pads "
             "an eighth of the side (4 of 32): retrain.crop_padding=2, or 0 for none"),
            (["data.name=npz", f"data.root={_npz(tmp_path / 'd.npz')}", "retrain.cutout=8"],
             "retrain.cutout=8 is not smaller than the 8x8")):
        assert main([*base, *extra]) == 2
        assert refused in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
    # a search that retrains nothing is not refused; diffnas train retrains anyway
    check_data_files(load_config(None, ["data.name=digits", "retrain.enabled=false"]))
    assert main(["train", "--genotype", "DARTS_V2", *base[1:], "data.name=digits",
                 "retrain.enabled=false"]) == 2
    assert "retrain.cutout=16 is not smaller" in capsys.readouterr().err
    check_data_files(load_config(None, ["data.name=digits", "data.resolution=32"]))
    # at the retraining (a plugin's dataset: its side is known once loaded), after a search
    cfg = load_config(None, ["data.name=digits", "data.test_subset=32", "progress=false",
                             "retrain.epochs=1", "retrain.network={C: 4, layers: 3}",
                             "retrain.batch_size=32", "retrain.train_subset=64",
                             f"out_dir={tmp_path}", "name=s"])
    (tmp_path / "s/search").mkdir(parents=True)
    resolve_genotype("DARTS_V2").save(tmp_path / "s/search/genotype.json")
    save_config(cfg, tmp_path / "s/config.yaml")
    with pytest.raises(ValueError, match=r"retrain.cutout=16 is not smaller.*genotype is kept"
                       ) as err:
        run_retrain(cfg, resolve_genotype("DARTS_V2"), tmp_path / "s")
    command = str(err.value).split("as a new run beside this one: ")[1]
    assert command.endswith(" retrain.cutout=4")  # the fix, given as printed: it runs
    assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    assert (tmp_path / "s-retrain/retrain/result.json").is_file()


def test_command_line_reports_bad_data_as_an_error(tmp_path, capsys):
    path = _npz(tmp_path / "bad.npz", y_test=np.full(50, 12))
    argv = ["search", f"out_dir={tmp_path}", "name=r", "data.name=npz", f"data.root={path}",
            "search.epochs=1", "progress=false"]
    assert main(argv) == 2
    assert f"{path}: y_test has label 12" in capsys.readouterr().err


def test_a_fix_by_a_setting_says_it_needs_a_new_run(tmp_path, capsys):
    """Mixed image sizes are found on reading, after the run directory exists: the fix
    data.resolution is a setting a resume cannot change, so the hint names a new run
    (and the resume for files fixed instead); other data errors keep the resume hint."""
    root = _folder(tmp_path / "f")
    PIL.new("L", (12, 12), 100).save(root / "train" / "bee" / "big.png")
    argv = ["search", f"out_dir={tmp_path}", "name=r", "data.name=folder", f"data.root={root}",
            "search.epochs=1", "progress=false", "data.batch_size=4", "retrain.batch_size=4",
            "retrain.cutout=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    run = tmp_path / "r"
    assert (f"(data.resolution is a setting the run keeps: to use it, start a new run (delete "
            f"{run} or give another name=); with the files fixed instead, continue it with: "
            f"diffnas search --resume {run})") in err
    # NaN pixels show only in the images (labels and shapes are checked before the run)
    nan = np.full((150, 1, 8, 8), np.nan, dtype=np.float32)
    path = _npz(tmp_path / "bad.npz", x_train=nan, x_test=nan[:50])
    assert main([*argv[:2], "name=n", "data.name=npz", f"data.root={path}", *argv[5:]]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "the run directory is kept: with the data fixed" in err


def test_importing_diffnas_data_registers_both(tmp_path):
    import subprocess
    import sys

    code = "from diffnas.data import list_datasets; print(' '.join(list_datasets()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert {"npz", "folder"} <= set(out.stdout.split())
