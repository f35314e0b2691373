"""Rules of your own image data (data.name=npz and data.name=folder, data/custom.py), of
plugins named in the config (plugins.py) and of the name registries (registry.py) that a
second mutation audit found unchecked: how a non-square npz shrinks, which channel counts
tell the layout, dtypes and label shapes refused by name, where the data came from, CMYK
images and 0-255 pixels, labels of a test tree that lacks a class, what the folder peek
answers, what a plugin entry naming a folder is, what a plugin's failure points at, and
what an interrupted import undoes. Each test builds its data in tmp_path and checks a rule
against values worked out by hand or stated in the docstrings and docs/data.md."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from test_custom_data_rules import _gray, _labels, _noise, _pixels, _rng, _save, _tree

from diffnas.config import ConfigError
from diffnas.data import load_dataset
from diffnas.data.base import DataFormatError
from diffnas.data.custom import peek_shape
from diffnas.plugins import import_plugins
from diffnas.registry import Registry, registrations_undone_on_error

PIL = pytest.importorskip("PIL.Image")


# --- npz: resizing, layouts, dtypes, labels ------------------------------------------------
def test_shrinking_a_non_square_npz_averages_each_block(tmp_path):
    """4x8 images squeezed to 2x2 shrink both axes, so each output pixel is the mean of
    its 2x4 block ("area"): a 0/200 checkerboard scaled by (i + 1) / 10 averages to
    (i + 1) * 10, which picking single pixels (0 or 200 * ...) never gives."""
    board = (np.indices((4, 8)).sum(0) % 2) * 200
    x = np.stack([(board * (i + 1) / 10).round() for i in range(6)]).astype(np.uint8)
    d = load_dataset("npz", _save(tmp_path / "s.npz", x, _labels(6)), resolution=2)
    px = _pixels(d)
    assert px.shape == (6, 1, 2, 2)
    want = torch.tensor([10.0 * (i + 1) for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(px[:, 0], want.view(6, 1, 1).expand(6, 2, 2), atol=1e-3, rtol=0)


def test_an_unknown_array_name_is_refused_by_name(tmp_path):
    """Only the four arrays, classes and layout are read; another one (meta) is named."""
    path = _save(tmp_path / "d.npz", _gray(), _labels(6), meta=np.arange(3))
    with pytest.raises(DataFormatError, match=r"unexpected array\(s\) meta; the known ones "
                       r"are x_train, y_train, x_test, y_test, classes, layout"):
        load_dataset("npz", path)


def test_two_channels_last_do_not_tell_the_layout(tmp_path):
    """Only 1, 3 or 4 on one channel axis tell the layout: (6, 5, 5, 2) has 5 on dim 1 and
    2 on dim 3, neither a channel count, so the layout is asked for; stored, it loads."""
    x = _rng().integers(0, 256, (6, 5, 5, 2), dtype=np.uint8)
    with pytest.raises(DataFormatError, match=r"neither dim 1 nor dim 3 is a channel count of "
                       r"\(1, 3, 4\)\); add layout='NHWC'"):
        load_dataset("npz", _save(tmp_path / "a.npz", x, _labels(6)))
    d = load_dataset("npz", _save(tmp_path / "b.npz", x, _labels(6), layout="NHWC"))
    assert d.train_x.shape == (6, 2, 5, 5)


def test_complex_images_are_refused(tmp_path):
    x = (_rng().random((6, 4, 4)) + 1j).astype(np.complex64)
    with pytest.raises(DataFormatError, match=r"x_train: images must be integers \(uint8 "
                       r"0-255\) or floats, got dtype complex64"):
        load_dataset("npz", _save(tmp_path / "c.npz", x, _labels(6)))


def test_uint8_images_are_read_as_0_to_255(tmp_path):
    """uint8 is 0-255: a channel that is 0 in every training image is divided by 1 in 0-1
    units (std recorded as 255 pixel units), so a test pixel of 255 there is 1.0."""
    x = _rng().integers(0, 256, (6, 3, 5, 5), dtype=np.uint8)
    x[:, 2] = 0
    test = x.copy()
    test[0, 2] = 255
    d = load_dataset("npz", _save(tmp_path / "d.npz", x, _labels(6), x_test=test))
    assert d.std[2] == pytest.approx(255.0)
    assert (d.train_x[:, 2] == 0).all()
    torch.testing.assert_close(d.test_x[0, 2], torch.ones(5, 5))


def test_two_column_one_hot_labels_are_told_to_argmax(tmp_path):
    """Two classes one-hot: shape (6, 2), more than one column, so the hint is argmax."""
    y = np.eye(2, dtype=np.int64)[_labels(6)]
    with pytest.raises(DataFormatError, match=r"shape \(6, 2\) \(one-hot\? use "
                       r"y\.argmax\(1\)\)"):
        load_dataset("npz", _save(tmp_path / "d.npz", _gray(), y))


def test_the_source_is_the_file_read_with_the_home_folder_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _save(tmp_path / "mine.npz", _gray(), _labels(6))
    d = load_dataset("npz", "~/mine.npz")
    assert d.source == str(tmp_path / "mine.npz")


# --- folder: modes, labels, peeking -------------------------------------------------------
def test_cmyk_images_are_read_as_rgb(tmp_path):
    """CMYK (print) images become 3-channel RGB: C=255 alone is cyan (0, 255, 255)."""
    def make(split, name, i):
        a = np.zeros((4, 4, 4), dtype=np.uint8)
        a[..., 0] = 255 * ((i + len(name)) % 2)  # cyan or white
        return PIL.fromarray(a, "CMYK")
    root = _tree(tmp_path / "f", make, ext=".tif")
    assert peek_shape("folder", str(root)) == (3, 4, 2)
    d = load_dataset("folder", str(root))
    assert d.in_channels == 3
    px = _pixels(d).round()
    for img in px:  # each image is cyan (0, 255, 255) or white (255, 255, 255)
        assert img[1:].eq(255).all() and img[0].unique().tolist() in ([0.0], [255.0])


def test_folder_pixels_are_read_as_0_to_255(tmp_path):
    """8-bit files are 0-255: a blue channel that is 0 in every training image is divided
    by 1 in 0-1 units (std recorded as 255), so a test pixel of blue 255 is 1.0."""
    def make(split, name, i):
        a = _rng(i + 3 * len(name)).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        a[..., 2] = 255 if split == "test" else 0
        return PIL.fromarray(a, "RGB")
    root = _tree(tmp_path / "f", make)
    d = load_dataset("folder", str(root))
    assert d.std[2] == pytest.approx(255.0)
    torch.testing.assert_close(d.test_x[:, 2], torch.ones(2, 4, 4))


def test_a_test_tree_without_a_class_labels_by_the_training_classes(tmp_path):
    """Labels are indices into the sorted training classes: a test/ holding only b/ is
    class 1 (b), not 0 (its first folder); the peek still counts 2 classes."""
    root = _tree(tmp_path / "f", _noise(), per={"train": {"a": 2, "b": 2}, "test": {"b": 2}})
    d = load_dataset("folder", str(root))
    assert d.classes == ("a", "b")
    assert d.test_y.tolist() == [1, 1] and d.train_y.tolist() == [0, 0, 1, 1]
    assert peek_shape("folder", str(root)) == (1, 4, 2)


def test_the_folder_peek_answers_the_resolution_the_images_get(tmp_path):
    """``side`` is ``resolution`` when set: non-square 6x4 images are not refused then."""
    root = _tree(tmp_path / "f", lambda s, n, i: PIL.new("L", (4, 6), 10 * i + len(n)))
    assert peek_shape("folder", str(root), resolution=5) == (1, 5, 2)
    with pytest.raises(DataFormatError, match=r"images are 6x4 \(height x width\), not square"):
        peek_shape("folder", str(root))


# --- plugins --------------------------------------------------------------------------------
def test_a_folder_named_like_a_python_file_is_not_a_plugin(tmp_path, clean_path):
    (tmp_path / "p_rule_dir.py").mkdir()
    with pytest.raises(ConfigError, match=r"p_rule_dir\.py' is not a file"):
        import_plugins([str(tmp_path / "p_rule_dir.py")])


def test_a_failure_inside_a_plugin_function_points_at_the_raising_line(tmp_path, clean_path):
    """The innermost frame of the plugin's own code: the line that raised (2), not the
    call at module level (4)."""
    p = tmp_path / "p_rule_deep.py"
    p.write_text("def setup():\n    raise RuntimeError('deep')\n\nsetup()\n")
    with pytest.raises(ConfigError, match=r"RuntimeError: deep \(at .*p_rule_deep\.py:2\)"):
        import_plugins([str(p)])


def test_a_plugin_file_among_installed_packages_is_still_its_own_code(tmp_path, clean_path,
                                                                      monkeypatch):
    """The plugin's own file counts as its code even where it lies among installed
    packages (here tmp_path, made a library folder): a package function it calls that
    raises (line 1 of the package) is placed at the plugin's call (line 2)."""
    import diffnas.plugins as plugins

    monkeypatch.setattr(plugins, "_LIBRARY", {tmp_path.resolve()})
    (tmp_path / "p_rule_pkg.py").write_text("def boom():\n    raise ValueError('pkg')\n")
    p = tmp_path / "p_rule_user.py"
    p.write_text("import p_rule_pkg\np_rule_pkg.boom()\n")
    with pytest.raises(ConfigError, match=r"ValueError: pkg \(at .*p_rule_user\.py:2\)"):
        import_plugins([str(p)])


