"""Second-pass rules of the memory savers (``ops/savers.py``) and the engine registry
(``engine/engines.py``) that a mutation audit showed the other test files leave open: the
``twice_differentiable`` switch nests; ``dense_grad`` leaves a tensor that needs no
gradient alone, passes an undefined gradient on, and still hooks eager code where compiled
traces skip its hooks; the hook probe answers what this torch does and leaves dynamo's
counters as they were; a second derivative through any memory saver is refused naming the
switch; the polyphase weight gradient refuses a padding that is not "same"; a
:class:`Metric`'s own title heads its summary and column; the built-in metrics say which
way is better and where the search's figure is; and ``engine_settings`` reads the config's
``engine`` section into the engine's dataclass, refusing unknown keys by name."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from diffnas.config import ConfigError
from diffnas.engine.engines import (
    ACCURACY,
    ENGINES,
    PERPLEXITY,
    Engine,
    Metric,
    engine_settings,
    get_engine,
    list_engines,
)
from diffnas.ops import savers
from diffnas.ops.savers import (
    BNReLUConv,
    DwPwConv,
    _polyphase_factor,
    dense_grad,
    max_pool_compact,
    memory_savers_allowed,
    twice_differentiable,
)

CL = torch.channels_last


def _rand(*shape, gen, layout=torch.contiguous_format):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return t.contiguous(memory_format=layout).requires_grad_()


# --- the switches --------------------------------------------------------------------------
def test_twice_differentiable_nests():
    """Leaving an inner ``twice_differentiable`` keeps the outer one's plain autograd (an
    iDARTS step inside a Hessian-eigenvalue probe); leaving the outer one restores the
    savers."""
    with twice_differentiable():
        with twice_differentiable():
            assert not memory_savers_allowed()
        assert not memory_savers_allowed()
    assert memory_savers_allowed()


# --- dense_grad ------------------------------------------------------------------------------
def test_dense_grad_leaves_a_tensor_needing_no_gradient_alone():
    """No gradient will reach it: returned as is, no hook (registering one would raise)."""
    t = torch.randn(2, 3, 4, 4)
    assert dense_grad(t) is t and not t._backward_hooks


class _DropsFirst(torch.autograd.Function):
    """``a + b`` whose backward gives ``a`` no gradient (None)."""

    @staticmethod
    def forward(ctx, a, b):  # type: ignore[override]
        return a + b

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return None, g


def test_dense_grad_passes_an_undefined_gradient_on():
    """A custom function answering None for the tensor: its hook gets None and the backward
    goes on (the other input still gets its gradient, the tensor's producer none)."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    _DropsFirst.apply(dense_grad(x * 2), w).sum().backward()
    assert x.grad is None
    torch.testing.assert_close(w.grad, torch.ones_like(w))


def test_dense_grad_hooks_eager_code_where_compiled_traces_skip_hooks(monkeypatch):
    """Where this torch's compiler would break at a hook, only a compiled trace goes
    without: eager code still gets its gradient made dense in the asked layout."""
    monkeypatch.setattr(savers, "_HOOKS_UNTRACED", True)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    t = dense_grad(x * 2, CL)
    seen = []
    t.register_hook(seen.append)
    torch.cat([t, t * 3], dim=1).sum().backward()
    (g,) = seen
    assert g.is_contiguous(memory_format=CL) and not g.is_contiguous()
    torch.testing.assert_close(x.grad, torch.full_like(x, 8.0))


def test_the_hook_probe_answers_this_torch_and_leaves_no_count(monkeypatch):
    """``skip_hooks_when_compiling`` says whether dynamo breaks its graph at a hook on an
    intermediate tensor (asked here of another function), sets the switch to that, and
    leaves dynamo's counters as they were."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(savers, "_HOOKS_UNTRACED", savers._HOOKS_UNTRACED)

    def hooked(x):
        y = x + 1
        y.register_hook(lambda g: g * 1)
        return (y * 3).sum()

    saved = {k: dict(v) for k, v in counters.items()}
    breaks = torch._dynamo.explain(hooked)(torch.ones(3, requires_grad=True))
    counters.clear()
    counters["rule_probe"]["kept"] = 5
    before = {k: dict(v) for k, v in counters.items()}
    try:
        answer = savers.skip_hooks_when_compiling()
        assert answer is (breaks.graph_break_count > 0)
        assert savers._HOOKS_UNTRACED is answer
        assert {k: dict(v) for k, v in counters.items() if v} == before
    finally:
        counters.clear()
        for k, v in saved.items():
            counters[k].update(v)


# --- once differentiable ---------------------------------------------------------------------
def _saver(which, gen):
    x = _rand(2, 3, 8, 8, gen=gen)
    w_dw, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    conf = ((1, 1), (1, 1), (1, 1), 3)
    if which == "bn_relu_conv":
        return x, BNReLUConv.apply(x, w_dw, 1e-5, *conf, w_pw)
    if which == "dw_pw":
        return x, DwPwConv.apply(x, w_dw, w_pw, *conf, False)
    return x, max_pool_compact(torch.nn.MaxPool2d(3, stride=1, padding=1), x)


@pytest.mark.parametrize("which, what", [("bn_relu_conv", "BN-ReLU-conv"),
                                         ("dw_pw", "depthwise-pointwise conv"),
                                         ("max_pool", "compact max-pool")])
def test_a_second_derivative_through_a_saver_is_refused_naming_the_switch(which, what):
    """A graph for a double backward (``create_graph``) is refused with the way out, not
    answered with a gradient that has lost its graph; a first derivative is given."""
    gen = torch.Generator().manual_seed(11)
    x, out = _saver(which, gen)
    with pytest.raises(RuntimeError, match=(
            f"the search supernet's memory-saving {what} path is differentiable once; "
            r"build the loss inside diffnas\.ops\.twice_differentiable\(\)")):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
    x, out = _saver(which, gen)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert g.shape == x.shape and not g.requires_grad


# --- the polyphase weight gradient -------------------------------------------------------------
def test_the_phase_path_wants_same_padding():
    """A stride-1 dilated depthwise conv whose padding is not d*(k-1)/2 mixes phases at
    the border: refused, and its gradients are plain autograd's."""
    gen = torch.Generator().manual_seed(12)
    x = _rand(2, 3, 16, 16, gen=gen, layout=CL)
    w_dw, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    assert _polyphase_factor(w_dw, x, (1, 1), (2, 2), (2, 2), 3) == 2  # "same": taken
    for pad in ((1, 1), (3, 3), (2, 1)):
        assert _polyphase_factor(w_dw, x, (1, 1), pad, (2, 2), 3) == 0
        conf = ((1, 1), pad, (2, 2), 3)
        out = DwPwConv.apply(x, w_dw, w_pw, *conf, False)
        want = F.conv2d(F.conv2d(x, w_dw, None, *conf), w_pw)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(out, [x, w_dw, w_pw], gout)
        ref = torch.autograd.grad(want, [x, w_dw, w_pw], gout)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("only", ["x", "w_dw", "w_pw"])
def test_channels_last_gradients_asked_one_at_a_time_are_autograd_s(only):
    """On channels-last tensors (the 1x1 conv as a matrix product): a gradient asked for
    one input alone (an architecture step asks for the input's; a weight step for the
    weights', its data batch needing none) is plain autograd's."""
    gen = torch.Generator().manual_seed(13)
    x = _rand(2, 3, 8, 8, gen=gen, layout=CL).requires_grad_(only == "x")  # (a data batch)
    w_dw, w_pw = _rand(3, 1, 3, 3, gen=gen), _rand(4, 3, 1, 1, gen=gen)
    inputs = {"x": x, "w_dw": w_dw, "w_pw": w_pw}
    conf = ((1, 1), (1, 1), (1, 1), 3)
    out = DwPwConv.apply(x, w_dw, w_pw, *conf, False)
    want = F.conv2d(F.conv2d(x, w_dw, None, *conf), w_pw)
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64).contiguous(
        memory_format=CL)  # as the supernet's gradients arrive (dense_grad)
    (got,) = torch.autograd.grad(out, inputs[only], gout)
    (ref,) = torch.autograd.grad(want, inputs[only], gout)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


