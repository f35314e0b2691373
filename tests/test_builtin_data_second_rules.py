"""Rules of the built-in datasets found unchecked by a second mutation audit of
``data/base.py``, ``data/registry.py``, ``data/images.py`` and ``data/graph.py``, each
replayed by hand on a tiny example: the seeded subsets (a permutation's head, taken after
normalising by the whole training set) and what the log says of them, upscaling
(bilinear, half-pixel centres), negative labels, a constant negative channel and the
"almost constant" share at its boundary, the offset log; CIFAR-10 batches written by
Python 2 (the real files), integer pixel arrays, more images than labels and every kind
of unpickling failure; edge order, self loops and the sparse adjacency of graphs, zero
feature rows, Cora's class count and validation nodes, the karate club's features and
split; the fixed digits split."""

from __future__ import annotations

import logging
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from test_builtin_data_rules import CIFAR_NAMES, N_ALL, N_TEST, K, _cora
from test_corrupt_inputs import _fake_cifar

from diffnas.data import load_dataset
from diffnas.data.base import (
    DataFormatError,
    ImageData,
    barely_varying,
    check_image_data,
    prepare,
    resize,
)
from diffnas.data.graph import load_graph, row_normalize, symmetric_edges


# --- subsets, resizing, labels, normalisation ------------------------------------------------
@pytest.mark.parametrize("seed", [0, 5])
def test_subsets_are_the_head_of_a_seeded_permutation_of_normalised_images(seed):
    """``train_subset=n`` keeps rows ``randperm(N, seed)[:n]`` of the training images as
    normalised over the whole training set (the subset is not normalised again); the test
    subset uses generator seed 1 whatever the run seed."""
    full = load_dataset("digits")
    d = load_dataset("digits", train_subset=30, test_subset=20, seed=seed)
    tr = torch.randperm(len(full.train_x), generator=torch.Generator().manual_seed(seed))[:30]
    te = torch.randperm(len(full.test_x), generator=torch.Generator().manual_seed(1))[:20]
    assert torch.equal(d.train_x, full.train_x[tr]) and torch.equal(d.train_y, full.train_y[tr])
    assert torch.equal(d.test_x, full.test_x[te]) and torch.equal(d.test_y, full.test_y[te])
    assert (d.mean, d.std) == (full.mean, full.std)


def test_a_test_subset_alone_is_logged(caplog):
    """The log line counting the images used is written when only the test split is cut."""
    caplog.set_level(logging.INFO, logger="diffnas.data")
    load_dataset("digits", test_subset=50)
    assert "digits: using 1437 of 1437 train / 50 of 360 test images" in caplog.text


def test_upscaling_is_bilinear_with_half_pixel_centres():
    """Growing 2x2 to 4x4: output pixel ``i`` samples the input at ``(i + 0.5) / 2 - 0.5``
    clamped to the image (0, 0.25, 0.75, 1) and interpolates linearly on each axis."""
    x = torch.tensor([[1.0, 3.0], [7.0, 19.0]], dtype=torch.float64).view(1, 1, 2, 2)
    pos = [min(max((i + 0.5) / 2 - 0.5, 0.0), 1.0) for i in range(4)]

    def at(r, c):
        top = x[0, 0, 0, 0] * (1 - c) + x[0, 0, 0, 1] * c
        bottom = x[0, 0, 1, 0] * (1 - c) + x[0, 0, 1, 1] * c
        return top * (1 - r) + bottom * r

    want = torch.tensor([[float(at(r, c)) for c in pos] for r in pos], dtype=torch.float64)
    torch.testing.assert_close(resize(x, 4)[0, 0], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["train", "test"])
def test_a_negative_label_is_refused_and_named(which):
    """Labels below 0 are outside 0..K-1 like labels of K or more; the message names the
    negative label (not the largest one, which is in range)."""
    x = torch.zeros(3, 1, 2, 2)
    ys = {"train": torch.tensor([0, 1, 2]), "test": torch.tensor([0, 1, 2])}
    ys[which] = torch.tensor([2, -1, 1])
    with pytest.raises(DataFormatError, match=rf"{which} label -1 is outside 0\.\.2"):
        check_image_data(ImageData("mine", x, ys["train"], x, ys["test"], 3))


@pytest.mark.parametrize("value", [-3.0, 4.0])
def test_a_constant_channel_is_divided_by_its_largest_magnitude(value):
    """A constant channel (std 0) is divided by its largest absolute value, negative
    values included: a test pixel of twice the value sits at +-1 from the training one,
    and the std reported in pixel units is that magnitude."""
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 2, 3, 3, generator=g, dtype=torch.float64)
    raw[:, 1] = value
    test = raw[:2].clone()
    test[0, 1] = 2 * value
    d = prepare("const", raw, torch.zeros(6), test, torch.zeros(2), 2, 1.0)
    assert d.std[1] == pytest.approx(abs(value))
    assert (d.train_x[:, 1] == 0).all()
    assert torch.allclose(d.test_x[0, 1], torch.full((3, 3), value / abs(value)))


