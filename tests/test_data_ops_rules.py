"""Rules of the data pipeline and the DARTS ops, proved on tiny hand-made inputs: the
crop, flip and cutout, the loaders' seeding and batching, the search split, subsets,
resizing, dataset layouts; the ops' receptive fields, parameter counts, ReLU-first order,
BatchNorm state, and the memory savers' switch."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_graph_space import CORA, needs_cora
from torch import nn

from diffnas.data import Augment, BatchLoader, load_dataset, split_train_val
from diffnas.data.base import resize, subset
from diffnas.data.graph import load_graph
from diffnas.data.text import bptt_windows
from diffnas.ops import create_op, twice_differentiable
from diffnas.ops.conv import DilConv
from diffnas.ops.savers import memory_savers_allowed
from diffnas.supernet.mixed import search_op


# --- augmentation ------------------------------------------------------------------------
def _window_offsets(out: torch.Tensor, padded: torch.Tensor, side: int) -> list[tuple]:
    """Per image, the (dy, dx) of every side x side window of ``padded`` equal to it."""
    shifts = range(padded.shape[-1] - side + 1)
    return [[(dy, dx) for dy in shifts for dx in shifts
             if torch.equal(o, p[..., dy:dy + side, dx:dx + side])]
            for o, p in zip(out, padded, strict=True)]


def test_crop_takes_every_shift_in_both_directions_independently():
    """Each crop is a window of the zero-padded image, and over many images every one of
    the (2p+1)^2 offsets occurs (both extremes, row and column drawn independently)."""
    p, side = 1, 4
    x = (torch.arange(side * side).float() + 1).view(1, 1, side, side).repeat(200, 1, 1, 1)
    out = Augment(crop_padding=p)(x, torch.Generator().manual_seed(0))
    found = _window_offsets(out, nn.functional.pad(x, (p, p, p, p)), side)
    assert all(len(f) == 1 for f in found)  # distinct positive pixels: one window each
    assert {f[0] for f in found} == {(dy, dx) for dy in range(2 * p + 1)
                                     for dx in range(2 * p + 1)}


def test_crop_fill_paints_the_border_and_nothing_inside():
    """With a fill colour each crop is a window of the image padded with that colour:
    every image pixel the window shows keeps its value."""
    p, side, fill = 2, 4, -5.0
    x = (torch.arange(side * side).float() + 1).view(1, 1, side, side).repeat(32, 1, 1, 1)
    out = Augment(crop_padding=p, fill=(fill,))(x, torch.Generator().manual_seed(0))
    padded = nn.functional.pad(x, (p, p, p, p), value=fill)
    assert all(len(f) == 1 for f in _window_offsets(out, padded, side))


def test_flip_mirrors_left_right_about_half_the_images():
    """Each image comes back as itself or its left-right mirror, with probability 1/2:
    among 64 images both occur, each well away from all or none."""
    x = torch.arange(64 * 2 * 5 * 5).float().view(64, 2, 5, 5)
    out = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    assert all(a != b for a, b in zip(same, mirrored, strict=True))
    assert 16 <= sum(mirrored) <= 48


def test_cutout_zeroes_one_centred_square_of_the_stated_side_in_every_channel():
    """Away from the borders the zeroed pixels form one L x L square, the same in every
    channel; a square of side 2H centred on any pixel of an H x H image covers it all."""
    side, L = 16, 3
    out = Augment(cutout=L)(torch.ones(64, 3, side, side), torch.Generator().manual_seed(0))
    interior = 0
    for o in out:
        zero = o == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
        rows, cols = zero[0].nonzero().unbind(1)
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert int(zero[0].sum()) == h * w and h <= L and w <= L  # a filled rectangle
        if rows.min() > 0 and cols.min() > 0 and rows.max() < side - 1 and cols.max() < side - 1:
            assert (h, w) == (L, L)
            interior += 1
    assert interior > 0
    whole = Augment(cutout=2 * 6)(torch.ones(32, 1, 6, 6), torch.Generator().manual_seed(1))
    assert whole.abs().sum() == 0


def test_the_loader_applies_a_cutout_only_augmentation_reproducibly():
    """A loader given only a cutout applies it (each image loses pixels), and an epoch
    replayed gives the same augmented batches."""
    x, y = torch.ones(8, 1, 6, 6), torch.arange(8)
    loader = BatchLoader(x, y, 4, augment=Augment(cutout=2), seed=3)
    first = [xb.clone() for xb, _ in loader]
    assert all(((xb == 0).flatten(1).sum(1) > 0).all() for xb in first)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first, loader, strict=True))


# --- loaders -----------------------------------------------------------------------------
def test_loader_order_follows_the_seed_and_shuffle_false_keeps_the_order():
    """Two loaders of one seed agree, another seed gives another order, and
    ``shuffle=False`` yields the samples in their stored order."""
    x, y = torch.zeros(32, 1, 1, 1), torch.arange(32)

    def order(**kw):
        return torch.cat([yb for _, yb in BatchLoader(x, y, 8, **kw)]).tolist()

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(shuffle=False, seed=5) == list(range(32))


def test_loader_keeps_or_drops_the_last_partial_batch():
    """10 samples in batches of 4: three batches (4, 4, 2) holding every sample, or with
    ``drop_last`` two full ones."""
    x, y = torch.zeros(10, 1, 1, 1), torch.arange(10)
    kept = BatchLoader(x, y, 4, shuffle=False)
    assert len(kept) == 3 and [len(yb) for _, yb in kept] == [4, 4, 2]
    assert torch.cat([yb for _, yb in kept]).tolist() == list(range(10))
    dropped = BatchLoader(x, y, 4, shuffle=False, drop_last=True)
    assert len(dropped) == 2 and [len(yb) for _, yb in dropped] == [4, 4]


# --- search split and subsets ---------------------------------------------------------------
def test_search_split_gives_its_share_to_training_seeded_with_labels_kept():
    """``fraction`` of the images (the nearest whole number) go to the first (weight)
    part; the parts are disjoint and complete, images keep their labels, and the split
    follows the seed."""
    x, y = torch.arange(100).float().view(100, 1, 1, 1), torch.arange(100)
    (tx, ty), (vx, vy) = split_train_val(x, y, 0.8, seed=0)
    assert (len(ty), len(vy)) == (80, 20)
    assert sorted(ty.tolist() + vy.tolist()) == list(range(100))
    assert torch.equal(tx.flatten().long(), ty) and torch.equal(vx.flatten().long(), vy)
    assert len(split_train_val(x, y, 0.29, seed=0)[0][1]) == 29  # 0.29 * 100 = 29
    again = split_train_val(x, y, 0.8, seed=0)[0][1]
    other = split_train_val(x, y, 0.8, seed=1)[0][1]
    assert torch.equal(again, ty) and not torch.equal(other, ty)


def test_subset_keeps_each_image_with_its_label():
    """A seeded subset of n samples: n distinct samples, each with its own label."""
    x, y = torch.arange(50).float().view(50, 1, 1, 1), torch.arange(50)
    sx, sy = subset(x, y, 7, seed=4)
    assert len(sy) == 7 == len(set(sy.tolist()))
    assert torch.equal(sx.flatten().long(), sy)


def test_shrinking_resize_averages_each_block():
    """Area interpolation: shrinking 8x8 to 2x2 gives the mean of each 4x4 block."""
    x = torch.arange(64).float().view(1, 1, 8, 8) ** 2  # not linear: bilinear would differ
    blocks = x.view(2, 4, 2, 4).mean(dim=(1, 3)).view(1, 1, 2, 2)
    torch.testing.assert_close(resize(x, 2), blocks)


# --- datasets ------------------------------------------------------------------------------
def test_digits_train_and_test_hold_each_image_once():
    """The fixed 80/20 split of scikit-learn's 1797 digits: int(0.8 * 1797) = 1437 for
    training, the other 360 for testing, every image (pixel values 0..16) exactly once."""
    from sklearn.datasets import load_digits

    d = load_dataset("digits")
    assert (len(d.train_x), len(d.test_x)) == (1437, 360)
    raw = torch.cat([d.train_x, d.test_x]) * d.std[0] + d.mean[0]
    pixels = raw.round().flatten(1).long()
    want = torch.from_numpy(load_digits().images).flatten(1).long()
    (got, got_n), (ref, ref_n) = (torch.unique(t, dim=0, return_counts=True)
                                  for t in (pixels, want))
    assert torch.equal(got, ref) and torch.equal(got_n, ref_n)


def _cifar(root: Path, n: int = 3) -> None:
    """Five training batches (labels 0..8) and a test batch (labels 9) whose red planes
    hold 200..255, green 0..55 and blue 100..155, in CIFAR's row layout RRR..GGG..BBB."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        planes = [rng.integers(lo, lo + 56, (n, 1024)) for lo in (200, 0, 100)]
        labels = [9] * n if name == "test_batch" else list(rng.integers(0, 9, n))
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.concatenate(planes, 1).astype(np.uint8),
                         "labels": labels}, f)