# --- Metric ----------------------------------------------------------------------------------
def test_a_metric_s_own_title_heads_its_summary_and_column():
    """A figure not measured on a test split: its ``title`` is the headline and its
    ``short`` alone the column; without a title, "Retrained test <name>" and
    "test <short>"."""
    own = Metric("mean_return", "return", "ret", ".1f", "val_return",
                 title="Mean return over 10 episodes")
    assert own.headline == "Mean return over 10 episodes"
    assert own.column == "ret" and own.search_column == "search val ret"
    plain = Metric("test_rmse", "RMSE", "rmse")
    assert plain.headline == "Retrained test RMSE" and plain.column == "test rmse"
    assert plain.search_name == "search validation RMSE"


def test_the_built_in_metrics_say_which_way_is_better_and_where_the_search_s_is():
    """Perplexity falls as language models improve, accuracy rises; the image search's
    validation accuracy is its ``val_acc``, the language model's ``valid_ppl``."""
    assert PERPLEXITY.lower_is_better and not ACCURACY.lower_is_better
    assert (ACCURACY.search_key, PERPLEXITY.search_key) == ("val_acc", "valid_ppl")
    assert get_engine("language_model").metric is PERPLEXITY
    assert get_engine("image").metric is ACCURACY


# --- engine_settings -----------------------------------------------------------------------
def _unused(*_):
    raise NotImplementedError


