"""A search step captured as a CUDA graph (engine/cuda_graph.py) does what the eager step
does: same weights and alphas after every step, a new learning rate re-captures, a
non-finite loss still stops the run. The GPU cases skip where there is no CUDA device."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_space

from diffnas.arch import ArchParams
from diffnas.strategies import ClassificationObjective, create_strategy
from diffnas.strategies.objective import metric

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _strategy(device, seed=0):
    torch.manual_seed(seed)
    space = tiny_space()
    supernet = space.build_supernet().to(device)
    arch = ArchParams(space).to(device)
    with torch.no_grad():
        for p in arch.parameters():
            p.normal_(0, 0.5)
    return create_strategy({"name": "darts", "order": 1}, supernet, arch,
                           ClassificationObjective(), epochs=3)


def _batches(n, device, size=6):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(size, 1, 8, 8, generator=g)
        y = torch.randint(0, 3, (size,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def test_metric_is_a_float_outside_capture():
    assert metric(torch.tensor(0.25)) == 0.25


def test_graphed_step_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from diffnas.engine.cuda_graph import GraphedStep

    with pytest.raises(RuntimeError, match="CUDA device"):
        GraphedStep(lambda t, v: {}, [])


@cuda
def test_graphed_steps_match_eager_steps_and_recapture_on_a_new_lr():
    from diffnas.engine.cuda_graph import GraphedStep

    eager, graphed = _strategy("cuda"), _strategy("cuda")
    step = GraphedStep(graphed.step, [graphed.w_optimizer, graphed.a_optimizer], warmup=2)
    data = _batches(8, "cuda")
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        for i in range(4):
            a = eager.step(data[2 * i], data[2 * i + 1])
            b = step(data[2 * i], data[2 * i + 1])
            assert set(a) == set(b) and all(isinstance(v, float) for v in b.values())
            assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["val_loss"] - b["val_loss"]) < 1e-4
            for p, q in zip(eager.alphas(), graphed.alphas(), strict=True):
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
            for p, q in zip(eager.supernet.parameters(), graphed.supernet.parameters(),
                            strict=True):
                torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
            if i == 2:  # a new learning rate: the next step is captured again
                eager.end_epoch()
                graphed.end_epoch()
    assert step.replays == 2 and len(step.graphs) == 1  # the old learning rate's is gone


@cuda
def test_graphed_step_raises_on_a_non_finite_loss():
    from diffnas.engine.cuda_graph import GraphedStep

    s = _strategy("cuda")
    step = GraphedStep(s.step, [s.w_optimizer, s.a_optimizer], warmup=1)
    data = _batches(3, "cuda")
    step(data[0], data[1])
    step(data[0], data[1])  # captured and replayed
    bad = (torch.full_like(data[2][0], float("nan")), data[2][1])
    with pytest.raises(FloatingPointError, match="NaN"):
        step(bad, data[1])


def test_search_cuda_graph_refuses_what_it_cannot_capture(tmp_path):
    from test_engine import _cfg

    from diffnas.engine.search import build_search, load_search_data, run_search

    with pytest.raises(ValueError, match="needs a CUDA device"):
        run_search(_cfg("search.cuda_graph=true"), tmp_path)
    cfg = _cfg("search.strategy.order=2")
    task = build_search(cfg, load_search_data(cfg))
    with pytest.raises(ValueError, match="'darts'.*cannot be captured"):
        task.configure_step(torch.device("cuda"), cuda_graph=True)
    with pytest.raises(ValueError, match="data parallel"):
        task.configure_step(torch.device("cuda"), cuda_graph=True, world_size=2)


@cuda
def test_graphed_search_matches_eager_search_and_resumes(tmp_path):
    from test_engine import _alphas, _cfg

    from diffnas.engine.search import run_search

    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False):
        eager = run_search(_cfg("device=cuda", "search.epochs=3"), tmp_path / "eager")
        cfg = _cfg("device=cuda", "search.epochs=3", "search.cuda_graph=true")
        graphed = run_search(cfg, tmp_path / "graphed")
        run_search(cfg, tmp_path / "cut", stop_after=1)
        resumed = run_search(cfg, tmp_path / "cut", resume=True)
    for a, b, c in zip(_alphas(eager), _alphas(graphed), _alphas(resumed), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(c, b, rtol=1e-3, atol=1e-4)


def test_search_cudnn_benchmark_setting_reaches_cudnn(tmp_path, monkeypatch):
    from test_engine import _cfg

    from diffnas.engine.search import run_search

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run_search(_cfg("search.epochs=1"), tmp_path / "off")
    assert torch.backends.cudnn.benchmark is False
    run_search(_cfg("search.epochs=1", "search.cudnn_benchmark=true"), tmp_path / "on")
    assert torch.backends.cudnn.benchmark is True


def test_a_graph_runs_checkpoint_resumes_on_cpu():
    # A CUDA-graph search saves Adam as capturable; resumed on CPU, Adam must step again
    # (torch refuses a capturable Adam on CPU parameters).
    saved = _strategy("cpu")
    for g in saved.a_optimizer.param_groups:
        g["capturable"] = True
    state = saved.state_dict()
    resumed = _strategy("cpu")
    resumed.load_state_dict(state)
    assert not any(g["capturable"] for g in resumed.a_optimizer.param_groups)
    x, y = _batches(2, "cpu")[0], _batches(2, "cpu")[1]
    stats = resumed.step(x, y)
    assert stats["loss"] > 0
