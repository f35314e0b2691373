"""Rules of your own image data (data.name=npz: one .npz file; data.name=folder: train/ and
test/ trees of class folders) and of the shared image plumbing (data/base.py: prepare,
check_image_data, subset; data/registry.py: load_dataset, check_dataset_files) that a
mutation audit found unchecked: layout inference and what it refuses, the scale and kind
that train and test must share, class names, label shapes, image modes and what a folder
tree hides, the test images checked against the training ones, the counts and shapes read
without loading. Each test builds a tiny npz or PNG tree in tmp_path and checks a rule
against pixels, counts or messages worked out by hand."""

from __future__ import annotations

import logging
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from diffnas.data import DatasetNotFoundError, load_dataset
from diffnas.data.base import DataFormatError, ImageData, check_image_data, prepare, subset
from diffnas.data.custom import peek_count, peek_shape
from diffnas.data.registry import check_dataset_files

PIL = pytest.importorskip("PIL.Image")


# --- helpers ---------------------------------------------------------------------------
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save(path: Path, x_train, y_train, x_test=None, y_test=None, **extra) -> str:
    """An npz holding the four arrays (test = train when not given) and ``extra``."""
    x_test = x_train if x_test is None else x_test
    y_test = y_train if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)
    return str(path)


def _gray(n: int = 6, side: int = 4, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (n, side, side), dtype=np.uint8)


def _labels(n: int, k: int = 2) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % k


def _tree(root: Path, make, per: dict[str, dict[str, int]] | None = None,
          ext: str = ".png") -> Path:
    """``root/<split>/<class>/img<i><ext>`` holding ``make(split, class, i)`` (a PIL
    image); ``per``: images per split and class (2 of classes a and b by default)."""
    per = per or {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}}
    for split, counts in per.items():
        for name, n in counts.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make(split, name, i).save(d / f"img{i}{ext}")
    return root


def _noise(mode: str = "L", side: int = 4):
    """A maker of seeded random images of ``mode`` (distinct per split, class and index)."""
    bands = {"L": 1, "RGB": 3, "LA": 2, "RGBA": 4}[mode]

    def make(split, name, i):
        seed = zlib.crc32(f"{split}/{name}/{i}".encode())  # hash() of str varies per run
        a = _rng(seed).integers(0, 256, (side, side, bands), dtype=np.uint8)
        return PIL.fromarray(a[..., 0] if bands == 1 else a, mode)
    return make


def _pixels(d: ImageData, which: str = "train") -> torch.Tensor:
    """The images in the units they were read in (undoing the recorded normalisation)."""
    x = getattr(d, f"{which}_x")
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (d.mean, d.std))
    return x.double() * std + mean


# --- npz: layout inference --------------------------------------------------------------
def test_four_channels_last_are_inferred_as_rgba(tmp_path):
    """A channel count of 4 (RGBA) on dim 3 alone tells channels-last: the images equal
    the same array stored channels-first."""
    x = _rng().integers(0, 256, (6, 5, 5, 4), dtype=np.uint8)
    last = load_dataset("npz", _save(tmp_path / "l.npz", x, _labels(6)))
    first = load_dataset("npz", _save(tmp_path / "f.npz", x.transpose(0, 3, 1, 2), _labels(6)))
    assert last.train_x.shape == (6, 4, 5, 5)
    assert torch.equal(last.train_x, first.train_x)
    torch.testing.assert_close(_pixels(last)[:, 2], torch.from_numpy(x[..., 2]).double(),
                               atol=1e-3, rtol=0)


def test_a_stored_layout_must_fit_the_number_of_dimensions(tmp_path):
    path = _save(tmp_path / "d.npz", _gray(), _labels(6), layout="NHWC")
    for read in (lambda: load_dataset("npz", path), lambda: peek_shape("npz", path)):
        with pytest.raises(DataFormatError, match=r"layout NHWC does not fit shape \(6, 4, 4\)"):
            read()


def test_a_layout_stored_as_a_list_is_refused(tmp_path):
    """The layout is one string (``layout='NHWC'``); a 1-element array is not guessed at."""
    x = _rng().integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    path = _save(tmp_path / "d.npz", x, _labels(6), layout=np.array(["NHWC"]))
    with pytest.raises(DataFormatError, match="layout must be one of NHW, NHWC, NCHW"):
        load_dataset("npz", path)


