"""``search.compile``: every mixed op compiled (here with the ``aot_eager`` backend: dynamo
and AOTAutograd trace the edges as Inductor would, without minutes of code generation on
CPU), giving the steps the eager supernet gives."""

from __future__ import annotations

import pytest
import torch
from test_engine import _cfg

from diffnas.engine.search import build_search, load_search_data


def _task(*overrides):
    cfg = _cfg(*overrides)
    return build_search(cfg, load_search_data(cfg))


@pytest.mark.parametrize("hooks", ["as probed", "skipped"])
def test_compiled_mixed_ops_give_the_eager_steps(hooks, monkeypatch):
    """Also with the layout hooks left out of the compiled graphs, as on a torch whose
    compiler does not trace them (ops.savers.skip_hooks_when_compiling)."""
    from torch._dynamo.utils import counters

    from diffnas.ops import savers
    from diffnas.supernet import compile as compile_mod

    if hooks == "skipped":
        def skip() -> bool:
            monkeypatch.setattr(savers, "_HOOKS_UNTRACED", True)
            return True

        monkeypatch.setattr(compile_mod, "skip_hooks_when_compiling", skip)
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _task(), _task("search.compile={backend: aot_eager}")
    batches = list(zip(range(2), eager.batches(0), strict=False))
    for _, batch in batches:
        a, b = eager.step(batch), compiled.step(batch)
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["val_loss"] - b["val_loss"]) < 1e-5
    assert counters["stats"]["unique_graphs"] >= 2  # compiled, not silently eager
    assert sum(counters["graph_break"].values()) == 0
    s, t = eager.strategy, compiled.strategy
    for p, q in zip([*s.supernet.parameters(), *s.alphas()],
                    [*t.supernet.parameters(), *t.alphas()], strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("untraced", [False, True])
def test_layout_hooks_are_left_out_of_compiled_traces_only_where_untraced(untraced,
                                                                        monkeypatch):
    """dense_grad adds its gradient hook in eager code always, inside a compiled trace only
    where this torch's compiler traces hooks (skip_hooks_when_compiling said so)."""
    from diffnas.ops import savers

    monkeypatch.setattr(savers, "_HOOKS_UNTRACED", untraced)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        t = torch.ones(1, 2, 3, 3, requires_grad=True) * 2
        hooked = bool(savers.dense_grad(t)._backward_hooks)
        assert hooked == (not (untraced and compiling)), (untraced, compiling)


def test_compile_settings_are_checked():
    with pytest.raises(ValueError, match="unknown setting.*'fullgraph'"):
        _task("search.compile={fullgraph: true}")
    with pytest.raises(ValueError, match="search.compile: expected a mapping, got .inductor."):
        _task("search.compile=inductor")


def test_compile_refuses_second_order_strategies():
    with pytest.raises(ValueError, match="'darts'.*not declared first-order.*search.compile"):
        _task("search.strategy.order=2", "search.compile={backend: aot_eager}")


def test_compile_refuses_what_it_cannot_run_before_compiling_anything(tmp_path):
    from diffnas.engine.search import configured_step, run_search

    with pytest.raises(ValueError, match="'gdas' samples one op per edge"):
        _task("search.strategy.name=gdas", "search.compile={backend: aot_eager}")
    with pytest.raises(ValueError, match="mode applies to the inductor backend only"):
        _task("search.compile={backend: aot_eager, mode: max-autotune}")
    with pytest.raises(ValueError, match="diagnostics.hessian differentiates twice"):
        run_search(_cfg("search.compile={backend: aot_eager}", "search.diagnostics.enabled=true",
                        "search.diagnostics.hessian=true"), tmp_path)
    task = _task()  # a refused combination leaves the supernet as it was
    with pytest.raises(ValueError, match="needs a CUDA device"):
        configured_step(task.strategy, torch.device("cpu"), cuda_graph=True,
                        compile={"backend": "aot_eager"})
    assert not any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
                   for m in task.strategy.supernet.modules())


def test_compiling_says_the_first_steps_will_be_slow(caplog):
    """On a CPU the first compiled step took minutes with nothing on the screen; the
    compile is lazy (at the first forward), so the log says so when it is set up."""
    from conftest import tiny_space

    from diffnas.supernet.compile import compile_mixed_ops

    caplog.set_level("INFO", logger="diffnas.supernet.compile")
    n = compile_mixed_ops(tiny_space().build_supernet(), {"backend": "eager"})
    assert n > 0 and f"search.compile: {n} mixed ops compile (backend eager)" in caplog.text
    torch._dynamo.reset()
