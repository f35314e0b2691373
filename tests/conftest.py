"""Tiny spaces and batches shared by the tests (seconds on a 2-core CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from diffnas.arch import ArchParams
from diffnas.report.plots import plots_after_run as _REAL_PLOTS_AFTER_RUN
from diffnas.spaces import DataShape, create_space
from diffnas.strategies import ClassificationObjective, create_strategy

TINY_SHAPE = DataShape(in_channels=1, resolution=8, num_classes=3)


def tiny_space(**overrides):
    section = {"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2, "stem_multiplier": 1}
    section.update(overrides)
    return create_space(section, TINY_SHAPE)


def tiny_batch(n: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def tiny_strategy(section: dict, space=None, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    space = space or tiny_space()
    supernet = space.build_supernet().to(dtype)
    arch = ArchParams(space).to(dtype)
    with torch.no_grad():  # visible alphas, so hypergradients are not all tiny
        for p in arch.parameters():
            p.normal_(0, 0.5)
    return create_strategy(section, supernet, arch, ClassificationObjective(), epochs=2)


def assert_same_state(s, ref, exact: bool = False) -> None:
    """Strategy ``s`` holds the alphas and supernet weights of ``ref`` (a twin replayed by
    hand), to float64 rounding or (``exact``) bit for bit."""
    for got, want in ((s.alphas(), ref.alphas()),
                      (s.supernet.parameters(), ref.supernet.parameters())):
        for a, b in zip(got, want, strict=True):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def noise_of_a_step(s, train, val) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The relaxation noise of group ``normal`` each pass of ``s.step(train, val)`` drew:
    those of the alpha step, and the weight step's (the last)."""
    draws = []
    noise = s.relaxation.noise

    def recorded(group, a):
        out = noise(group, a)
        if group == "normal":
            draws.append(out.clone())
        return out

    s.relaxation.noise = recorded
    s.step(train, val)
    return draws[:-1], draws[-1]


@pytest.fixture(scope="session", autouse=True)
def _no_plots_after_runs():
    """Runs end without drawing RUN/plots (about 2 s a run, over a hundred runs in the
    suite; module-scoped fixtures' runs included), except in tests marked ``run_plots``,
    which check that they are drawn. Seed workers in other processes still draw theirs."""
    import diffnas.report.plots as plots

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "plots_after_run", lambda run_dir, cfg, overrides=(): [])
        yield


@pytest.fixture(autouse=True)
def _plots_where_marked(request, monkeypatch):
    if request.node.get_closest_marker("run_plots") is not None:
        import diffnas.report.plots as plots

        monkeypatch.setattr(plots, "plots_after_run", _REAL_PLOTS_AFTER_RUN)


@pytest.fixture
def space():
    return tiny_space()


def jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, read plainly (not with the library's reader, which
    the tests check)."""
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def tb_events(log_dir: Path):
    """A loaded TensorBoard event accumulator of ``log_dir`` (skips without tensorboard)."""
    pytest.importorskip("tensorboard", reason="pip install 'diffnas[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert log_dir.is_dir(), f"no event files: {log_dir} is missing"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


class StatelessTask:
    """A loop task (``engine.loop.Task``) of ``n`` batches an epoch with no state of its
    own: a test's subclass gives ``step``."""

    n = 1

    def batches(self, epoch):
        return range(self.n)

    def num_batches(self):
        return self.n

    def end_epoch(self, epoch):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def cost_predictor(ops: list[str], costs: dict[str, float], base: float = 10.0):
    """A NAS-Bench-201 latency predictor over columns ``ops`` (6 edges): ``base`` plus
    ``costs[op]`` ms per edge, exactly."""
    from diffnas.hardware.predictor import LatencyPredictor

    p = LatencyPredictor({"cell": (6, len(ops))}, hidden=4, mean_ms=0.0, std_ms=1.0,
                         ops={"cell": ops})
    with torch.no_grad():
        for t in p.mlp[-1].parameters():
            t.zero_()
        p.linear.weight.zero_()
        for j, op in enumerate(ops):
            p.linear.weight[0, j] = costs.get(op, 0.0)
        p.linear.bias.fill_(base)
    return p


def search_finding(genotype, space):
    """A stand-in for ``hardware.sweep.run_search`` whose search found ``genotype``: it
    writes the genotype's one-hot alphas as the run's last alphas record."""
    from types import SimpleNamespace

    from diffnas.hardware.dataset import encode_indices, one_hot

    def search(cfg, run_dir, resume=False, data=None):
        (run_dir / "search").mkdir(parents=True, exist_ok=True)
        w = one_hot(encode_indices(genotype, space), space)
        (run_dir / "search" / "alphas.jsonl").write_text(
            json.dumps({g: v.tolist() for g, v in w.items()}) + "\n")
        return SimpleNamespace(genotype=genotype)

    return search


def locked_elsewhere(run: Path) -> bool:
    """Whether a run lock on ``run`` is held (an flock from a new descriptor conflicts
    with any other, this process's included)."""
    from diffnas.engine.runlock import run_lock_holder

    return run_lock_holder(run) is not None


def cut_and_resumed(run_search, run_retrain, cfg, tmp_path: Path, search_cut: int,
                    retrain_cut: int) -> tuple:
    """An engine's search and retraining (``run_search(cfg, run_dir, resume, stop_after)``,
    ``run_retrain(cfg, genotype, run_dir, resume, stop_after)``) run whole in
    ``tmp_path/a``, and cut after ``search_cut`` / ``retrain_cut`` epochs then resumed in
    ``tmp_path/b``. Asserts the same genotype and ``alphas.jsonl``; returns (whole search,
    resumed search, whole retraining's result, resumed retraining's result)."""
    whole = run_search(cfg, tmp_path / "a")
    run_search(cfg, tmp_path / "b", stop_after=search_cut)
    resumed = run_search(cfg, tmp_path / "b", resume=True)
    assert resumed.genotype == whole.genotype
    alphas = [(tmp_path / r / "search" / "alphas.jsonl").read_text() for r in "ab"]
    assert alphas[0] == alphas[1]
    full = run_retrain(cfg, whole.genotype, tmp_path / "a")
    run_retrain(cfg, whole.genotype, tmp_path / "b", stop_after=retrain_cut)
    again = run_retrain(cfg, whole.genotype, tmp_path / "b", resume=True)
    return whole, resumed, full, again


def unreadable_fashion_mnist(root: Path) -> Path:
    """A directory holding the four Fashion-MNIST IDX file names with garbage inside: the
    files check (presence) passes, so the run directory is made, and loading fails."""
    from diffnas.data.images import FASHION_MNIST_STEMS

    root.mkdir(parents=True, exist_ok=True)
    for stem in FASHION_MNIST_STEMS:
        (root / stem).write_bytes(b"not an IDX file")
    return root


@pytest.fixture
def clean_path(monkeypatch):
    """``sys.path`` and ``sys.modules`` restored after the test (plugins add to both): the
    plugin modules tests name ``p_rule_*`` and diffnas's own ``diffnas_plugin_*``."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("p_rule_", "diffnas_plugin_")):
            del sys.modules[name]