@pytest.mark.parametrize("odd, flat", [(2, True), (3, False)])
def test_almost_constant_means_at_least_99_9_percent_of_pixels_hold_one_value(odd, flat):
    """2 of 2000 pixels off the common value is exactly the 99.9% share (almost constant);
    3 of 2000 is not."""
    x = torch.zeros(20, 1, 10, 10)
    x.view(-1)[:odd] = 1.0
    std = x.std(dim=(0, 2, 3))
    assert barely_varying(x, std, torch.ones(1)).tolist() == [flat]


def test_the_offset_log_names_only_channels_whose_darkest_pixel_is_not_zero(caplog):
    """Channel 0 holds 0..9 (black is 0), channel 1 holds 10..19: only channel 1 is said to
    be padded with its darkest value, in pixel units."""
    caplog.set_level(logging.INFO, logger="diffnas.data.base")
    raw = torch.arange(10, dtype=torch.float64).view(10, 1, 1, 1).repeat(1, 2, 2, 2)
    raw[:, 1] += 10
    prepare("off", raw, torch.zeros(10), raw, torch.zeros(10), 2, 1.0)
    assert re.search(r"channel\(s\) \[1\] is not 0.*\(\[10\.0\]\)", caplog.text)


# --- CIFAR-10 batches -------------------------------------------------------------------------
def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` in a protocol-2 pickle (SHORT_BINSTRING or BINSTRING)."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<I", len(b)) + b


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch as Python 2's cPickle wrote it (the released files): str keys, the
    ``uint8`` array's bytes as a Python 2 str, which Python 3 reads only as latin-1."""
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2_str(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    rows, cols = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
             + _py2_str(b"b") + b"\x87R(K\x01M" + struct.pack("<H", rows) + b"M"
             + struct.pack("<H", cols) + b"\x86" + dtype + b"\x89"
             + _py2_str(data.astype(np.uint8).tobytes()) + b"tb")
    labs = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + _py2_str(b"data") + array + _py2_str(b"labels") + labs + b"u."


def test_batches_pickled_by_python_2_load_like_the_same_batches_from_python_3(tmp_path):
    """The released CIFAR-10 batches are Python 2 pickles: their str keys and pixel bytes
    must be read as latin-1 (ASCII fails on bytes over 127, ``bytes`` gives b'data' keys)
    and give the same images and labels as a Python 3 pickle of the same arrays."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "py2").mkdir()
    ref, py2 = _fake_cifar(tmp_path / "ref"), tmp_path / "py2"
    for name in CIFAR_NAMES:
        b = pickle.loads((ref / name).read_bytes())
        (py2 / name).write_bytes(_py2_batch(b["data"], [int(v) for v in b["labels"]]))
    want = load_dataset("cifar10", root=str(tmp_path / "ref"))
    got = load_dataset("cifar10", root=str(py2))
    assert torch.equal(got.train_x, want.train_x) and torch.equal(got.train_y, want.train_y)
    assert torch.equal(got.test_x, want.test_x) and torch.equal(got.test_y, want.test_y)


def test_integer_pixel_arrays_of_bytes_load_as_their_uint8_copy(tmp_path):
    """Pixels stored as int64 in 0..255 (255 included) are bytes: the batch loads as the
    same batch stored as uint8."""
    folder = _fake_cifar(tmp_path)
    b = pickle.loads((folder / "data_batch_1").read_bytes())
    assert b["data"].max() == 255
    want = load_dataset("cifar10", root=str(tmp_path))
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": b["data"].astype(np.int64),
                                                        "labels": b["labels"]}))
    got = load_dataset("cifar10", root=str(tmp_path))
    assert torch.equal(got.train_x, want.train_x) and torch.equal(got.train_y, want.train_y)


def test_more_images_than_labels_is_refused(tmp_path):
    batch = _fake_cifar(tmp_path) / "test_batch"
    batch.write_bytes(pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataFormatError, match=f"{re.escape(str(batch))}: 3 images but 2 labels"):
        load_dataset("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("content", [
    b"\x80\x09N.",           # a pickle protocol this Python does not know: ValueError
    b"\x80\x02K\x01)R.",     # calls an int: TypeError
    b"K\x01K\x02a.",         # appends to an int: AttributeError
    b"](K\x01K\x02u.",       # sets items of a list: IndexError
], ids=["protocol", "type", "attribute", "index"])
def test_every_unpickling_failure_is_a_named_damaged_batch(tmp_path, content):
    """Unpickling a damaged file raises many kinds of error; each is a DataFormatError
    naming the batch, not a raw exception from deep inside pickle."""
    batch = _fake_cifar(tmp_path) / "data_batch_5"
    batch.write_bytes(content)
    with pytest.raises(DataFormatError,
                       match=f"{re.escape(str(batch))}: not a readable CIFAR-10 batch"):
        load_dataset("cifar10", root=str(tmp_path))


# --- digits --------------------------------------------------------------------------------------
def test_the_digits_split_is_the_head_of_randperm_seeded_zero():
    """The fixed 80/20 split is ``randperm(1797)`` of a generator seeded 0: its first 1437
    images train, the rest test, in that order (a run resumed by a later version must
    find the same images)."""
    from sklearn.datasets import load_digits

    target = torch.from_numpy(load_digits().target)
    perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
    d = load_dataset("digits")
    assert torch.equal(d.train_y, target[perm[:1437]])
    assert torch.equal(d.test_y, target[perm[1437:]])


# --- graphs --------------------------------------------------------------------------------------
def test_symmetric_edges_are_deduplicated_and_sorted_by_target_then_source():
    """Edges 0-1 (given twice) and a self loop 2-2 on 3 nodes: both directions once, each
    node's self loop once, ordered by (target, source)."""
    e = symmetric_edges(np.array([0, 0, 2]), np.array([1, 1, 2]), 3)
    pairs = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 2)]  # (source, target) by target, source
    assert list(zip(*e.tolist(), strict=True)) == pairs
    d = load_graph("karate")
    key = d.edge_index[1] * d.num_nodes + d.edge_index[0]
    assert bool((key[1:] > key[:-1]).all())


def test_the_adjacency_is_a_coalesced_symmetric_0_1_matrix_of_the_edges():
    """``adjacency()`` is coalesced (its indices and values readable), one 1 per edge,
    equal to its transpose."""
    d = load_graph("karate")
    a = d.adjacency()
    assert a.is_coalesced()
    rows, cols = a.indices()
    want = sorted(zip(*d.edge_index.tolist(), strict=True))
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    assert (a.values() == 1).all()
    dense = a.to_dense()
    assert torch.equal(dense, dense.t())


def test_a_node_without_features_keeps_a_zero_row(tmp_path):
    """Row normalisation divides by the row sum, and a zero row stays zero (not NaN): by
    hand and in Cora files where node 3 has no features."""
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(row_normalize(x), torch.tensor([[0.25, 0.75], [0, 0], [0.5, 0.5]]))
    from scipy import sparse

    n = N_ALL + N_TEST  # _cora's features of node v: [v + 1, 1, 0, 2]
    feats = np.stack([np.arange(n) + 1.0, np.ones(n), np.zeros(n), np.full(n, 2.0)], 1)
    feats[3] = 0
    _cora(tmp_path, allx=sparse.csr_matrix(feats[:N_ALL]))
    d = load_graph("cora", str(tmp_path))
    assert torch.isfinite(d.x).all() and (d.x[3] == 0).all()
    torch.testing.assert_close(d.x[4], torch.tensor([5.0, 1.0, 0.0, 2.0]) / 8)


def test_cora_s_class_count_is_the_width_of_its_one_hot_labels(tmp_path):
    """Every node in class 0 of K one-hot columns: there are still K classes (the model's
    output width), not one."""
    n_train = 100
    rows = {"y": n_train, "ally": N_ALL, "ty": N_TEST}
    _cora(tmp_path, **{k: np.eye(K)[np.zeros(r, int)] for k, r in rows.items()})
    d = load_graph("cora", str(tmp_path))
    assert d.num_classes == K and (d.y == 0).all()


def test_cora_validation_nodes_are_neither_test_nodes_nor_past_the_graph(tmp_path):
    """Files of 600 + 10 nodes with 140 training rows: nodes 140..639 would validate, 600..609
    of them test nodes and 610.. past the last node. Such files are refused by name."""
    from scipy import sparse

    n_all, n_test, n_train = 600, 10, 140
    n = n_all + n_test
    feats, onehot = np.ones((n, 2)), np.eye(K)[np.arange(n) % K]
    order = np.arange(n_all, n)
    for name, obj in {"x": sparse.csr_matrix(feats[:n_train]), "y": onehot[:n_train],
                      "allx": sparse.csr_matrix(feats[:n_all]), "ally": onehot[:n_all],
                      "tx": sparse.csr_matrix(feats[order]), "ty": onehot[order],
                      "graph": {v: [(v + 1) % n] for v in range(n)}}.items():
        (tmp_path / f"ind.cora.{name}").write_bytes(pickle.dumps(obj))
    (tmp_path / "ind.cora.test.index").write_text("\n".join(map(str, order)) + "\n")
    with pytest.raises(DataFormatError, match=r"ind\.cora\.x has 140 training rows and "
                       r".*ind\.cora\.allx 600: the 500 validation nodes .* must end "
                       r"before the test nodes \(600\.\.609\)"):
        load_graph("cora", str(tmp_path))


def test_karate_features_are_one_hot_and_the_split_is_sorted_and_complete():
    """Node ``i``'s feature vector is the ``i``-th unit vector; train, val and test ids are
    ascending, disjoint, 8 / 8 / 18 nodes covering all 34."""
    d = load_graph("karate")
    assert torch.equal(d.x, torch.eye(34))
    parts = [d.train_idx.tolist(), d.val_idx.tolist(), d.test_idx.tolist()]
    assert [len(p) for p in parts] == [8, 8, 18]
    assert all(p == sorted(p) for p in parts)
    assert sorted(sum(parts, [])) == list(range(34))