def test_cifar10_rows_are_channel_planes_and_the_test_batch_stays_out(tmp_path):
    """Each CIFAR row is the red, green then blue 32x32 plane: the per-channel means (in
    pixel units) fall in each plane's range; training holds the five data batches only."""
    _cifar(tmp_path)
    d = load_dataset("cifar10", root=str(tmp_path))
    assert 200 <= d.mean[0] <= 255 and 0 <= d.mean[1] <= 55 and 100 <= d.mean[2] <= 155
    assert len(d.train_y) == 15 and int(d.train_y.max()) <= 8
    assert d.test_y.tolist() == [9, 9, 9]


def test_a_label_equal_to_num_classes_is_refused():
    """Labels must be 0..K-1: K itself is one past the last class."""
    from diffnas.data.base import DataFormatError, ImageData, check_image_data

    x = torch.zeros(3, 1, 2, 2)

    def data(labels):
        return ImageData("mine", x, torch.tensor(labels), x, torch.tensor([0, 1, 2]), 3)

    check_image_data(data([0, 1, 2]))
    with pytest.raises(DataFormatError, match=r"train label 3 is outside 0\.\.2"):
        check_image_data(data([0, 1, 3]))


def test_folder_test_labels_follow_the_training_classes(tmp_path):
    """A test tree lacking a class keeps the training labels: test/bee is label 1 when
    training has ant, bee, cat, although it is the only test folder."""
    from PIL import Image

    for split, names in (("train", ("ant", "bee", "cat")), ("test", ("bee",))):
        for label, name in enumerate(names):
            (tmp_path / split / name).mkdir(parents=True)
            pixels = np.full((4, 4), 60 * label + 10 * len(split), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / split / name / "a.png")
    d = load_dataset("folder", str(tmp_path))
    assert d.classes == ("ant", "bee", "cat") and d.test_y.tolist() == [1]