# --- registries -----------------------------------------------------------------------------
def test_an_import_ended_by_sys_exit_is_undone_too(monkeypatch):
    """A plugin that calls sys.exit while imported (BaseException, not Exception) leaves
    nothing registered and its module is forgotten."""
    reg = Registry("p2_thing")
    with pytest.raises(SystemExit), registrations_undone_on_error():
        monkeypatch.setitem(sys.modules, "p_rule_exits", types.ModuleType("p_rule_exits"))
        reg.register("gone")(type("Gone", (), {"__module__": "p_rule_exits"}))
        raise SystemExit(0)
    assert reg.names() == [] and "p_rule_exits" not in sys.modules


def test_a_module_imported_before_the_failure_stays_imported(monkeypatch):
    """Only the newly imported modules leave ``sys.modules``: one imported before the
    failing import (a library the plugin calls to register a name) stays, while the name
    it registered meanwhile is removed."""
    reg = Registry("p2_widget")
    monkeypatch.setitem(sys.modules, "p_rule_before", types.ModuleType("p_rule_before"))
    with pytest.raises(RuntimeError), registrations_undone_on_error():
        reg.register("late")(type("Late", (), {"__module__": "p_rule_before"}))
        raise RuntimeError("the plugin fails after registering")
    assert reg.names() == [] and "p_rule_before" in sys.modules
