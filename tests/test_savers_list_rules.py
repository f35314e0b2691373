"""Rules of the memory-saving autograd ops (``ops/savers.py``), the ``diffnas list``
command and the ``model.json`` description an export writes, that a mutation audit could
break: the hand-written forward and backward passes of ``BNReLUConv`` and ``DwPwConv``
against plain torch autograd in float64 over strides, dilations, kernel sizes, odd and even
sides and both layouts (the flipped-kernel input gradient, the polyphase weight gradient
and the pointwise matmul each taken where their conditions hold, and refused where they do
not), the compact max-pool's fallbacks and narrow index types, the layout helpers; each
registry ``list`` prints, a plugin engine's line and data sets; and the resize / test-image
wording, input shape and normalisation of ``model.json``, each replayed by hand."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from diffnas.ops import twice_differentiable
from diffnas.ops.savers import (
    BNReLUConv,
    DwPwConv,
    _index_dtype,
    _polyphase_factor,
    dense_grad,
    is_channels_last,
    max_pool_compact,
    memory_savers_allowed,
    stem_channels_last,
)

CL, NCHW = torch.channels_last, torch.contiguous_format


# --- helpers ---------------------------------------------------------------------------
def _rand(*shape, gen, layout=NCHW, grad=True):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    t = t.contiguous(memory_format=layout) if t.dim() == 4 else t
    return t.requires_grad_(grad)


def _same_grads(out, want, inputs, gen):
    """Forward outputs equal, and the gradients of a random output gradient too."""
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, gout)
    ref = torch.autograd.grad(want, inputs, gout)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _bn_relu(b, eps):
    return torch.relu(F.batch_norm(b, None, None, None, None, True, 0.0, eps))


# --- BNReLUConv ------------------------------------------------------------------------
@pytest.mark.parametrize("pointwise", [False, True])
@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("side", [7, 8])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_bn_relu_conv_is_the_plain_composition(stride, dilation, side, kernel, layout,
                                               pointwise):
    """Forward and every gradient (input, depthwise and 1x1 weights) equal plain
    autograd's, with an eps other than the default (the forward BN must use the one
    given)."""
    gen = torch.Generator().manual_seed(side * 7 + kernel)
    eps, pad = 0.25, dilation * (kernel - 1) // 2
    b = _rand(2, 3, side, side, gen=gen, layout=layout)
    w = _rand(3, 1, kernel, kernel, gen=gen)
    w_pw = _rand(4, 3, 1, 1, gen=gen) if pointwise else None
    conf = ((stride, stride), (pad, pad), (dilation, dilation), 3)
    out = BNReLUConv.apply(b, w, eps, *conf, w_pw)
    want = F.conv2d(_bn_relu(b, eps), w, None, *conf)
    if pointwise:
        want = F.conv2d(want, w_pw)
    _same_grads(out, want, [b, w] + ([w_pw] if pointwise else []), gen)


def test_bn_relu_conv_gives_a_weight_gradient_alone():
    """The BN input needing no gradient, the weights' gradients are still those of plain
    autograd (the input gradient is skipped, not the 1x1 layer's output gradient)."""
    gen = torch.Generator().manual_seed(1)
    b = _rand(2, 3, 8, 8, gen=gen, grad=False)
    w, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    out = BNReLUConv.apply(b, w, 1e-5, (1, 1), (1, 1), (1, 1), 3, w_pw)
    want = F.conv2d(F.conv2d(_bn_relu(b, 1e-5), w, None, 1, 1, 1, 3), w_pw)
    _same_grads(out, want, [w, w_pw], gen)


# --- DwPwConv and the paths of its backward ---------------------------------------------
def _dw_pw(x, w_dw, w_pw, stride, padding, dilation, groups, cl_out):
    return DwPwConv.apply(x, w_dw, w_pw, stride, padding, dilation, groups, cl_out)


def _dw_pw_plain(x, w_dw, w_pw, stride, padding, dilation, groups):
    return F.conv2d(F.conv2d(x, w_dw, None, stride, padding, dilation, groups), w_pw)


@pytest.mark.parametrize("cl_out", [False, True])
@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("side", [7, 8, 12])
@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_dw_pw_conv_is_the_plain_composition(stride, dilation, side, kernel, layout, cl_out):
    """Forward and gradients equal plain autograd's on every path (flipped-kernel input
    gradient, phases, the NCHW weight gradient of a kernel wider than the image, the 1x1
    as a matmul), and with ``channels_last_out`` the output is channels-last."""
    gen = torch.Generator().manual_seed(side + kernel)
    pad = dilation * (kernel - 1) // 2
    x = _rand(2, 3, side, side, gen=gen, layout=layout)
    w_dw, w_pw = _rand(3, 1, kernel, kernel, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    conf = ((stride, stride), (pad, pad), (dilation, dilation), 3)
    out = _dw_pw(x, w_dw, w_pw, *conf, cl_out)
    if cl_out or layout == CL:
        assert is_channels_last(out)
    else:
        assert out.is_contiguous()
    _same_grads(out, _dw_pw_plain(x, w_dw, w_pw, *conf), [x, w_dw, w_pw], gen)


@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("groups,w_shape", [
    (3, (6, 1, 3, 3)),  # depthwise with a channel multiplier of 2
    (1, (3, 3, 3, 3)),  # a full conv, square
    (1, (5, 3, 3, 3)),  # a full conv, widening
])
def test_dw_pw_conv_takes_any_grouped_first_conv(groups, w_shape, layout):
    """The flipped-kernel input gradient holds for a plain depthwise conv only; other
    grouped convs give autograd's gradients too."""
    gen = torch.Generator().manual_seed(2)
    x = _rand(2, 3, 8, 8, gen=gen, layout=layout)
    w_dw, w_pw = _rand(*w_shape, gen=gen), _rand(4, w_shape[0], 1, 1, gen=gen)
    conf = ((1, 1), (1, 1), (1, 1), groups)
    out = _dw_pw(x, w_dw, w_pw, *conf, False)
    _same_grads(out, _dw_pw_plain(x, w_dw, w_pw, *conf), [x, w_dw, w_pw], gen)


@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("kernel,padding,dilation", [
    (3, 3, 1),  # padding wider than the kernel: no flipped-kernel input gradient
    (3, 4, 1),
    (4, 3, 2),  # an even kernel at dilation 2 with padding d*(k-1)/2 rounded down
    (3, (2, 2), (2, 3)),  # unequal dilations: no phases
])
def test_dw_pw_conv_off_the_fast_paths(kernel, padding, dilation, layout):
    """Convs that fit no fast path's conditions (negative flipped padding, an even kernel,
    dilations that differ per axis) still give autograd's gradients, and the phase path
    refuses them."""
    gen = torch.Generator().manual_seed(3)
    pad = padding if isinstance(padding, tuple) else (padding, padding)
    dil = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    x = _rand(2, 3, 16, 16, gen=gen, layout=layout)
    w_dw, w_pw = _rand(3, 1, kernel, kernel, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    conf = ((1, 1), pad, dil, 3)
    out = _dw_pw(x, w_dw, w_pw, *conf, False)
    _same_grads(out, _dw_pw_plain(x, w_dw, w_pw, *conf), [x, w_dw, w_pw], gen)
    if kernel % 2 == 0 or dil[0] != dil[1]:
        assert _polyphase_factor(w_dw, x.contiguous(memory_format=CL), (1, 1), pad, dil,
                                 3) == 0


@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("dilation", [1, 2])
def test_dw_pw_conv_gives_the_depthwise_weight_gradient_alone(dilation, layout):
    """An input that needs no gradient: the depthwise weight's still reaches it through
    the 1x1 layer's backward."""
    gen = torch.Generator().manual_seed(4)
    x = _rand(2, 3, 8, 8, gen=gen, layout=layout, grad=False)
    w_dw, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    conf = ((1, 1), (dilation, dilation), (dilation, dilation), 3)
    out = _dw_pw(x, w_dw, w_pw, *conf, False)
    _same_grads(out, _dw_pw_plain(x, w_dw, w_pw, *conf), [w_dw], gen)


def test_phase_path_wants_a_depthwise_kernel_and_equal_even_phases():
    """Two cases the existing refusals leave out: dilations that differ per axis and an
    even kernel (its "same" padding is not symmetric)."""
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=CL)
    w3, w4 = torch.randn(3, 1, 3, 3), torch.randn(3, 1, 4, 4)
    assert _polyphase_factor(w3, x, (1, 1), (2, 2), (2, 2), 3) == 2
    assert _polyphase_factor(w3, x, (1, 1), (2, 2), (2, 3), 3) == 0
    assert _polyphase_factor(w4, x, (1, 1), (3, 3), (2, 2), 3) == 0


# --- the switches and layout helpers ------------------------------------------------------
def test_memory_savers_are_off_without_autograd():
    """No graph is recorded under no_grad: nothing to save memory on."""
    assert memory_savers_allowed()
    with torch.no_grad():
        assert not memory_savers_allowed()
    with torch.enable_grad(), twice_differentiable():
        assert not memory_savers_allowed()


def test_dense_grad_lays_the_gradient_out_as_asked():
    """An explicit ``memory_format`` wins over the tensor's own layout; no hook is added
    where no gradient will flow (no_grad, not 4-d)."""
    for fmt, want_cl in ((NCHW, False), (CL, True), (None, True)):
        x = torch.randn(2, 4, 5, 5).contiguous(memory_format=CL).requires_grad_()
        t = dense_grad(x * 2, fmt)
        seen = []
        t.register_hook(lambda g, seen=seen: seen.append(g))
        torch.cat([t, t * 3], dim=1).sum().backward()
        # the hook registered after dense_grad's sees its result: dense in the asked layout
        (g,) = seen
        assert g.is_contiguous(memory_format=CL if want_cl else NCHW)
        torch.testing.assert_close(x.grad, torch.full_like(x, 8.0))
    leaf = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.no_grad():
        assert not dense_grad(leaf)._backward_hooks
    assert not dense_grad(torch.randn(4, 5, 5, requires_grad=True))._backward_hooks


def test_is_channels_last_means_dense_nhwc_and_not_also_nchw():
    assert is_channels_last(torch.randn(2, 3, 4, 4).contiguous(memory_format=CL))
    assert not is_channels_last(torch.randn(2, 3, 4, 4))
    one = torch.randn(2, 1, 4, 4)  # NCHW- and channels-last-contiguous at once
    assert one.is_contiguous(memory_format=CL) and not is_channels_last(one)
    assert not is_channels_last(torch.randn(3, 4, 4))  # not 4-d: no layout question


@pytest.mark.parametrize("in_channels", [1, 3])
def test_stem_runs_on_and_answers_in_channels_last(in_channels):
    """The stem sees a channels-last input and its output is channels-last, also where the
    conv answers NCHW (a 1-channel image)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, 4, 3, padding=1)
    seen = []

    def stem(x):
        seen.append(x.is_contiguous(memory_format=CL))
        return conv(x)

    x = torch.randn(2, in_channels, 6, 6)
    out = stem_channels_last(stem, x)
    assert seen == [True] and is_channels_last(out)
    torch.testing.assert_close(out, conv(x))
    assert stem_channels_last(lambda t: t.sum(dim=(2, 3)), x).dim() == 2  # 2-d passes through


# --- compact max-pool --------------------------------------------------------------------
@pytest.mark.parametrize("layout", [NCHW, CL])
@pytest.mark.parametrize("pool", [
    torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
    torch.nn.MaxPool2d(3, stride=1, padding=1, dilation=2),
    torch.nn.MaxPool2d((1, 3), stride=(1, 2), padding=(0, 1)),
], ids=["ceil_mode", "dilated", "tuple_kernel"])
def test_compact_max_pool_is_the_pool_on_every_setting(pool, layout):
    """Same output and gradient as the pool (ties included); the gradient in the
    input's layout, as the pool's is."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (2, 3, 8, 8), generator=gen).double()
    x = x.contiguous(memory_format=layout).requires_grad_()
    out, want = max_pool_compact(pool, x), pool(x)
    assert torch.equal(out, want)
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, x, gout)
    (ref,) = torch.autograd.grad(want, x, gout)
    assert torch.equal(got, ref)
    assert got.stride() == ref.stride()


def test_compact_max_pool_passes_other_pools_through():
    x = torch.randn(2, 3, 8, 8)
    pool = torch.nn.MaxPool2d(2, return_indices=True)
    out = max_pool_compact(pool, x)
    assert isinstance(out, tuple) and all(torch.equal(a, b) for a, b in zip(out, pool(x)))
    pool = torch.nn.MaxPool2d(2)
    assert torch.equal(max_pool_compact(pool, x[0]), pool(x[0]))  # 3-d: (C, H, W)


def test_index_dtype_holds_each_index_of_the_plane():
    """int16 up to 32,767 pixels, int32 up to 2**31 - 1, int64 above."""
    for dtype, nxt in ((torch.int16, torch.int32), (torch.int32, torch.int64)):
        top = torch.iinfo(dtype).max
        assert _index_dtype(top) == dtype and _index_dtype(top + 1) == nxt


def test_compact_max_pool_indices_span_the_whole_plane():
    """A wide plane whose rows alone fit int16 but not the whole: the gradient still
    goes to the maximum far along it (the index type follows H * W, not W)."""
    x = torch.zeros(1, 1, 4, 9000, dtype=torch.float64)
    x[0, 0, 3, 8999] = 1.0  # flat index 35,999: beyond int16
    x.requires_grad_()
    pool = torch.nn.MaxPool2d(4)
    (got,) = torch.autograd.grad(max_pool_compact(pool, x).sum(), x)
    (ref,) = torch.autograd.grad(pool(x).sum(), x)
    assert torch.equal(got, ref) and got[0, 0, 3, 8999] == 1.0


# --- diffnas list ------------------------------------------------------------------------
def _listed(capsys, kind: str, *args: str) -> list[str]:
    from diffnas.cli import main

    assert main(["list", kind, *args]) == 0
    return capsys.readouterr().out.splitlines()


def _expected_names(kind: str) -> list[str]:
    """What ``list KIND`` names, in order, read from the registries themselves."""
    import diffnas.arch as arch
    import diffnas.data as data
    import diffnas.genotype as genotype
    import diffnas.ops as ops
    import diffnas.spaces as spaces
    import diffnas.strategies as strategies
    from diffnas.engine.engines import all_engines, list_engines
    from diffnas.ops.graph import list_graph_ops
    from diffnas.ops.rnn import RNN_OPS
    from diffnas.strategies.base import PENALTIES, _import_penalty_modules

    _import_penalty_modules()
    return {
        "ops": lambda: ops.OPS.names() + RNN_OPS.names() + list_graph_ops(),
        "spaces": spaces.SPACES.names,
        "strategies": strategies.STRATEGIES.names,
        "datasets": lambda: data.DATASETS.names() + [
            n for e in all_engines() if e.name != "image" for n in sorted(e.datasets())],
        "genotypes": lambda: sorted(genotype.PUBLISHED),
        "relaxations": arch.RELAXATIONS.names,
        "discretizers": genotype.DISCRETIZERS.names,
        "penalties": PENALTIES.names,
        "engines": list_engines,
    }[kind]()


@pytest.mark.parametrize("kind", ["ops", "spaces", "strategies", "datasets", "genotypes",
                                  "relaxations", "discretizers", "penalties", "engines"])
def test_list_names_each_entry_of_its_registry_in_order(kind, capsys):
    """One line per registered name, none left out, none twice, in the registry's (sorted)
    order, each domain's part after the image one's."""
    lines = _listed(capsys, kind)
    names = [line.split(":")[0].split(" ")[0] for line in lines]
    assert names == _expected_names(kind)
    if kind in ("genotypes", "strategies", "relaxations", "discretizers", "penalties"):
        assert names == sorted(names)


def _run_search(*args):  # (defines the fake engines' module: this test file)
    raise NotImplementedError


@dataclasses.dataclass
class _RuleSettings:
    table: str
    steps: int = 3


@pytest.fixture
def fake_engines(monkeypatch):
    """Two engines of this file: ``zz_rule_two`` run by two spaces, data parallel, with
    settings; ``zz_rule_none`` run by no space, with unsorted data set names."""
    from diffnas.engine.engines import ENGINES, Engine, list_engines
    from diffnas.spaces import SPACES

    list_engines()  # the built-in ones first
    common = dict(a_run="a toy run", data_kind="toy", run_search=_run_search,
                  run_retrain=_run_search, summary=_run_search, report=_run_search)
    two = Engine(name="zz_rule_two", label="two (rules)", datasets=lambda: ["b2", "a2"],
                 data_parallel=True, settings=_RuleSettings, **common)
    none = Engine(name="zz_rule_none", label="none (rules)", datasets=lambda: ["zz", "aa"],
                  **common)
    monkeypatch.setitem(ENGINES._items, two.name, two)
    monkeypatch.setitem(ENGINES._items, none.name, none)
    for name in ("zz_space_b", "zz_space_a"):
        monkeypatch.setitem(SPACES._items, name,
                            type(name, (), {"engine": "zz_rule_two", "__module__": __name__}))
    return sys.modules[__name__].__file__


def test_list_engines_describes_a_plugin_engine(fake_engines, capsys):
    from diffnas.cli import _settings_text

    lines = _listed(capsys, "engines")
    mark = f"(plugin: {fake_engines})"
    assert (f"zz_rule_two {mark}: two (rules), spaces zz_space_a, zz_space_b; judged by "
            f"retrained test accuracy; data parallel under torchrun; settings (engine "
            f"section): {_settings_text(_RuleSettings)}") in lines
    assert (f"zz_rule_none {mark}: none (rules), spaces no; judged by retrained test "
            "accuracy") in lines
    (graph,) = [line for line in lines if line.startswith("graph: ")]
    assert "data parallel" not in graph and "settings" not in graph


def test_list_datasets_names_each_engine_s_data_sorted_with_its_spaces(fake_engines, capsys):
    lines = _listed(capsys, "datasets")
    part = [line for line in lines if line.split(" ")[0] in {"aa", "zz", "a2", "b2"}]
    assert part == ["aa (toy, for the no space)", "zz (toy, for the no space)",
                    "a2 (toy, for the zz_space_a, zz_space_b space)",
                    "b2 (toy, for the zz_space_a, zz_space_b space)"]
    assert not [line for line in lines if "(image, " in line]  # the image ones bare
    spaces = _listed(capsys, "spaces")
    mark = f"(plugin: {fake_engines})"
    assert f"zz_space_a {mark} (zz_rule_two engine)" in spaces
    assert "darts_cnn" in spaces and "nb201" in spaces  # the image engine's, unmarked


def test_list_config_must_be_a_mapping(tmp_path, capsys):
    from diffnas.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("- plugins\n- more\n")
    assert main(["list", "ops", "--config", str(config)]) == 2
    assert f"{config}: top level must be a mapping" in capsys.readouterr().err


# --- model.json beside an export ------------------------------------------------------------
def _described_run(tmp_path, data=True, config="data: {name: npz}\n", record=None):
    """A run directory holding what ``model_info`` reads: the retraining result (with its
    data record unless ``data`` is False) and ``config.yaml``."""
    run = tmp_path / "run"
    (run / "retrain").mkdir(parents=True)
    result = {"test_acc": 0.625, "genotype": {}}
    if data:
        result["data"] = record or {"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 8.0],
                                    "classes": ["cat", "dog"], "name": "npz"}
    (run / "retrain" / "result.json").write_text(json.dumps(result))
    (run / "config.yaml").write_text(config)
    return run


def test_model_json_describes_the_input_and_outputs(tmp_path):
    """Batch first then (C, H, W); mean, std, classes, dataset and accuracy as recorded;
    the resize line names the side (not the channels)."""
    from diffnas.export import model_info

    info = model_info(_described_run(tmp_path), (3, 16, 16))
    assert info["input_shape"] == ["batch", 3, 16, 16]
    assert (info["mean"], info["std"]) == ([10.0, 20.0, 30.0], [2.0, 4.0, 8.0])
    assert info["classes"] == ["cat", "dog"] and info["dataset"] == "npz"
    assert info["test_acc"] == 0.625
    assert info["resize"] == "none: the network trained on the images as stored (16x16)"
    assert info["test_images"] == "all the test images of npz"
    assert set(info) >= {"input_shape", "preprocess", "mean", "std", "outputs", "classes"}


def test_model_json_is_left_out_for_runs_that_recorded_no_data(tmp_path):
    from diffnas.export import model_info

    assert model_info(_described_run(tmp_path, data=False), (3, 8, 8)) is None


@pytest.mark.parametrize("lost", [["classes"], ["name"], ["mean", "classes"]])
def test_model_json_refuses_a_data_record_that_lacks_a_key(tmp_path, lost):
    from diffnas.export import ExportError, model_info

    record = {"mean": [0.0], "std": [1.0], "classes": ["a"], "name": "npz"}
    for key in lost:
        del record[key]
    run = _described_run(tmp_path, record=record)
    with pytest.raises(ExportError, match=f"'data' entry lacks {', '.join(lost)};"):
        model_info(run, (1, 8, 8))


@pytest.mark.parametrize("value", ["true", "'16'", "16.0"])
def test_a_resolution_that_is_no_integer_counts_as_unset(tmp_path, value):
    """``resolution: true`` is a bool, not a side of 1 pixel."""
    from diffnas.export import _configured_data, model_info

    run = _described_run(tmp_path, config=f"data: {{name: npz, resolution: {value}, "
                                          f"test_subset: {value}}}\n")
    assert _configured_data(run, "resolution") is None
    info = model_info(run, (3, 8, 8))
    assert info["resize"].startswith("none: ")
    assert info["test_images"] == "all the test images of npz"


@pytest.mark.parametrize("stored, seed_of", [
    (None, "default"),  # no test_subset.json
    ('{"seed": 7}', 7),
    ('{"seed": true}', "default"),  # a bool is no seed
    ('{"seed": "7"}', "default"),
    ("not json", "default"),  # a damaged record: the default draw
])
def test_test_images_name_the_seed_of_the_subset(tmp_path, stored, seed_of):
    from diffnas.data.registry import TEST_SUBSET_SEED
    from diffnas.engine.rundir import TEST_SUBSET_FILE
    from diffnas.export import test_images_text

    run = _described_run(tmp_path, config="data: {name: npz, test_subset: 12}\n")
    if stored is not None:
        (run / "retrain" / TEST_SUBSET_FILE).write_text(stored)
    seed = TEST_SUBSET_SEED if seed_of == "default" else seed_of
    text = test_images_text(run, "npz")
    assert text.startswith("data.test_subset=12 of the test images of npz")
    assert f"manual_seed({seed}))[:12] of its N test images" in text


def test_resize_text_follows_a_plugin_loader_that_resizes(monkeypatch):
    """A plugin loader taking ``resolution`` resizes as it reads (its way); one without
    it is resized by diffnas's interpolate, as the built-in loaders are."""
    from diffnas.data import DATASETS
    from diffnas.export import resize_text

    module = types.ModuleType("p_rule_loaders")

    def own(root=None, resolution=None):
        raise NotImplementedError

    def plain(root=None):
        raise NotImplementedError

    for fn in (own, plain):
        fn.__module__ = module.__name__
        monkeypatch.setitem(DATASETS._items, f"p_rule_{fn.__name__}", fn)
    text = resize_text("p_rule_own", 16, 16)
    assert text.startswith("resized to 16x16 by the loader of dataset 'p_rule_own'")
    assert "interpolate" in resize_text("p_rule_plain", 16, 16)
    assert "interpolate" in resize_text("npz", 16, 16)  # a built-in one, it too
    assert resize_text("npz", 16, 12).startswith("resized to 12x12")


def _weight_grads_taken(fn):
    """The aten convolution backward calls ``fn`` makes that compute a weight gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    taken = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default and args[-1][1]:
                taken.append(tuple(args[2].shape))
            return func(*args, **(kwargs or {}))

    with Watch():
        fn()
    return taken


@pytest.mark.parametrize("which", ["dw_pw", "bn_relu_conv"])
def test_an_architecture_step_computes_no_depthwise_weight_gradient(which):
    """Gradients asked for the input alone (an architecture step): the depthwise weight's
    is not computed, though the weight requires one; asked for it, it is."""
    gen = torch.Generator().manual_seed(9)
    x = _rand(2, 3, 8, 8, gen=gen)
    w_dw, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    if which == "dw_pw":
        out = _dw_pw(x, w_dw, w_pw, (2, 2), (1, 1), (1, 1), 3, False)
    else:
        out = BNReLUConv.apply(x, w_dw, 1e-5, (2, 2), (1, 1), (1, 1), 3, w_pw)
    assert _weight_grads_taken(lambda: torch.autograd.grad(out.sum(), [x],
                                                           retain_graph=True)) == []
    assert (3, 1, 3, 3) in _weight_grads_taken(lambda: torch.autograd.grad(out.sum(), [w_dw]))