def test_npz_non_square_images_shrink_by_block_averages(tmp_path):
    """8 x 16 images stretched to 4 x 4: each pixel is the mean of a 2 x 4 block
    (area interpolation), then normalised by the training mean and std."""
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (6, 8, 16)).astype(np.uint8)
    y = np.arange(6) % 2
    np.savez(tmp_path / "r.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    d = load_dataset("npz", str(tmp_path / "r.npz"), resolution=4)
    blocks = torch.from_numpy(x).float().div(255).view(6, 4, 2, 4, 4).mean(dim=(2, 4))
    want = (blocks - blocks.mean()) / blocks.std()
    torch.testing.assert_close(d.train_x[:, 0], want, rtol=1e-4, atol=1e-4)


# --- text and graphs --------------------------------------------------------------------
def test_bptt_windows_keep_the_full_length_about_95_percent_of_the_time():
    """With probability 0.95 a window's length is drawn around bptt (N(bptt, 5)), else
    around bptt / 2: at bptt 70 the two are 7 standard deviations apart, so about 95% of
    the windows are longer than 3/4 bptt."""
    wins = list(bptt_windows(40_000, 70, torch.Generator().manual_seed(0)))
    long = sum(L > 52 for _, L in wins[:-1]) / len(wins[:-1])
    assert 0.9 <= long <= 0.99


def test_karate_split_takes_the_first_four_then_four_nodes_of_each_club():
    """Per club the 4 lowest node ids train, the next 4 validate, the rest (18) test;
    every node has a self loop."""
    d = load_graph("karate")
    for c in (0, 1):
        nodes = (d.y == c).nonzero().flatten().tolist()
        assert [n for n in d.train_idx.tolist() if d.y[n] == c] == nodes[:4]
        assert [n for n in d.val_idx.tolist() if d.y[n] == c] == nodes[4:8]
        assert [n for n in d.test_idx.tolist() if d.y[n] == c] == nodes[8:]
    src, dst = d.edge_index
    assert sorted(src[src == dst].tolist()) == list(range(d.num_nodes))


@needs_cora
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # old scipy paths in the pickles
def test_cora_test_rows_sit_at_the_node_ids_test_index_names():
    """``tx``/``ty`` rows come in ``test.index`` order: row j is node test_index[j]."""
    d = load_graph("cora", str(CORA))
    order = [int(s) for s in (CORA / "ind.cora.test.index").read_text().split()]
    with open(CORA / "ind.cora.tx", "rb") as f:
        tx = torch.from_numpy(pickle.load(f, encoding="latin1").toarray()).float()
    with open(CORA / "ind.cora.ty", "rb") as f:
        ty = torch.from_numpy(pickle.load(f, encoding="latin1")).argmax(1)
    sums = tx.sum(1, keepdim=True)
    rows = tx / torch.where(sums == 0, torch.ones_like(sums), sums)
    torch.testing.assert_close(d.x[order], rows)
    assert torch.equal(d.y[order], ty)


# --- ops -----------------------------------------------------------------------------------
def _receptive_field(op: nn.Module, C: int, side: int, out: tuple[int, int],
                     channel: int = 0) -> set[tuple[int, int]]:
    """Input pixels that output pixel ``out`` of ``channel`` depends on: every conv
    weight 1, BN in eval mode (a positive scale), an all-ones input, so every path
    carries a positive gradient and none cancels."""
    op.eval()
    with torch.no_grad():
        for m in op.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
    x = torch.ones(1, C, side, side, requires_grad=True)
    op(x)[0, channel, out[0], out[1]].backward()
    return {tuple(p) for p in x.grad.sum(1)[0].nonzero().tolist()}


def _square(centre: int, offsets) -> set[tuple[int, int]]:
    return {(centre + a, centre + b) for a in offsets for b in offsets}


# (name, stride, input-pixel offsets from 2*o (stride 2) or o (stride 1) on each axis)
FIELDS = [
    ("sep_conv_3x3", 1, range(-2, 3)),  # two 3x3 convs reach 1 + 1
    ("sep_conv_5x5", 1, range(-4, 5)),
    ("sep_conv_7x7", 1, range(-6, 7)),
    ("dil_conv_3x3", 1, range(-2, 3, 2)),  # taps 2 apart
    ("dil_conv_5x5", 1, range(-4, 5, 2)),
    ("nor_conv_3x3", 1, range(-1, 2)),
    ("nor_conv_1x1", 1, range(0, 1)),
    ("conv_7x1_1x7", 1, range(-3, 4)),
    ("sep_conv_3x3", 2, range(-3, 4)),  # 3x3 at stride 2 (2m +- 1), then m = o +- 1
    ("sep_conv_5x5", 2, range(-6, 7)),
    ("sep_conv_7x7", 2, range(-9, 10)),
    ("dil_conv_3x3", 2, range(-2, 3, 2)),
    ("dil_conv_5x5", 2, range(-4, 5, 2)),
    ("nor_conv_3x3", 2, range(-1, 2)),
    ("conv_7x1_1x7", 2, range(-3, 4)),
]


@pytest.mark.parametrize("name, stride, offsets", FIELDS)
def test_conv_op_receptive_field(name, stride, offsets):
    """The input pixels an output pixel reads are exactly the taps of the op's kernels
    (sep_conv: its k x k depthwise conv twice; dil_conv: dilation 2)."""
    centre = 12  # output pixel centre // stride reads around input pixel centre
    out = (centre // stride, centre // stride)
    got = _receptive_field(create_op(name, 4, stride, affine=True), 4, 24, out)
    assert got == _square(centre, offsets)


def test_factorized_reduce_reads_even_pixels_in_one_half_odd_in_the_other():
    """skip_connect at stride 2: the first C/2 channels at (o, o) read input (2o, 2o)
    only, the other C/2 the pixel one down and right, (2o + 1, 2o + 1)."""
    for channel, want in ((0, {(6, 6)}), (1, {(6, 6)}), (2, {(7, 7)}), (3, {(7, 7)})):
        op = create_op("skip_connect", 4, 2, affine=True)
        assert _receptive_field(op, 4, 8, (3, 3), channel) == want


def _param_count(name: str, C: int, stride: int, affine: bool) -> int:
    """Parameters of op ``name`` by hand: depthwise k*k*C, pointwise C*C, a full k x k
    conv C*C*k*k, two 2*C per affine BN; pools and ``none`` have none."""
    bn = 2 * C if affine else 0
    k = {"3x3": 3, "5x5": 5, "7x7": 7, "1x1": 1}.get(name[-3:])
    if name.startswith("sep_conv"):
        return 2 * (C * k * k + C * C + bn)
    if name.startswith("dil_conv"):
        return C * k * k + C * C + bn
    if name.startswith("nor_conv"):
        return C * C * k * k + bn
    if name == "conv_7x1_1x7":
        return 2 * 7 * C * C + bn
    if name == "skip_connect":
        return 0 if stride == 1 else 2 * C * (C // 2) + bn
    return 0


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_op_parameter_counts_by_hand(stride, affine):
    """Each built-in op holds exactly the weights its definition names (no bias, no
    affine BN at search time)."""
    names = ["none", "skip_connect", "max_pool_3x3", "avg_pool_3x3", "sep_conv_3x3",
             "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
             "nor_conv_1x1", "nor_conv_3x3"]
    C = 6
    for name in names:
        op = create_op(name, C, stride, affine)
        got = sum(p.numel() for p in op.parameters())
        assert got == _param_count(name, C, stride, affine), name


def test_search_ops_carry_no_state_and_retrain_ops_track_statistics():
    """affine=False (search): every BN has no weight and no running statistics, and the
    search pools' BN adds no parameters; affine=True: every BN has both."""
    for name in ("sep_conv_3x3", "dil_conv_3x3", "skip_connect", "nor_conv_3x3"):
        for affine in (False, True):
            bns = [m for m in create_op(name, 4, 2, affine).modules()
                   if isinstance(m, nn.BatchNorm2d)]
            assert bns and all(b.affine == affine for b in bns), name
            assert all((b.running_mean is not None) == affine for b in bns), name
    for pool in ("max_pool_3x3", "avg_pool_3x3"):
        op = search_op(pool, 4, 1)
        assert not list(op.parameters()) and not list(op.buffers())
        assert any(isinstance(m, nn.BatchNorm2d) for m in op.modules())


@pytest.mark.parametrize("name", ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                  "dil_conv_5x5", "conv_7x1_1x7", "nor_conv_1x1",
                                  "nor_conv_3x3", "skip_connect"])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_ops_apply_relu_first(name, stride):
    """ReLU -> conv -> BN: the op cannot tell an input from its ReLU, op(x) = op(relu(x))
    (identity at skip_connect stride 1 excepted)."""
    if name == "skip_connect" and stride == 1:
        return
    torch.manual_seed(0)
    op = create_op(name, 4, stride, affine=False)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(op(x), op(x.clamp(min=0)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 2, 2, 2), (5, 2, 4, 2), (3, 1, 2, 2), (3, 2, 1, 1), (3, 2, 2, 1)])
def test_dil_conv_forward_is_its_module_chain(kernel, stride, padding, dilation):
    """Whatever fast path DilConv takes, it computes ReLU -> depthwise -> 1x1 -> BN as
    declared, for any stride, padding and dilation."""
    torch.manual_seed(0)
    op = DilConv(3, 4, kernel, stride, padding, dilation, affine=False)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    want = op[3](op[2](op[1](op[0](x))))
    torch.testing.assert_close(op(x), want)


def test_none_is_zero_at_stride_two():
    """``none`` at stride 2: zeros of the halved (rounded up) shape."""
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(create_op("none", 4, 2)(x), torch.zeros(2, 4, 5, 5))


def test_pools_take_the_max_and_the_mean_of_the_3x3_neighbourhood():
    """max_pool_3x3 spreads a single spike over its 3x3 neighbourhood; avg_pool_3x3 of a
    linear ramp is the centre pixel wherever the window is whole."""
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1.0
    want = torch.zeros(9, 9)
    want[3:6, 3:6] = 1.0
    assert torch.equal(create_op("max_pool_3x3", 1, 1)(spike)[0, 0], want)
    ramp = (torch.arange(9).view(9, 1) * 9 + torch.arange(9)).float().view(1, 1, 9, 9)
    for stride in (1, 2):
        out = create_op("avg_pool_3x3", 1, stride)(ramp)[0, 0]
        inner = range(1, out.shape[-1] - 1)
        for i in inner:
            for j in inner:
                assert out[i, j] == pytest.approx(ramp[0, 0, i * stride, j * stride].item())


def test_twice_differentiable_turns_the_savers_off_only_inside():
    """The memory savers are off inside the context (nested too) and back on after."""
    assert memory_savers_allowed()
    with twice_differentiable():
        assert not memory_savers_allowed()
        with twice_differentiable():
            assert not memory_savers_allowed()
        assert not memory_savers_allowed()
    assert memory_savers_allowed()
