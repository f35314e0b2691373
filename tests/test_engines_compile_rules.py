"""Rules of the engine registry (engine/engines.py) and of ``search.compile``
(supernet/compile.py) that a mutation audit could break and the other test files leave
open: which names a :class:`Metric` refuses, what an :class:`Engine` refuses or makes
from its halves (``resume`` passed on, ``report`` given the result), which compile
settings are accepted and which backends the refusal offers, which modules
``compile_mixed_ops`` compiles (``torch.nn.Module.compile`` replaced by a recorder: no
real compilation), with what arguments, and the recompile limits it raises but never
lowers."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path

import pytest
from conftest import tiny_space
from torch import nn

from diffnas.config import ConfigError
from diffnas.engine.engines import (
    Engine,
    Metric,
)
from diffnas.supernet.compile import (
    check_compile_settings,
    compile_backends,
    compile_mixed_ops,
    compile_modes,
)
from diffnas.supernet.mixed import MixedOp
from diffnas.supernet.nb201 import Nb201MixedOp


# --- helpers ---------------------------------------------------------------------------
def _engine(**kw) -> Engine:
    """An engine of recorders: the halves, the report and ``summary``."""
    base = dict(name="rule_engine", label="rule (tests)", a_run="a rule run",
                data_kind="rule", datasets=lambda: ["ruleset"],
                run_search=lambda *a: None, run_retrain=lambda *a: None,
                summary=lambda cfg, genotype: {}, report=lambda g, r: None)
    return Engine(**{**base, **kw})


@pytest.fixture
def compiled(monkeypatch):
    """``nn.Module.compile`` replaced by a recorder of (module, kwargs)."""
    calls: list[tuple[nn.Module, dict]] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((self, kw)))
    return calls


_LIMITS = (("recompile_limit", "cache_size_limit"),
           ("accumulated_recompile_limit", "accumulated_cache_size_limit"))


def _limit_names() -> list[str]:
    """Dynamo's names of its two recompile limits in this torch (they changed)."""
    import torch._dynamo.config as dynamo

    return [next(n for n in names if hasattr(dynamo, n)) for names in _LIMITS]


def _limits() -> tuple[int, ...]:
    import torch._dynamo.config as dynamo

    return tuple(getattr(dynamo, n) for n in _limit_names())


@pytest.fixture
def limits():
    """Dynamo's recompile limits, restored after the test; returns a setter of both."""
    import torch._dynamo.config as dynamo

    def set_limits(per_code: int, total: int) -> None:
        for name, value in zip(_limit_names(), (per_code, total), strict=True):
            setattr(dynamo, name, value)

    saved = _limits()
    yield set_limits
    set_limits(*saved)


def _mixed_net() -> nn.Module:
    """A tiny DARTS supernet and one NAS-Bench-201 edge: both kinds of mixed op."""
    return nn.Sequential(tiny_space().build_supernet(),
                         Nb201MixedOp(4, 1, ["none", "skip_connect", "avg_pool_3x3"]))


# --- Metric ----------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["key", "name", "short"])
@pytest.mark.parametrize("bad", ["", 7, None])
def test_each_name_of_a_metric_must_be_a_non_empty_string(field, bad):
    """Each of key, name and short, and the message names that field and its value."""
    args = {"key": "test_rmse", "name": "RMSE", "short": "rmse", field: bad}
    with pytest.raises(ValueError, match=re.escape(
            f"Metric.{field} must be a non-empty string, got {bad!r}")):
        Metric(**args)


# --- Engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("given", [{}, {"search": print}, {"train": print}])
def test_an_engine_lacking_search_or_train_needs_a_report(given):
    """Either of the two commands missing is made from the halves and ``report``: without
    ``report``, refused by name."""
    with pytest.raises(ValueError, match="engine 'rule_engine': give search and train, or "
                       "report"):
        _engine(report=None, **given)
    _engine(report=None, search=print, train=print)  # both given: no report needed


def test_engine_settings_must_be_a_dataclass_class():
    class Plain:
        steps: int = 3

    @dataclasses.dataclass
    class Settings:
        steps: int = 3

    for bad in (Plain, Settings(), {"steps": 3}):
        with pytest.raises(ValueError, match=r"engine 'rule_engine': settings must be a "
                           r"dataclass .*got " + re.escape(repr(bad))):
            _engine(settings=bad)
    assert _engine(settings=Settings).settings is Settings


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("retrain", [True, False])
def test_the_made_search_runs_both_halves_with_resume_and_reports(tmp_path, resume, retrain):
    """``search`` made from ``run_search`` / ``run_retrain``: each gets ``resume``, the
    retraining gets the search's genotype (skipped with ``retrain.enabled=false``), and
    ``report`` gets both; ``train`` retrains the genotype it is given, with ``resume``."""
    calls = []

    def run_search(cfg, run_dir, res):
        calls.append(("search", Path(run_dir), res))
        return types.SimpleNamespace(genotype="G")

    def run_retrain(cfg, genotype, run_dir, res):
        calls.append(("retrain", genotype, res))
        return {"test_acc": 0.5}

    reported = []
    engine = _engine(run_search=run_search, run_retrain=run_retrain,
                     report=lambda g, r: reported.append((g, r)))
    cfg = types.SimpleNamespace(retrain=types.SimpleNamespace(enabled=retrain))
    assert engine.search(cfg, tmp_path, resume) == 0
    assert calls == [("search", tmp_path, resume)] + ([("retrain", "G", resume)] if retrain
                                                       else [])
    assert reported == [("G", {"test_acc": 0.5} if retrain else None)]
    calls.clear()
    reported.clear()
    engine.train(cfg, "H", tmp_path, resume)
    assert calls == [("retrain", "H", resume)] and reported == [("H", {"test_acc": 0.5})]


