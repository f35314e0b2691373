"""docs/extending.md's worked plugins (docs/examples/plugins/) imported through
``plugins=`` and run, so the guide cannot rot; the register helpers; a registered
discretizer given the edge-normalisation weights; ``diffnas list`` with plugins."""

from __future__ import annotations

import json
import re
import uuid
from functools import reduce
from pathlib import Path

import pytest
import torch
from conftest import cut_and_resumed

from diffnas.cli import main
from diffnas.genotype import Genotype

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "plugins"
OP, STRATEGY, RELAXATION, DISCRETIZER, SPACE = (
    EXAMPLES / f"my_{k}.py" for k in ("op", "strategy", "relaxation", "discretizer", "space"))
TINY = [
    "data.name=digits", "data.train_subset=48", "data.test_subset=32", "data.batch_size=16",
    "search.epochs=1", "progress=false", "retrain.epochs=1", "retrain.batch_size=16",
    "retrain.train_subset=48", "retrain.cutout=4",
]


def _plugins(*files: Path) -> str:
    return f"plugins=[{', '.join(str(f) for f in files)}]"


def test_the_guide_s_op_strategy_relaxation_and_discretizer_search_and_retrain(tmp_path):
    assert main([
        "search", _plugins(OP, STRATEGY, RELAXATION, DISCRETIZER), *TINY,
        "search.space={name: darts_cnn, C: 4, layers: 3, nodes: 2, stem_multiplier: 1, "
        "ops: [skip_connect, max_pool_3x3, dw_conv_5x5]}",
        "search.strategy={name: sign_darts, sign_lr: 0.01, edge_norm: true, "
        "relaxation: {name: softmax_t, tau: 0.5}}",
        "search.discretizer=no_skip", "retrain.network={C: 4, layers: 3}",
        f"out_dir={tmp_path}", "name=r"]) == 0
    run = tmp_path / "r"
    genotype = Genotype.load(run / "search" / "genotype.json")
    ops = {e.op for cell in genotype.cells for e in cell.edges}
    assert ops and "skip_connect" not in ops, genotype  # the no_skip rule was used
    assert "test_acc" in json.loads((run / "retrain" / "result.json").read_text())
    recorded = json.loads((run / "plugins.json").read_text())
    assert {Path(v["file"]).name for v in recorded.values()} == {
        "my_op.py", "my_strategy.py", "my_relaxation.py", "my_discretizer.py"}


def test_the_guide_s_space_searches_retrains_and_keeps_the_export_contract(tmp_path):
    from diffnas.export import infer_shape

    assert main([
        "search", _plugins(OP, SPACE), *TINY,
        "search.space={name: chain, C: 4, layers: 2, ops: [skip_connect, dw_conv_5x5]}",
        "retrain.network={C: 4}", "retrain.auxiliary_weight=0", "retrain.drop_path=0.1",
        f"out_dir={tmp_path}", "name=r"]) == 0
    run = tmp_path / "r"
    assert Genotype.load(run / "search" / "genotype.json").space == "chain"
    state = torch.load(run / "retrain" / "model.pt", map_location="cpu")
    shape = infer_shape(state, "digits", None)  # what diffnas export reads
    assert (shape.in_channels, shape.num_classes) == (1, 10)
    from diffnas.config import ConfigError, load_config

    chain = [_plugins(SPACE), "search.space={name: chain, C: 4}", "retrain.auxiliary_weight=0"]
    for override, words in (("search.space.C=0", "search.space.C must be"),
                            ("search.space.layers=-1", "search.space.layers must be"),
                            ("retrain.network={C: 0}", "retrain.network.C must be")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [*chain, override])


def _space_and_alphas(edge_norm: bool):
    from diffnas.arch import ArchParams
    from diffnas.spaces import create_space

    space = create_space({"name": "darts_cnn", "C": 4, "layers": 3, "nodes": 2})
    arch = ArchParams(space)
    if edge_norm:
        arch.add_edge_betas()
        with torch.no_grad():
            for beta in arch.betas.values():
                beta.normal_(generator=torch.Generator().manual_seed(1))
    return space, arch