@dataclasses.dataclass
class _Settings:
    table: str
    steps: int = 3


@pytest.fixture
def settings_cfg(monkeypatch):
    """A config-like object of a space run by an engine with settings."""
    from diffnas.spaces import SPACES

    list_engines()  # the built-in ones first
    engine = Engine(name="zz_second_rules", label="second (rules)", a_run="a rule run",
                    data_kind="rule", datasets=lambda: ["ruleset"], run_search=_unused,
                    run_retrain=_unused, summary=_unused, report=_unused, settings=_Settings)
    monkeypatch.setitem(ENGINES._items, engine.name, engine)
    monkeypatch.setitem(SPACES._items, "zz_second_space",
                        type("zz_second_space", (), {"engine": engine.name,
                                                     "__module__": __name__}))

    def cfg(section):
        return types.SimpleNamespace(search=types.SimpleNamespace(
            space={"name": "zz_second_space"}), engine=section)

    return cfg


def test_engine_settings_reads_the_section_into_the_engine_s_dataclass(settings_cfg):
    """The keys given, the dataclass's defaults for the rest; an unknown key is refused by
    name."""
    got = engine_settings(settings_cfg({"table": "energy", "steps": 7}))
    assert got == _Settings(table="energy", steps=7)
    assert engine_settings(settings_cfg({"table": "energy"})) == _Settings("energy", 3)
    with pytest.raises(ConfigError, match="stepz"):
        engine_settings(settings_cfg({"table": "energy", "stepz": 7}))


def test_an_engine_passes_retrain_network_on_as_given_by_default():
    """Without a ``retrain_network`` of its own, an engine's retraining network settings are
    the config's ``retrain.network``, as a copy (the retraining may add its own keys)."""
    engine = Engine(name="zz_plain", label="plain", a_run="a plain run", data_kind="rule",
                    datasets=lambda: [], run_search=_unused, run_retrain=_unused,
                    summary=_unused, report=_unused)
    network = {"C": 8, "layers": 5}
    cfg = types.SimpleNamespace(retrain=types.SimpleNamespace(network=network))
    got = engine.retrain_network(cfg)
    assert got == {"C": 8, "layers": 5} and got is not network
    got["auxiliary"] = True
    assert network == {"C": 8, "layers": 5}