def test_an_engine_belongs_to_the_module_of_its_run_search():
    """Not to the module of another of its callables: a plugin's failed import undoes the
    registrations of the plugin's module, found by this."""
    engine = _engine(run_search=json.dumps, summary=lambda cfg, genotype: {})
    assert engine.__module__ == "json"


# --- search.compile settings -----------------------------------------------------------
def test_unknown_compile_settings_are_all_named_sorted():
    with pytest.raises(ConfigError, match=re.escape(
            "search.compile: unknown setting(s) ['dynamic', 'fullgraph']; known: "
            "('backend', 'mode')")):
        check_compile_settings({"fullgraph": True, "backend": "inductor", "dynamic": False})


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune"])
def test_a_mode_goes_with_the_default_backend_inductor_only(mode):
    """Without ``backend`` the backend is inductor, so a mode is accepted; with another
    backend it is refused naming that backend, and ``mode: null`` goes with any."""
    assert mode in compile_modes()
    check_compile_settings({"mode": mode})
    check_compile_settings({"backend": "inductor", "mode": mode})
    for backend in ("eager", "aot_eager"):
        with pytest.raises(ConfigError, match=re.escape(
                f"search.compile.mode applies to the inductor backend only, not {backend!r}")):
            check_compile_settings({"backend": backend, "mode": mode})
    check_compile_settings({"backend": "eager", "mode": None})


def test_debug_backends_are_accepted_but_only_the_others_are_offered():
    """The message lists the backends torch.compile offers; the debug ones (eager,
    aot_eager) are accepted all the same."""
    plain, debug = compile_backends(), compile_backends(debug=True)
    assert "inductor" in plain and "eager" not in plain and "aot_eager" not in plain
    assert set(plain) < set(debug) and {"eager", "aot_eager"} <= set(debug)
    assert plain == sorted(plain) and debug == sorted(debug)
    with pytest.raises(ConfigError) as err:
        check_compile_settings({"backend": "nope"})
    offered = str(err.value).split("one of ")[1].split(" (or a debug one")[0]
    assert offered == ", ".join(plain) and str(err.value).endswith("got 'nope'")


# --- compile_mixed_ops -----------------------------------------------------------------
@pytest.mark.parametrize("spec, kw", [
    ({}, {"backend": "inductor", "dynamic": False}),
    ({"backend": "eager"}, {"backend": "eager", "dynamic": False}),
    ({"mode": None}, {"backend": "inductor", "dynamic": False}),
    ({"mode": "max-autotune"}, {"backend": "inductor", "dynamic": False,
                                "mode": "max-autotune"}),
])
def test_every_mixed_op_of_either_kind_is_compiled_once_with_the_settings(compiled, limits,
                                                                         spec, kw):
    """Each mixed op (DARTS and NAS-Bench-201 edges) compiled once, nothing else, with
    static shapes, the backend (inductor by default) and the mode when one is set; the
    count returned is theirs."""
    net = _mixed_net()
    ops = [m for m in net.modules() if type(m) in (MixedOp, Nb201MixedOp)]
    assert any(type(m) is Nb201MixedOp for m in ops) and any(type(m) is MixedOp for m in ops)
    assert compile_mixed_ops(net, spec) == len(ops)
    assert [id(m) for m, _ in compiled] == [id(m) for m in ops]
    assert all(k == kw for _, k in compiled)


def test_a_network_without_mixed_ops_is_refused_by_name(compiled, limits):
    with pytest.raises(ValueError, match="search.compile: Sequential has no mixed ops to "
                       "compile"):
        compile_mixed_ops(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {})
    assert compiled == []


@pytest.mark.parametrize("spec", [{"fullgraph": True}, {"backend": "nope"},
                                  {"backend": "eager", "mode": "max-autotune"}])
def test_bad_settings_are_refused_before_anything_is_compiled(compiled, limits, spec):
    """Also when called directly (not after a config load checked them)."""
    limits(8, 256)
    with pytest.raises(ConfigError, match="search.compile"):
        compile_mixed_ops(_mixed_net(), spec)
    assert compiled == [] and _limits() == (8, 256)


@pytest.mark.parametrize("before, after", [((8, 256), (64, 4096)),
                                           ((100, 10_000), (100, 10_000)),
                                           ((64, 100), (64, 4096))])
def test_recompile_limits_are_raised_to_every_edge_never_lowered(compiled, limits, before,
                                                                 after):
    """Every edge runs one ``forward`` at its own shapes: dynamo's default of 8 graphs per
    code object would send the rest back to eager; a user's higher limit stays."""
    limits(*before)
    compile_mixed_ops(_mixed_net(), {"backend": "eager"})
    assert _limits() == after