def test_register_relaxation_and_register_discretizer_are_exported():
    from diffnas.arch import RELAXATIONS, SoftmaxRelaxation, create_relaxation, register_relaxation
    from diffnas.genotype import DISCRETIZERS, register_discretizer
    from diffnas.genotype.discretize import argmax_discretize, discretize

    name = f"r_{uuid.uuid4().hex[:8]}"
    cls = register_relaxation(name)(type("R", (SoftmaxRelaxation,), {}))
    assert RELAXATIONS.get(name) is cls and isinstance(create_relaxation(name), cls)
    fn = register_discretizer(name)(lambda logits, space: argmax_discretize(logits, space))
    assert DISCRETIZERS.get(name) is fn
    space, arch = _space_and_alphas(False)
    assert discretize(arch.as_dict(), space, name) == argmax_discretize(arch.as_dict(), space)


def test_a_registered_discretizer_receives_the_edge_weights_when_the_run_has_them():
    from diffnas.genotype import register_discretizer
    from diffnas.genotype.discretize import darts_discretize, discretize

    seen = {}

    def named(logits, space, edge_weights=None):
        seen["named"] = edge_weights
        return darts_discretize(logits, space, edge_weights)

    def keywords(logits, space, **kw):
        seen["keywords"] = kw.get("edge_weights")
        return darts_discretize(logits, space)

    def keyword_only(logits, space, *, edge_weights=None):
        seen["keyword_only"] = edge_weights
        return darts_discretize(logits, space, edge_weights)

    def plain(logits, space):  # takes no edge weights: still called, without them
        seen["plain"] = True
        return darts_discretize(logits, space)

    tag = uuid.uuid4().hex[:8]
    for fn in (named, keywords, keyword_only, plain):
        register_discretizer(f"{fn.__name__}_{tag}")(fn)
    space, arch = _space_and_alphas(True)
    logits, ew = arch.as_dict(), arch.edge_weights()
    assert ew
    got = discretize(logits, space, f"named_{tag}", ew)
    assert seen["named"] is ew and got == darts_discretize(logits, space, ew)
    discretize(logits, space, f"keywords_{tag}", ew)
    assert seen["keywords"] is ew
    discretize(logits, space, f"keyword_only_{tag}", ew)
    assert seen["keyword_only"] is ew
    assert discretize(logits, space, f"plain_{tag}", ew) == darts_discretize(logits, space)
    # the built-ins as before: darts ranks edges by them, argmax takes none
    assert discretize(logits, space, "darts", ew) == darts_discretize(logits, space, ew)
    assert discretize(logits, space, "argmax", ew) == discretize(logits, space, "argmax")
    # without edge normalization nothing is passed
    seen.clear()
    discretize(logits, space, f"named_{tag}", {})
    assert seen["named"] is None