@pytest.mark.parametrize("shape", [(6, 0, 4), (6, 4, 0), (6, 3, 0, 4)])
def test_an_image_side_of_size_zero_is_named(tmp_path, shape):
    x = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(DataFormatError, match="have a dimension of size 0"):
        load_dataset("npz", _save(tmp_path / "z.npz", x, _labels(6)))


def test_channels_last_non_square_images_are_named_height_by_width(tmp_path):
    """NHWC (6, 5, 7, 3): 5 rows of 7 pixels, said as 5x7 (height x width) by the peek
    and the load alike; 5x3 patches whose other reading is square name both readings in
    the NHWC order."""
    x = _rng().random((6, 5, 7, 3)).astype(np.float32)
    path = _save(tmp_path / "w.npz", x, _labels(6))
    for read in (lambda: peek_shape("npz", path), lambda: load_dataset("npz", path)):
        with pytest.raises(DataFormatError, match=r"images are 5x7 \(height x width\)"):
            read()
    patches = _rng().random((6, 5, 3, 3)).astype(np.float32)  # NHWC 5x3 or NCHW 3x3
    with pytest.raises(DataFormatError, match=r"reads as NHWC \(5x3 images, not square\) or as "
                                              r"NCHW \(3x3\); add layout='NCHW'"):
        load_dataset("npz", _save(tmp_path / "p.npz", patches, _labels(6)))


def test_peek_reads_a_version_2_npy_header(tmp_path):
    """np.save writes format 2.0 when a header outgrows 64 KiB; its header length field
    is 4 bytes, not 2, so reading it as 1.0 misreads the shape."""
    path = tmp_path / "v2.npz"
    x = _rng().integers(0, 256, (7, 3, 5, 5), dtype=np.uint8)
    arrays = {"x_train": x, "y_train": _labels(7), "x_test": x[:3], "y_test": _labels(3)}
    with zipfile.ZipFile(path, "w") as z:
        for key, a in arrays.items():
            with z.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, a, version=(2, 0))
    assert peek_shape("npz", str(path)) == (3, 5, 2)
    assert peek_count("npz", str(path)) == 7
    assert load_dataset("npz", str(path)).train_x.shape == (7, 3, 5, 5)


# --- npz: resolution and resizing -------------------------------------------------------
@pytest.mark.parametrize("resolution", [0, -3])
def test_a_resolution_below_one_is_refused(tmp_path, resolution):
    path = _save(tmp_path / "d.npz", _gray(), _labels(6))
    for read in (lambda: load_dataset("npz", path, resolution=resolution),
                 lambda: peek_shape("npz", path, resolution)):
        with pytest.raises(DataFormatError, match=f"data.resolution must be >= 1, got "
                                                  f"{resolution}"):
            read()


def test_the_non_square_error_names_the_setting_that_fixes_it(tmp_path):
    """``setting`` tells the command line the fix is a setting a resume cannot change."""
    x = np.zeros((6, 4, 6), dtype=np.uint8)
    x[:, :, :3] = 200
    with pytest.raises(DataFormatError, match="not square") as err:
        load_dataset("npz", _save(tmp_path / "r.npz", x, _labels(6)))
    assert err.value.setting == "data.resolution"


def test_a_stretch_that_grows_one_axis_interpolates_it(tmp_path):
    """4x12 images stretched to 8x8: the height grows, so it is bilinear (rows between two
    stored rows blend them), although the width shrinks. Each row holds one value, so an
    8-row image shows new values only where rows were blended."""
    rows = np.array([0, 60, 180, 240], dtype=np.uint8)
    x = np.repeat(np.broadcast_to(rows[:, None], (4, 12))[None], 6, axis=0).copy()
    x[1::2] = 255 - x[1::2]  # two images, so the training std is not 0
    d = load_dataset("npz", _save(tmp_path / "r.npz", x, _labels(6)), resolution=8)
    got = _pixels(d)[0, 0]
    assert got.shape == (8, 8)
    assert torch.allclose(got, got[:, :1].expand(8, 8), atol=1e-3)  # rows stay constant
    # bilinear, align_corners=False: output row i samples input row (i + 0.5) / 2 - 0.5
    want = []
    for i in range(8):
        src = min(max((i + 0.5) / 2 - 0.5, 0.0), 3.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, 3)
        want.append(rows[lo] + (src - lo) * (float(rows[hi]) - float(rows[lo])))
    torch.testing.assert_close(got[:, 0], torch.tensor(want, dtype=torch.float64), atol=1e-3,
                               rtol=0)


# --- npz: dtypes, scales and labels -----------------------------------------------------
def test_uint16_images_are_integers_not_bytes(tmp_path):
    """Only uint8 is read as 0-255 bytes: uint16 is another kind than uint8 (refused
    beside a uint8 test set) and its scale is compared between train and test."""
    x16 = _rng().integers(0, 60000, (6, 4, 4)).astype(np.uint16)
    with pytest.raises(DataFormatError, match="x_train is uint16 but x_test is uint8"):
        load_dataset("npz", _save(tmp_path / "a.npz", x16, _labels(6), x_test=_gray()))
    small = np.full((6, 4, 4), 3, dtype=np.uint16)
    with pytest.raises(DataFormatError, match=re.escape(
            f"x_train's values reach {x16.max():.4g} but x_test's reach 3")):
        load_dataset("npz", _save(tmp_path / "b.npz", x16, _labels(6), x_test=small))


def test_integer_images_on_different_scales_are_refused(tmp_path):
    x = np.full((6, 4, 4), 1000, dtype=np.int16)
    x[0, 0, 0] = 0
    with pytest.raises(DataFormatError, match="x_train's values reach 1000 but x_test's reach 5"):
        load_dataset("npz", _save(tmp_path / "d.npz", x, _labels(6), x_test=x // 200))


@pytest.mark.parametrize("test_peak, refused", [(1.0, False), (10.0, False), (10.5, True),
                                                (0.099, True)])
def test_scales_more_than_ten_times_apart_are_refused(tmp_path, test_peak, refused):
    """Largest values more than 10x apart (1 against 10.5) are another scale; exactly 10x
    is not more than 10x."""
    x = _rng().random((6, 4, 4))
    x[0, 0, 0] = 1.0  # the training peak
    path = _save(tmp_path / "d.npz", x, _labels(6), x_test=x / x.max() * test_peak)
    if refused:
        with pytest.raises(DataFormatError, match="store both on the same scale"):
            load_dataset("npz", path)
    else:
        assert load_dataset("npz", path).test_x.shape == (6, 1, 4, 4)


@pytest.mark.parametrize("zero", ["x_train", "x_test"])
def test_all_zero_images_against_non_zero_ones_are_another_scale(tmp_path, zero):
    x = _rng().random((6, 4, 4)) + 0.5
    arrays = {"x_train": x, "x_test": x.copy()}
    arrays[zero] = np.zeros_like(x)
    with pytest.raises(DataFormatError, match="store both on the same scale"):
        load_dataset("npz", _save(tmp_path / "d.npz", arrays["x_train"], _labels(6),
                                  x_test=arrays["x_test"]))


def test_a_nan_in_any_image_is_refused(tmp_path):
    x = _rng().random((6, 4, 4)).astype(np.float32)
    bad = x.copy()
    bad[-1, 3, 3] = np.inf
    with pytest.raises(DataFormatError, match="x_test: images contain NaN or infinite"):
        load_dataset("npz", _save(tmp_path / "d.npz", x, _labels(6), x_test=bad))


def test_labels_in_one_column_are_told_to_ravel_not_argmax(tmp_path):
    y = _labels(6)[:, None]
    with pytest.raises(DataFormatError, match=r"shape \(6, 1\) \(use y\.ravel\(\)\)") as err:
        load_dataset("npz", _save(tmp_path / "d.npz", _gray(), y))
    assert "one-hot" not in str(err.value)


@pytest.mark.parametrize("classes", [np.arange(2), np.array([["a", "b"]]),
                                     np.array([["a"], ["b"]])])
def test_class_names_must_be_a_list_of_strings(tmp_path, classes):
    path = _save(tmp_path / "d.npz", _gray(), _labels(6), classes=classes)
    with pytest.raises(DataFormatError, match=f"{path}: classes must be a 1-D array of names"):
        load_dataset("npz", path)


def test_repeated_class_names_are_refused(tmp_path):
    path = _save(tmp_path / "d.npz", _gray(), _labels(6, 3), classes=np.array(["a", "b", "a"]))
    with pytest.raises(DataFormatError, match="classes has repeated names"):
        load_dataset("npz", path)


def test_a_class_name_without_training_images_is_refused(tmp_path):
    """Three names but labels 0 and 1 only: class 2 has no training images."""
    path = _save(tmp_path / "d.npz", _gray(), _labels(6), classes=np.array(["a", "b", "c"]))
    for read in (lambda: load_dataset("npz", path), lambda: peek_shape("npz", path)):
        with pytest.raises(DataFormatError, match=r"class\(es\) \[2\] have no training images"):
            read()


def test_the_log_names_classes_and_says_resized_only_when_resized(tmp_path, caplog):
    names = np.array(["cat", "dog"])
    with caplog.at_level(logging.INFO, logger="diffnas"):
        load_dataset("npz", _save(tmp_path / "a.npz", _gray(), _labels(6), classes=names),
                     resolution=4)
    assert "1x4x4, 2 classes (label=name): 0=cat, 1=dog" in caplog.text
    assert "resized" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffnas"):
        load_dataset("npz", _save(tmp_path / "b.npz", _gray(), _labels(6)), resolution=6)
    assert "1x4x4 (resized to 1x6x6: data.resolution), 2 classes, labels 0..1 (no class " \
        "names stored)" in caplog.text


# --- npz: peeking without loading --------------------------------------------------------
def test_peek_counts_the_training_images_of_an_npz(tmp_path):
    path = _save(tmp_path / "d.npz", _gray(7), _labels(7), x_test=_gray(3), y_test=_labels(3))
    assert peek_count("npz", path) == 7
    assert peek_count("digits", None) is None


@pytest.mark.parametrize("y_train, y_test, match", [
    (_labels(5), _labels(3), "y_train: 5 labels for 7 images"),
    (_labels(7).astype(np.float64), _labels(3), "labels must be integers"),
    (_labels(7), _labels(4), "y_test: 4 labels for 3 images"),
    (_labels(7) - 1, _labels(3), "label -1 is negative"),
])
def test_peek_checks_the_labels_against_their_own_image_count(tmp_path, y_train, y_test, match):
    path = _save(tmp_path / "d.npz", _gray(7), y_train, x_test=_gray(3), y_test=y_test)
    for read in (lambda: peek_shape("npz", path), lambda: load_dataset("npz", path)):
        with pytest.raises(DataFormatError, match=match):
            read()
    good = _save(tmp_path / "g.npz", _gray(7), _labels(7), x_test=_gray(3), y_test=_labels(3))
    assert peek_shape("npz", good) == (1, 4, 2)


# --- folder: modes, hidden files, extensions --------------------------------------------
def _palette(transparent: bool):
    def make(split, name, i):
        im = PIL.fromarray(_rng(i + 10 * len(name + split)).integers(0, 4, (4, 4), dtype=np.uint8),
                           "P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        if transparent:
            im.info["transparency"] = 0
        return im
    return make


@pytest.mark.parametrize("transparent, channels", [(False, 3), (True, 4)])
def test_palette_images_are_rgb_or_rgba_when_transparent(tmp_path, transparent, channels):
    root = _tree(tmp_path / "f", _palette(transparent))
    assert peek_shape("folder", str(root)) == (channels, 4, 2)
    d = load_dataset("folder", str(root))
    assert d.in_channels == channels
    px = _pixels(d).round()
    # palette 0 black, 1 red, 2 green, 3 blue: each pixel has at most one channel lit
    assert set(px[:, :3].flatten().tolist()) <= {0.0, 255.0}
    assert ((px[:, :3] > 0).sum(1) <= 1).all()
    if transparent:  # index 0 transparent, the others opaque
        assert torch.equal(px[:, 3] == 0, px[:, :3].sum(1) == 0)


def test_one_bit_images_are_grayscale_black_and_white(tmp_path):
    def make(split, name, i):
        return PIL.fromarray(_rng(i + len(split + name)).integers(0, 2, (4, 4)).astype(bool))
    root = _tree(tmp_path / "f", make)
    d = load_dataset("folder", str(root))
    assert d.in_channels == 1 and peek_shape("folder", str(root))[0] == 1
    assert set(_pixels(d).round().flatten().tolist()) == {0.0, 255.0}


def test_gray_with_alpha_keeps_two_channels(tmp_path):
    root = _tree(tmp_path / "f", _noise("LA"))
    d = load_dataset("folder", str(root))
    assert d.in_channels == 2 and peek_shape("folder", str(root))[0] == 2
    with PIL.open(root / "train" / "b" / "img1.png") as im:
        want = torch.from_numpy(np.array(im)).permute(2, 0, 1).double()
    torch.testing.assert_close(_pixels(d)[3], want, atol=1e-3, rtol=0)


def test_hidden_folders_and_files_are_not_data(tmp_path):
    """Hidden class folders (.ipynb_checkpoints), hidden subfolders of a class
    (.thumbnails) and hidden files are skipped; the rest is read as without them."""
    root = _tree(tmp_path / "f", _noise())
    plain = load_dataset("folder", str(root))
    for hidden in (root / "train" / ".ipynb_checkpoints", root / "train" / "a" / ".thumbnails"):
        hidden.mkdir()
        PIL.new("L", (9, 9)).save(hidden / "x.png")
    (root / "train" / ".listing").write_text("x")
    d = load_dataset("folder", str(root))
    assert d.classes == ("a", "b") and torch.equal(d.train_x, plain.train_x)
    assert peek_count("folder", str(root)) == 4


def test_upper_case_extensions_are_images(tmp_path):
    root = _tree(tmp_path / "f", _noise(), ext=".PNG")
    assert load_dataset("folder", str(root)).train_x.shape == (4, 1, 4, 4)
    assert peek_count("folder", str(root)) == 4


# --- folder: the test images against the training ones ------------------------------------
@pytest.mark.parametrize("test_mode, test_side, match", [
    ("L", 6, r"6x6 pixels but .*img0.png is 4x4"),
    ("RGB", 4, r"3 channel\(s\) \(RGB\) but .*img0.png has 1"),
])
def test_test_images_must_match_the_training_images(tmp_path, test_mode, test_side, match):
    """Training images are 4x4 grayscale; a test set of other sizes or channels, though
    consistent within itself, is refused (it would be scored on another input)."""
    def make(split, name, i):
        if split == "train":
            return _noise()(split, name, i)
        return _noise(test_mode, test_side)(split, name, i)
    root = _tree(tmp_path / "f", make)
    with pytest.raises(DataFormatError, match=match):
        load_dataset("folder", str(root))


def test_a_different_height_alone_is_a_different_size(tmp_path):
    root = _tree(tmp_path / "f", _noise())
    tall = root / "train" / "b" / "tall.png"
    PIL.new("L", (4, 7), 30).save(tall)
    with pytest.raises(DataFormatError, match=f"{tall}: 4x7 pixels but .* is 4x4"):
        load_dataset("folder", str(root))


def test_shrinking_a_folder_image_averages_its_pixels(tmp_path):
    """A 1-pixel black and white checkerboard shrunk to half its side (bilinear, with
    antialiasing) is mid-gray everywhere, not black and white pixels picked out of it."""
    board = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)

    def make(split, name, i):
        return PIL.fromarray(board if i == 0 else 255 - board // 2)
    root = _tree(tmp_path / "f", make)
    d = load_dataset("folder", str(root), resolution=4)
    px = _pixels(d)
    assert px.shape == (4, 1, 4, 4)
    assert torch.allclose(px[0], torch.full((1, 4, 4), 127.5, dtype=torch.float64), atol=3)


def test_an_empty_test_tree_is_named(tmp_path):
    root = _tree(tmp_path / "f", _noise(), per={"train": {"a": 1, "b": 1}})
    (root / "test").mkdir()
    with pytest.raises(DataFormatError, match=f"{root / 'test'}: no class folders"):
        load_dataset("folder", str(root))


def test_a_truncated_image_is_named(tmp_path):
    root = _tree(tmp_path / "f", _noise(side=32))
    cut = root / "train" / "a" / "img1.png"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=f"{cut}: cannot read the image"):
        load_dataset("folder", str(root))


# --- folder: missing paths and peeking ------------------------------------------------
def test_a_folder_root_that_is_a_file_or_lacks_train_is_not_found(tmp_path):
    file = tmp_path / "data.zip"
    file.write_bytes(b"x")
    with pytest.raises(DatasetNotFoundError, match=f"{file} is not a directory"):
        load_dataset("folder", str(file))
    root = _tree(tmp_path / "f", _noise(), per={"test": {"a": 1, "b": 1}})
    for read in (lambda: load_dataset("folder", str(root)),
                 lambda: check_dataset_files("folder", str(root))):
        with pytest.raises(DatasetNotFoundError, match=f"{root / 'train'} does not exist"):
            read()


def test_peek_count_counts_training_images_and_checks_the_test_folders(tmp_path):
    root = _tree(tmp_path / "f", _noise(), per={"train": {"a": 3, "b": 2}, "test": {"a": 1}})
    assert peek_count("folder", str(root)) == 5
    (root / "test" / "b").mkdir()  # empty
    with pytest.raises(DataFormatError, match=f"{root / 'test' / 'b'}: empty class folder"):
        peek_count("folder", str(root))


def test_folder_images_are_recorded_in_pixel_units(tmp_path):
    root = _tree(tmp_path / "f", _noise("RGB"))
    d = load_dataset("folder", str(root))
    raw = []
    for name in ("a", "b"):
        for i in range(2):
            with PIL.open(root / "train" / name / f"img{i}.png") as im:
                raw.append(np.asarray(im, dtype=np.float64))
    raw = np.stack(raw)
    assert d.mean == pytest.approx(raw.mean((0, 1, 2)).tolist(), rel=1e-5)
    assert d.std == pytest.approx(raw.reshape(-1, 3).std(0, ddof=1).tolist(), rel=1e-4)


# --- base and registry -------------------------------------------------------------------
def _t(n: int) -> torch.Tensor:
    return torch.arange(n) % 2


def test_an_all_zero_channel_stays_finite_and_unscaled():
    """A channel that is 0 in every training image has std 0 and peak 0: it is divided by
    1, so a test pixel of 255 becomes 1.0 (not inf or NaN)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (8, 3, 4, 4), generator=g, dtype=torch.uint8)
    raw[:, 2] = 0
    test = raw[:2].clone()
    test[0, 2] = 255
    d = prepare("z", raw, _t(8), test, _t(2), 2, 255.0)
    assert torch.isfinite(d.train_x).all() and torch.isfinite(d.test_x).all()
    assert (d.train_x[:, 2] == 0).all() and (d.test_x[0, 2] == 1).all()
    assert d.std[2] == pytest.approx(255.0)


def test_a_channel_with_one_value_in_99_5_percent_of_pixels_is_normalised_by_its_std():
    """0.5% of the pixels off the common value is not "almost constant" (that needs 99.9%):
    the channel is divided by its std like any other."""
    raw = torch.full((10, 1, 10, 10), 255, dtype=torch.uint8)
    raw.view(-1)[:5] = 0  # 5 of 1000 pixels
    d = prepare("a", raw, _t(10), raw, _t(10), 2, 255.0)
    x = raw.double() / 255
    assert d.std[0] == pytest.approx(float(x.std()) * 255, rel=1e-5)


@pytest.mark.parametrize("change, match", [
    ({"train_x": torch.zeros(4, 2, 2)}, r"train_x must be images \(N, C, H, W\)"),
    ({"train_y": torch.tensor([True, False, True, False])}, "must be integer class indices"),
    ({"test_y": torch.zeros(4, 1, dtype=torch.long)}, r"test_y must hold one label per image"),
])
def test_check_image_data_refuses_what_training_would_stumble_on(change, match):
    x = torch.zeros(4, 1, 2, 2)
    parts = {"train_x": x, "train_y": _t(4), "test_x": x, "test_y": _t(4), **change}
    with pytest.raises(DataFormatError, match=match):
        check_image_data(ImageData("mine", parts["train_x"], parts["train_y"], parts["test_x"],
                                   parts["test_y"], 2))


def test_subset_of_zero_is_refused_and_of_all_keeps_the_data():
    x, y = torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5)
    with pytest.raises(ValueError, match="subset size must be positive, got 0"):
        subset(x, y, 0, seed=0)
    sx, sy = subset(x, y, 5, seed=0)
    assert torch.equal(sx, x) and torch.equal(sy, y)


def test_a_subset_exactly_the_dataset_size_is_not_warned_about(tmp_path, caplog):
    path = _save(tmp_path / "d.npz", _gray(6), _labels(6), x_test=_gray(4), y_test=_labels(4))
    with caplog.at_level(logging.WARNING):
        d = load_dataset("npz", path, train_subset=6, test_subset=4)
    assert len(d.train_x) == 6 and "asked for" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_dataset("npz", path, train_subset=7)
    assert "a train subset of 7 asked for, but the dataset has 6 train images" in caplog.text