def test_list_shows_plugin_components_and_discretizers_and_penalties(tmp_path, capsys):
    assert main(["list", "ops", _plugins(OP)]) == 0
    assert f"dw_conv_5x5 (plugin: {OP})" in capsys.readouterr().out.splitlines()
    config = tmp_path / "c.yaml"
    config.write_text(f"device: cuda\nplugins: [{RELAXATION}, {DISCRETIZER}]\n")
    assert main(["list", "relaxations", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"softmax_t (plugin: {RELAXATION})" in out and "softmax" in out
    assert main(["list", "discretizers", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert {"darts", "argmax", f"no_skip (plugin: {DISCRETIZER})"} <= set(out)
    assert main(["list", "penalties"]) == 0
    assert "latency" in capsys.readouterr().out.split()
    assert main(["list", "ops", "plugins=[/no/such/plugin.py]"]) == 2
    assert "is not a file" in capsys.readouterr().err


ENGINE = EXAMPLES / "my_engine.py"
TABULAR = [_plugins(ENGINE), "search.space={name: mlp_cell, hidden: 16}",
           "data.name=breast_cancer", "search.epochs=6", "retrain.epochs=40", "retrain.lr=0.01",
           "progress=false"]


def test_the_guide_s_engine_searches_retrains_and_resumes_a_new_kind_of_task(tmp_path,
                                                                            capsys):
    """docs/examples/plugins/my_engine.py: tabular classification, one file, run by the
    unchanged commands on real data (scikit-learn's breast cancer table)."""
    assert main(["search", *TABULAR, f"out_dir={tmp_path}", "name=r"]) == 0
    run = tmp_path / "r"
    assert Genotype.load(run / "search" / "genotype.json").space == "mlp_cell"
    assert (run / "search" / "DONE").is_file()
    result = json.loads((run / "retrain" / "result.json").read_text())
    assert result["test_acc"] > 0.85, result["test_acc"]  # the majority class is ~63%
    assert "test accuracy:" in capsys.readouterr().out
    # a finished run resumed: nothing is redone, the same result is printed again
    assert main(["search", "--resume", str(run)]) == 0
    again = json.loads((run / "retrain" / "result.json").read_text())
    assert again["test_acc"] == result["test_acc"]
    assert f"{100 * result['test_acc']:.2f}%" in capsys.readouterr().out
    assert main(["train", "--genotype", str(run / "search" / "genotype.json"), "--dry-run",
                 *TABULAR]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["features"] == 30 and summary["classes"] == 2


def test_the_guide_s_engine_runs_seeds_and_is_checked_like_a_built_in_one(tmp_path):
    from diffnas.config import ConfigError, load_config
    from diffnas.engine import multiseed as ms

    cfg = load_config(None, [*TABULAR, "search.strategy={name: gdas}", "retrain.epochs=5"])
    summary = ms.run_seeds(cfg, [0, 1], tmp_path / "seeds", workers=1, echo=False)
    assert summary["failed"] == [], [r.get("error") for r in summary["runs"]]
    assert all(r["test_acc"] is not None and r["genotype"]["space"] == "mlp_cell"
               for r in summary["runs"])
    page = (tmp_path / "seeds" / "summary.md").read_text()
    assert "## cell: how often each op was chosen per edge" in page  # (not "cell cell")
    for override, words in (("data.batch_size=8", "data.batch_size is not used by a tabular"),
                            ("data.root=my.csv", "data.root is not used by a tabular"),
                            ("data.name=digits", "'digits' is not a tabular dataset"),
                            ("retrain.momentum=0.5", "the tabular (my_engine.py) retraining"),
                            ("search.cuda_graph=true", "search.cuda_graph is for image "
                             "searches; the tabular (my_engine.py) search does not take it"),
                            ("search.cudnn_benchmark=true", "search.cudnn_benchmark is for"),
                            ("retrain.network={hidden: 0}", "retrain.network.hidden must be"),
                            ("retrain.network={hidden: -4}", "retrain.network.hidden must be")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [*TABULAR, override])


# --- docs/examples/plugins/quantum_engine.py: another domain, judged by its own Metric ---
QUANTUM = EXAMPLES / "quantum_engine.py"
VQE = [_plugins(QUANTUM), "search.space={name: qcircuit, qubits: 4, nodes: 6}",
       "data.name=tfim", "search.epochs=100", "retrain.epochs=100", "retrain.lr=0.05",
       "search.strategy={name: darts, w_optim: {lr: 0.1}, a_optim: {lr: 0.05}}",
       "progress=false"]


def _quantum():
    from diffnas.plugins import import_plugins

    (module,) = import_plugins([str(QUANTUM)])
    return module


def test_the_quantum_example_s_layers_are_the_exponentials_of_their_paulis():
    """Each layer equals the matrix exponential of its Pauli operators (kron over the
    qubits, qubit 0 the most significant bit), so it keeps a state's norm; the Hamiltonians'
    two-qubit ground energies are the known -sqrt(5) (critical Ising) and -3 (singlet)."""
    q = _quantum()
    n = 3
    torch.manual_seed(0)
    psi = torch.randn(2 ** n, dtype=torch.complex128)
    psi = psi / psi.norm()
    for axis in "XYZ":
        layer = q.Rotation(axis, n)
        u = reduce(torch.kron, [torch.linalg.matrix_exp(-0.5j * t * q.pauli_string({0: axis}, 1))
                                for t in layer.angles.detach()])
        assert torch.allclose(layer(psi), u @ psi, atol=1e-12)
    zz = q.ZZ(n)
    u = torch.eye(2 ** n, dtype=torch.complex128)
    for pair, t in enumerate(zz.angles.detach()):
        u = torch.linalg.matrix_exp(-0.5j * t * q.pauli_string({pair: "Z", pair + 1: "Z"}, n)) @ u
    assert torch.allclose(zz(psi), u @ psi, atol=1e-12)
    cz = torch.diag(torch.tensor([1, 1, 1, -1], dtype=torch.complex128))
    eye = torch.eye(2, dtype=torch.complex128)
    assert torch.allclose(q.CZ(n)(psi), torch.kron(eye, cz) @ torch.kron(cz, eye) @ psi)
    for name, ground in (("tfim", -5 ** 0.5), ("heisenberg", -3.0)):
        problem = q.load_problem(name, 2)
        assert torch.allclose(problem.h, problem.h.mH)
        assert problem.ground_energy == pytest.approx(ground, abs=1e-12)


def _best_product_energy(n: int) -> float:
    """The lowest critical-Ising energy of a product state (each spin at angle t_i in the
    x-z plane: E = -sum cos t_i cos t_(i+1) - sum sin t_i), minimised from many starts."""
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(64, n, generator=g, dtype=torch.float64) * 6.3).requires_grad_()
    opt = torch.optim.Adam([t], lr=0.05)
    for _ in range(2000):
        e = -(t[:, :-1].cos() * t[:, 1:].cos()).sum(1) - t.sin().sum(1)
        opt.zero_grad()
        e.sum().backward()
        opt.step()
    return float(e.min().detach())


def test_the_quantum_example_searches_a_circuit_below_every_product_state(tmp_path, capsys):
    """docs/examples/plugins/quantum_engine.py, a VQE on 4 qubits: the searched and
    retrained circuit ends below the lowest energy any unentangled state reaches (a circuit
    of rotations alone ends there), so the search kept an entangling layer; the unchanged
    commands resume it, size it and check its settings, and it reports its own Metric."""
    from diffnas.config import ConfigError, load_config

    assert main(["search", *VQE, f"out_dir={tmp_path}", "name=q"]) == 0
    run = tmp_path / "q"
    genotype = Genotype.load(run / "search" / "genotype.json")
    result = json.loads((run / "retrain" / "result.json").read_text())
    product = _best_product_energy(4)
    assert result["ground_energy"] == pytest.approx(-4.758770, abs=1e-6)
    assert result["ground_energy"] < result["energy"] < product - 0.1, (result, product)
    assert result["energy_error"] == pytest.approx(result["energy"] - result["ground_energy"])
    assert {"zz", "cz"} & {e.op for e in genotype.cell("circuit").edges}, genotype
    assert "exact ground energy -4.758770" in capsys.readouterr().out
    assert main(["search", "--resume", str(run)]) == 0
    assert f"error {result['energy_error']:.2e}" in capsys.readouterr().out
    assert main(["train", "--genotype", str(run / "search" / "genotype.json"), "--dry-run",
                 *VQE]) == 0
    sized = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert sized["angles"] == result["params"] and sized["qubits"] == 4
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "<th>Retrained energy error above the exact ground energy, best epoch (" in page
    for override, words in (
            ("search.strategy={name: random_labels}", "not supported by the quantum engine"),
            ("search.amp=bf16", "search.amp is for image searches; the quantum "
             "(quantum_engine.py) search does not take it"),
            ("data.name=cora", "'cora' is not a quantum problem dataset"),
            ("search.space.qubits=11", "search.space.qubits must be in 2..10"),
            ("data.batch_size=8", "data.batch_size is not used by a quantum-circuit run"),
            ("retrain.network={C: 8}", "the qcircuit space has no network settings, got C"),
            ("search.space.ops=[cz, skip_connect]", "search.space.ops must be a list with one "
             "of rx, ry, rz, zz at least"),
            ("search.space.ops=[]", "search.space.ops must be a list with one of")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(None, [*VQE, override])


@pytest.mark.parametrize("strategy", ["darts", "gdas"])
def test_the_quantum_example_resumed_equals_an_uninterrupted_run(tmp_path, strategy):
    """Cut after some epochs of search and of retraining, then resumed: the same alphas,
    genotype, angles and result as one uninterrupted run (GDAS: the same Gumbel samples,
    the lowest-energy epoch's angles kept in the checkpoint)."""
    from diffnas.config import load_config

    q = _quantum()
    cfg = load_config(None, [*VQE, "search.epochs=12", "retrain.epochs=12",
                             f"search.strategy={{name: {strategy}, a_optim: {{lr: 0.05}}}}"])
    _, _, full, again = cut_and_resumed(q.run_circuit_search, q.run_circuit_retrain, cfg,
                                        tmp_path, 5, 7)
    assert again["energy"] == full["energy"] and again["best_epoch"] == full["best_epoch"]
    assert again["history"] == full["history"]
