"""Rules of the worked domain engines in docs/examples/plugins that a mutation audit could
break, each replayed by hand on a tiny example rather than compared with numbers the code
once printed.

quantum_engine.py: the Hamiltonians (tfim, heisenberg) rebuilt from numpy kron products of
the Pauli matrices in complex128, the energies of known states, the exact ground energy
against ``numpy.linalg.eigvalsh``; every layer (rx, ry, rz, zz, cz) against its closed form
``cos(t/2) I - i sin(t/2) P`` and unitary; the supernet's normalised softmax-weighted
superposition replayed step by step, a one-hot weight giving exactly that circuit; the
circuit applying its layers in node order from ``|+...+>``; the space's settings at their
boundaries; the energy objective (err above the ground, non-finite refused); the
retraining's clipped Adam step and lowest-energy-epoch bookkeeping (kept, checkpointed,
restored, reported); the metric's direction.
"""

from __future__ import annotations

import copy
import math
import re
from functools import reduce

import numpy as np
import pytest
import torch
from test_extending_docs import QUANTUM, _quantum

from diffnas.config import ConfigError, load_config
from diffnas.genotype import Genotype
from diffnas.genotype.genotype import CellGenotype, Edge

# --- an independent model of the circuits: numpy, complex128 ------------------------------
I2 = np.eye(2, dtype=np.complex128)
PAULI = {"X": np.array([[0, 1], [1, 0]], dtype=np.complex128),
         "Y": np.array([[0, -1j], [1j, 0]], dtype=np.complex128),
         "Z": np.array([[1, 0], [0, -1]], dtype=np.complex128)}
ONE = np.diag([0, 1]).astype(np.complex128)  # |1><1|


def _at(mats: dict[int, np.ndarray], n: int) -> np.ndarray:
    """The kron product with ``mats[q]`` on qubit q (qubit 0 the most significant bit)."""
    return reduce(np.kron, [mats.get(q, I2) for q in range(n)])


def _np_hamiltonian(name: str, n: int) -> np.ndarray:
    pairs = [(q, q + 1) for q in range(n - 1)]
    if name == "tfim":
        return (-sum(_at({a: PAULI["Z"], b: PAULI["Z"]}, n) for a, b in pairs)
                - sum(_at({q: PAULI["X"]}, n) for q in range(n)))
    return sum(_at({a: PAULI[p], b: PAULI[p]}, n) for a, b in pairs for p in "XYZ")


def _exp_pauli(t: float, p: np.ndarray) -> np.ndarray:
    """exp(-i t/2 P) for an operator P with P @ P = I."""
    return math.cos(t / 2) * np.eye(len(p)) - 1j * math.sin(t / 2) * p


def _np_layer(name: str, angles: np.ndarray, n: int) -> np.ndarray:
    """The 2^n x 2^n unitary of a layer, from its closed form."""
    if name == "skip_connect":
        return np.eye(2 ** n, dtype=np.complex128)
    if name in ("rx", "ry", "rz"):
        return reduce(np.kron, [_exp_pauli(t, PAULI[name[1].upper()]) for t in angles])
    u = np.eye(2 ** n, dtype=np.complex128)
    for q in range(n - 1):
        if name == "zz":
            u = _exp_pauli(angles[q], _at({q: PAULI["Z"], q + 1: PAULI["Z"]}, n)) @ u
        else:  # cz: -1 on |11> of the pair
            u = (np.eye(2 ** n) - 2 * _at({q: ONE, q + 1: ONE}, n)) @ u
    return u


def _plus(n: int) -> np.ndarray:
    return np.full(2 ** n, 2 ** (-n / 2), dtype=np.complex128)


def _angles(layer: torch.nn.Module) -> np.ndarray:
    return layer.angles.detach().numpy() if hasattr(layer, "angles") else np.zeros(0)


def _matrix(layer: torch.nn.Module, n: int) -> np.ndarray:
    """The layer's matrix, column k its output on basis state k."""
    eye = torch.eye(2 ** n, dtype=torch.complex128)
    with torch.no_grad():
        return torch.stack([layer(eye[k]) for k in range(2 ** n)], 1).numpy()


def _random_state(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    psi = rng.normal(size=2 ** n) + 1j * rng.normal(size=2 ** n)
    return psi / np.linalg.norm(psi)


def _cfg(*extra: str, qubits: int = 3, nodes: int = 3, problem: str = "tfim"):
    return load_config(None, [f"plugins=[{QUANTUM}]", "progress=false",
                              f"search.space={{name: qcircuit, qubits: {qubits}, "
                              f"nodes: {nodes}}}", f"data.name={problem}", *extra])


def _genotype(ops: list[str]) -> Genotype:
    """A chain circuit: node j is ops[j - 1] applied to node j - 1."""
    edges = tuple(Edge(op, j - 1, j) for j, op in enumerate(ops, 1))
    return Genotype("qcircuit", (CellGenotype("circuit", edges, (len(ops),)),))


# --- the problems --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tfim", "heisenberg"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_hamiltonians_are_their_pauli_sums_and_ground_is_their_lowest_eigenvalue(name, n):
    """The open-chain Hamiltonian equals the kron sum written out by hand (no periodic
    bond, every sign and every field term), and the problem's ground energy is its lowest
    eigenvalue (below every random state's energy)."""
    q = _quantum()
    h = _np_hamiltonian(name, n)
    assert np.allclose(q.hamiltonian(name, n).numpy(), h, atol=1e-12)
    problem = q.load_problem(name, n)
    assert problem.ground_energy == pytest.approx(np.linalg.eigvalsh(h)[0], abs=1e-10)
    psi = _random_state(n, 0)
    assert problem.ground_energy < float(np.vdot(psi, h @ psi).real)


@pytest.mark.parametrize("n", [2, 3])
def test_the_energy_of_known_states(n):
    """<+..+|H_tfim|+..+> = -n (only the field counts), <0..0|H_tfim|0..0> = -(n - 1)
    (only the bonds), <0..0|H_heis|0..0> = n - 1; a random complex state's energy is
    psi^H H psi (the conjugate taken), real."""
    q = _quantum()
    tfim, heis = q.load_problem("tfim", n), q.load_problem("heisenberg", n)
    zeros = torch.zeros(2 ** n, dtype=torch.complex128)
    zeros[0] = 1
    plus = torch.from_numpy(_plus(n))
    assert float(tfim.energy(plus)) == pytest.approx(-n, abs=1e-12)
    assert float(tfim.energy(zeros)) == pytest.approx(-(n - 1), abs=1e-12)
    assert float(heis.energy(zeros)) == pytest.approx(n - 1, abs=1e-12)
    for problem, name in ((tfim, "tfim"), (heis, "heisenberg")):
        psi = _random_state(n, 1)
        want = np.vdot(psi, _np_hamiltonian(name, n) @ psi)
        assert abs(want.imag) < 1e-12
        assert float(problem.energy(torch.from_numpy(psi))) == pytest.approx(want.real,
                                                                             abs=1e-12)


def test_an_unknown_problem_is_refused_by_name():
    q = _quantum()
    with pytest.raises(ConfigError, match=re.escape("data.name: 'ising' is not a quantum "
                                                    "problem; one of tfim, heisenberg")):
        q.hamiltonian("ising", 2)


# --- the layers --------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["skip_connect", "rx", "ry", "rz", "zz", "cz"])
def test_each_layer_is_its_closed_form_unitary(op):
    """On 3 qubits with distinct angles, each layer's matrix is the kron product of
    ``cos(t/2) I - i sin(t/2) P`` per qubit (rx, ry, rz), the product of the pairs'
    ``exp(-i t/2 Z Z)`` (zz) or of ``I - 2 |11><11|`` (cz), and is unitary."""
    q = _quantum()
    n = 3
    torch.manual_seed(3)
    layer = q._op(op, n)
    if hasattr(layer, "angles"):
        with torch.no_grad():  # distinct, larger than the initial range: every qubit counts
            layer.angles.copy_(torch.linspace(0.3, 2.9, layer.angles.numel(),
                                              dtype=torch.float64))
    u = _matrix(layer, n)
    assert np.allclose(u, _np_layer(op, _angles(layer), n), atol=1e-12)
    assert np.allclose(u.conj().T @ u, np.eye(2 ** n), atol=1e-12)


# --- the supernet and the derived circuit -----------------------------------------------
def _supernet(nodes: int, seed: int):
    """A 3-qubit qcircuit space of ``nodes`` layers, its supernet (angles drawn from
    ``seed``) and its ops in column order."""
    space = _quantum()._space(_cfg(qubits=3, nodes=nodes))
    torch.manual_seed(seed)
    return space, space.build_supernet(), list(space.config.ops)


def test_the_supernet_is_the_normalised_weighted_superposition_of_its_layers():
    """Node j = sum_k w_jk U_jk psi_(j-1), divided by its 2-norm, from |+...+>; replayed
    with the layers' closed forms: the output is a unit vector equal to the replay."""
    space, net, ops = _supernet(nodes=3, seed=0)
    w = torch.softmax(torch.randn(3, len(ops), dtype=torch.float64) * 2, -1)
    with torch.no_grad():
        out = net(None, {"circuit": w}).numpy()
    psi = _plus(3)
    for j in range(3):
        mixed = sum(w[j, k].item() * _np_layer(o, _angles(net.layers[j][k]), 3) @ psi
                    for k, o in enumerate(ops))
        psi = mixed / np.linalg.norm(mixed)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(out, psi, atol=1e-12)


def test_a_one_hot_weight_gives_exactly_that_circuit_in_node_order():
    """One-hot weights pick one layer per node: the supernet's output is that circuit,
    i.e. the derived network (edges given out of order) with the same angles, which is
    U_n ... U_1 |+...+> by hand."""
    space, net, ops = _supernet(nodes=4, seed=1)
    chosen = ["ry", "zz", "rx", "cz"]
    w = torch.zeros(4, len(ops), dtype=torch.float64)
    for j, o in enumerate(chosen):
        w[j, ops.index(o)] = 1
    g = _genotype(chosen)
    shuffled = Genotype("qcircuit", (CellGenotype(
        "circuit", tuple(reversed(g.cell("circuit").edges)), (4,)),))
    circuit = space.build_network(shuffled)
    assert circuit.names == chosen
    for j, o in enumerate(chosen):
        circuit.layers[j].load_state_dict(net.layers[j][ops.index(o)].state_dict())
    psi = _plus(3)
    for layer, o in zip(circuit.layers, chosen, strict=True):
        psi = _np_layer(o, _angles(layer), 3) @ psi
    with torch.no_grad():
        assert np.allclose(net(None, {"circuit": w}).numpy(), psi, atol=1e-12)
        assert np.allclose(circuit().numpy(), psi, atol=1e-12)


def test_a_circuit_of_skips_outputs_the_normalised_plus_state():
    q = _quantum()
    space = q._space(_cfg(qubits=3, nodes=2))
    with torch.no_grad():
        out = space.build_network(_genotype(["skip_connect", "skip_connect"]))().numpy()
    assert np.allclose(out, _plus(3), atol=1e-15)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-15)


def test_the_network_refuses_settings_it_does_not_have():
    q = _quantum()
    space = q._space(_cfg())
    with pytest.raises(ConfigError, match="the qcircuit space has no network settings, got C"):
        space.build_network(_genotype(["rx", "cz", "rz"]), C=8)


# --- the space's settings ----------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    ({"qubits": 1}, "search.space.qubits must be in 2..10"),
    ({"qubits": 11}, "search.space.qubits must be in 2..10"),
    ({"nodes": 0}, "search.space.nodes must be >= 1"),
    ({"ops": ["rx", "cz", "rx"]}, "search.space.ops must be without repeats"),
    ({"ops": ["rx", "rw"]}, "unknown circuit op(s) ['rw']"),
])
def test_the_space_refuses_bad_settings_by_name(kw, words):
    q = _quantum()
    with pytest.raises((ConfigError, ValueError), match=re.escape(words)):
        q.QCircuitConfig(**kw)


@pytest.mark.parametrize("kw", [{"qubits": 2}, {"qubits": 10}, {"nodes": 1},
                                {"ops": ["cz", "rx"]}, {"ops": ["skip_connect", "zz"]}])
def test_the_space_accepts_its_boundaries(kw):
    """2 and 10 qubits, one node, and an op list with one angled layer among angle-free
    ones are all valid."""
    q = _quantum()
    config = q.QCircuitConfig(**kw)
    assert all(getattr(config, k) == v for k, v in kw.items())


# --- the objective -----------------------------------------------------------------------
def test_the_objective_is_the_energy_and_err_is_its_height_above_the_ground():
    q = _quantum()
    problem = q.load_problem("heisenberg", 3)
    objective = q.EnergyObjective(problem)
    h = _np_hamiltonian("heisenberg", 3)
    ground = np.linalg.eigvalsh(h)[0]
    for seed in range(3):
        psi = _random_state(3, seed)
        loss, stats = objective(torch.from_numpy(psi), None)
        energy = float(np.vdot(psi, h @ psi).real)
        assert float(loss) == pytest.approx(energy, abs=1e-12)
        assert stats["loss"] == pytest.approx(energy, abs=1e-12)
        assert stats["err"] == pytest.approx(energy - ground, abs=1e-10)
        assert stats["err"] > 0


def test_a_non_finite_energy_stops_the_run():
    q = _quantum()
    objective = q.EnergyObjective(q.load_problem("tfim", 2))
    bad = torch.full((4,), float("nan"), dtype=torch.complex128)
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        objective(bad, None)


def test_the_search_reports_the_supernet_s_energy_and_its_error():
    """A search epoch's ``eval_err`` is its ``eval_energy`` above the exact ground."""
    q = _quantum()
    cfg = _cfg("search.epochs=2")
    problem = q._problem(cfg)
    task = q.CircuitSearchTask(cfg, problem, torch.device("cpu"))
    for batch in task.batches(0):
        task.step(batch)
    row = task.end_epoch(0)
    assert row["eval_err"] == pytest.approx(row["eval_energy"] - problem.ground_energy,
                                            abs=1e-12)


# --- the retraining ------------------------------------------------------------------------
def _train_task(q, ops: list[str], *extra: str):
    cfg = _cfg(*extra, qubits=3, nodes=len(ops))
    torch.manual_seed(0)
    model = q._space(cfg).build_network(_genotype(ops))
    return q.CircuitTrainTask(model, q._problem(cfg), cfg), cfg


def test_a_retraining_step_is_adam_on_the_energy_with_the_gradient_clipped():
    """Three steps equal Adam(lr) replayed on a twin whose gradient norm is clipped to
    retrain.grad_clip (small enough to bite) before each step."""
    q = _quantum()
    task, cfg = _train_task(q, ["ry", "zz", "rx"], "retrain.grad_clip=0.01",
                            "retrain.lr=0.2")
    twin = copy.deepcopy(task.model)
    opt = torch.optim.Adam(twin.parameters(), lr=0.2)
    h = q._problem(cfg).h
    clipped = False
    for _ in range(3):
        task.step(None)
        psi = twin()
        loss = torch.vdot(psi, h @ psi).real
        opt.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in twin.parameters()))
        clipped |= norm > 0.01
        for p in twin.parameters():
            p.grad.mul_(min(1.0, 0.01 / (norm + 1e-6)))
        opt.step()
    assert clipped
    for a, b in zip(task.model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_the_retraining_keeps_the_lowest_energy_epoch_s_angles():
    """With a large learning rate the energy goes up and down: the task's best is the
    minimum over its epochs (its epoch, its energy, a copy of its angles that later steps
    do not move), and ``best_err`` is the running minimum of ``err``."""
    q = _quantum()
    task, _ = _train_task(q, ["ry", "zz", "rx", "zz"], "retrain.lr=0.8",
                          "retrain.grad_clip=100")
    rows, states = [], []
    for epoch in range(12):
        task.step(None)
        rows.append(task.end_epoch(epoch))
        states.append(copy.deepcopy(task.model.state_dict()))
    energies = [r["energy"] for r in rows]
    best = int(np.argmin(energies))
    assert best != len(energies) - 1 and energies[-1] > min(energies)  # the setting bites
    assert task.best["epoch"] == best and task.best["energy"] == min(energies)
    for k, t in task.best["state"].items():
        assert torch.equal(t, states[best][k])
    for i, r in enumerate(rows):
        assert r["err"] == pytest.approx(r["energy"] - task.problem.ground_energy)
        assert r["best_err"] == pytest.approx(min(energies[:i + 1])
                                              - task.problem.ground_energy)


def test_a_resumed_retraining_keeps_the_best_epoch_from_before_the_cut():
    """The checkpoint (through torch.save) holds the lowest-energy epoch: a task resumed
    after the cut and run on ends with the same best (epoch, energy, angles) as the
    uninterrupted one, even where the best epoch lies before the cut."""
    import io

    q = _quantum()
    args = (["ry", "zz", "rx", "zz"], "retrain.lr=0.8", "retrain.grad_clip=100")
    whole, _ = _train_task(q, *args)
    cut, _ = _train_task(q, *args)
    for task, epochs in ((whole, range(12)), (cut, range(10))):
        for epoch in epochs:
            task.step(None)
            task.end_epoch(epoch)
    buffer = io.BytesIO()
    torch.save(cut.state_dict(), buffer)
    buffer.seek(0)
    resumed, _ = _train_task(q, *args)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    rows = []
    for epoch in range(10, 12):
        resumed.step(None)
        rows.append(resumed.end_epoch(epoch))
    assert whole.best["epoch"] < 10  # the best lies before the cut (the setting bites)
    assert resumed.best["epoch"] == whole.best["epoch"]
    assert resumed.best["energy"] == whole.best["energy"]
    assert all(torch.equal(resumed.best["state"][k], t) for k, t in whole.best["state"].items())
    assert rows[-1]["best_err"] == pytest.approx(whole.best["energy"]
                                                 - whole.problem.ground_energy)


def test_a_circuit_without_angles_retrains_without_an_optimizer():
    q = _quantum()
    task, _ = _train_task(q, ["cz", "skip_connect"])
    assert task.optimizer is None
    first = task.step(None)
    assert task.step(None) == first and task.end_epoch(0)["energy"] == first["loss"]


def test_a_retraining_ends_on_its_best_epoch_and_counts_its_angles(tmp_path, capsys):
    """run_circuit_retrain: the result's energy is the lowest epoch's (not the last), its
    best_epoch that epoch, its params the angles (3 per rotation, 2 per zz on 3 qubits),
    the same whatever the global random state before; the summary counts the same angles
    and the printed result names the epoch 1-based."""
    q = _quantum()
    ops = ["ry", "zz", "rx", "zz", "cz"]
    cfg = _cfg("retrain.epochs=12", "retrain.lr=0.8", "retrain.grad_clip=100",
               qubits=3, nodes=len(ops))
    g = _genotype(ops)
    torch.manual_seed(123)
    result = q.run_circuit_retrain(cfg, g, tmp_path / "a")
    energies = [r["energy"] for r in result["history"]]
    assert energies[-1] > min(energies)
    assert result["best_epoch"] == int(np.argmin(energies))
    assert result["energy"] == pytest.approx(min(energies), abs=1e-12)
    assert result["energy_error"] == pytest.approx(result["energy"]
                                                   - result["ground_energy"])
    assert result["params"] == 3 + 2 + 3 + 2
    assert q.circuit_summary(cfg, g)["angles"] == 3 + 2 + 3 + 2
    torch.manual_seed(7)
    assert q.run_circuit_retrain(cfg, g, tmp_path / "b")["energy"] == result["energy"]
    capsys.readouterr()
    q.print_circuit_result(g, result)
    out = capsys.readouterr().out
    assert f"lowest-energy epoch {result['best_epoch'] + 1}) after 12 epochs" in out


@pytest.mark.parametrize("setting", ["lr_min=0.001", "momentum=0.5", "weight_decay=0.1",
                                     "batch_size=7"])
def test_retrain_settings_the_circuit_does_not_read_are_refused(setting):
    """The retraining is Adam at a constant ``lr`` on one state: a changed lr_min,
    momentum, weight_decay or batch_size would be silently ignored, so it is refused."""
    name = setting.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(f"retrain.{name}: the quantum")):
        _cfg(f"retrain.{setting}")


def test_the_energy_error_metric_is_lower_is_better():
    q = _quantum()
    assert q.ENERGY_ERROR.lower_is_better
    assert q.ENERGY_ERROR.key == "energy_error" and q.ENERGY_ERROR.search_key == "eval_err"


# === rl_engine.py ===========================================================================
def _ppo_batch(ratios: list[float], adv: list[float], seed: int = 0):
    """A minibatch whose acting log-probabilities make the given policy ratios."""
    g = torch.Generator().manual_seed(seed)
    n, a = len(ratios), 3
    logits = torch.randn(n, a, generator=g, dtype=torch.float64)
    value = torch.randn(n, generator=g, dtype=torch.float64)
    actions = torch.randint(0, a, (n,), generator=g)
    logp = torch.log_softmax(logits, -1)[torch.arange(n), actions]
    batch = {"obs": torch.zeros(n, 1), "actions": actions,
             "logp": logp - torch.tensor(ratios, dtype=torch.float64).log(),
             "advantages": torch.tensor(adv, dtype=torch.float64),
             "returns": torch.randn(n, generator=g, dtype=torch.float64)}
    return (logits, value), batch, logp


def test_the_ppo_loss_is_the_clipped_surrogate_plus_value_minus_entropy():
    """Ratios on both sides of [1 - clip, 1 + clip] (and inside, and beyond 1 + 2 clip)
    with advantages of both signs: loss = -mean(min(r A, clip(r) A)) on the normalised
    advantages + value_coef * 0.5 mean((R - V)^2) - entropy_coef * entropy; approx_kl is
    mean(logp_old - logp)."""
    from test_rl_example import _rl

    rl = _rl()
    settings = rl.PPOSettings(clip=0.2, value_coef=0.7, entropy_coef=0.05)
    ratios = [0.5, 0.9, 1.1, 1.3, 1.5, 2.0, 0.7, 1.25]
    adv = [1.0, -2.0, 0.5, 3.0, -1.0, 2.5, -0.5, 1.5]
    (logits, value), batch, logp = _ppo_batch(ratios, adv)
    loss, stats = rl.PPOObjective(settings)((logits, value), batch)
    a = np.array(adv)
    a = (a - a.mean()) / (a.std(ddof=1) + 1e-8)
    r = np.array(ratios)
    policy = -np.mean(np.minimum(r * a, np.clip(r, 0.8, 1.2) * a))
    value_loss = 0.5 * np.mean((batch["returns"].numpy() - value.numpy()) ** 2)
    p = torch.softmax(logits, -1).numpy()
    entropy = -np.mean((p * np.log(p)).sum(-1))
    assert stats["policy_loss"] == pytest.approx(policy, abs=1e-9)
    assert stats["value_loss"] == pytest.approx(value_loss, abs=1e-12)
    assert stats["entropy"] == pytest.approx(entropy, abs=1e-12)
    assert float(loss) == pytest.approx(policy + 0.7 * value_loss - 0.05 * entropy, abs=1e-9)
    assert stats["approx_kl"] == pytest.approx(float((batch["logp"] - logp).mean()), abs=1e-12)
    assert stats["approx_kl"] == pytest.approx(-np.mean(np.log(r)), abs=1e-12)


def test_a_non_finite_ppo_loss_stops_the_run():
    from test_rl_example import _rl

    rl = _rl()
    (logits, value), batch, _ = _ppo_batch([1.0, 1.0], [1.0, -1.0])
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        rl.PPOObjective(rl.PPOSettings())((logits, value * float("nan")), batch)


@pytest.mark.parametrize("n, size, passes", [(10, 4, 3), (8, 4, 2), (5, 7, 1)])
def test_minibatches_cover_the_rollout_once_per_pass(n, size, passes):
    """Each pass is a permutation of every transition in chunks of ``size`` (the last one
    smaller); steps_per_epoch counts exactly the minibatches yielded."""
    from test_rl_example import _rl

    rl = _rl()
    rollout = {"obs": torch.arange(n), "returns": torch.arange(n) * 10}
    parts = list(rl.minibatches(rollout, size, passes))
    per_pass = -(-n // size)
    assert len(parts) == passes * per_pass == rl.steps_per_epoch(n, size, passes)
    for k in range(passes):
        chunk = parts[k * per_pass:(k + 1) * per_pass]
        assert [len(p["obs"]) for p in chunk] == [min(size, n - i) for i in range(0, n, size)]
        assert sorted(torch.cat([p["obs"] for p in chunk]).tolist()) == list(range(n))
        assert all(torch.equal(p["returns"], p["obs"] * 10) for p in chunk)


@pytest.mark.parametrize("envs", [1, 3, 8])
def test_training_seeds_never_overlap_across_runs_phases_or_the_test_episodes(envs):
    """The envs seeds [s, s + envs) of (seed, search) and (seed, retrain), seeds 0..5, are
    pairwise disjoint and below TEST_SEED."""
    from test_rl_example import _rl

    rl = _rl()
    used: set[int] = set()
    for seed in range(6):
        for phase in ("search", "retrain"):
            first = rl.training_seed(seed, phase, envs)
            block = set(range(first, first + envs))
            assert not block & used, (seed, phase)
            assert max(block) < rl.TEST_SEED
            used |= block


def test_environments_start_from_their_own_seeds():
    """Copy i of ``Envs(name, count, seed)`` starts where gymnasium's env reset with
    seed + i starts."""
    import gymnasium
    from test_rl_example import _rl

    rl = _rl()
    envs = rl.Envs("CartPole-v1", 3, seed=5)
    for i in range(3):
        env = gymnasium.make("CartPole-v1")
        want = torch.tensor(env.reset(seed=5 + i)[0], dtype=torch.float32)
        env.close()
        assert torch.equal(envs.obs[i], want)


def test_episodes_end_at_the_step_limit_and_recent_return_is_the_last_ten():
    """A step limit of 5 with a push-left policy (CartPole fails later): every episode is
    cut after exactly 5 steps (return 5); with the limit lifted, the recent return is the
    mean of the last RECENT episode returns counted by hand."""
    from test_rl_example import _rl

    rl = _rl()
    envs = rl.Envs("CartPole-v1", 2, seed=0)
    envs.limit = 5
    left = torch.zeros(2, dtype=torch.long)
    for t in range(1, 16):
        _, done, truncated = envs.step(left)
        assert done.tolist() == [float(t % 5 == 0)] * 2 and len(truncated) == 2 * (t % 5 == 0)
    assert envs.finished == [5.0] * 6 and envs.recent_return() == 5.0
    envs = rl.Envs("CartPole-v1", 3, seed=1)
    g = torch.Generator().manual_seed(0)
    running, ended = [0.0] * 3, []
    for _ in range(200):
        rewards, done, _ = envs.step(torch.randint(0, 2, (3,), generator=g))
        for i in range(3):
            running[i] += float(rewards[i])
            if done[i]:
                ended.append(running[i])
                running[i] = 0.0
    assert len(ended) > rl.RECENT
    assert envs.finished == ended[-rl.RECENT:] and envs.episodes == len(ended)
    assert envs.recent_return() == pytest.approx(sum(ended[-rl.RECENT:]) / rl.RECENT)


def test_the_greedy_test_counts_each_test_episode_once():
    """test_return with a push-left policy equals the mean length of the first episode of
    gymnasium environments reset with seeds TEST_SEED + i, stepped by hand: rewards of an
    episode restarted after its end are not counted."""
    import gymnasium
    from test_rl_example import _rl

    rl = _rl()
    lengths = []
    for i in range(4):
        env = gymnasium.make("CartPole-v1")
        env.reset(seed=rl.TEST_SEED + i)
        steps, over = 0, False
        while not over:
            _, _, terminated, truncated, _ = env.step(0)
            steps, over = steps + 1, terminated or truncated
        env.close()
        lengths.append(steps)
    assert len(set(lengths)) > 1  # episodes of different lengths: restarts would count
    left = rl.test_return(lambda o: torch.tensor([[1.0, 0.0]]).expand(len(o), 2),
                          "CartPole-v1", episodes=4)
    assert left == pytest.approx(sum(lengths) / 4)


def test_an_unknown_environment_is_refused_by_name():
    from test_rl_example import _rl

    rl = _rl()
    with pytest.raises(ConfigError, match=re.escape("data.name: 'Pendulum-v1' is not an "
                                                    "environment of the rl engine")):
        rl.env_shape("Pendulum-v1")


def _rl_space(*extra: str):
    from test_rl_example import CARTPOLE, _rl

    rl = _rl()
    cfg = load_config(None, [*CARTPOLE, "search.space={name: rl_encoder, hidden: 6, nodes: 3}",
                             *extra])
    return rl, cfg, rl._space(cfg)


def test_the_encoder_supernet_with_one_hot_weights_is_its_agent():
    """One-hot weights on a genotype's ops (``none`` elsewhere): the supernet's logits and
    value equal the Agent built from that genotype with the same weights, which equals
    the cell replayed by hand (tanh of the stem, each node its op of its source, the heads
    on the concatenated intermediate nodes)."""
    rl, _, space = _rl_space()
    kept = {1: ("linear_relu", 0), 2: ("linear_ln_relu", 1), 3: ("linear_tanh", 1)}
    edges = tuple(Edge(op, src, dst) for dst, (op, src) in kept.items())
    g = Genotype("rl_encoder", (CellGenotype("encoder", edges, (1, 2, 3)),))
    torch.manual_seed(0)
    net = space.build_supernet().double()
    agent = space.build_network(g).double()
    ops = list(space.config.ops)
    labels = [(src, dst) for dst in range(1, 4) for src in range(dst)]
    w = torch.zeros(len(labels), len(ops), dtype=torch.float64)
    for e, (src, dst) in enumerate(labels):
        op = kept[dst][0] if kept[dst][1] == src else "none"
        w[e, ops.index(op)] = 1
        if op != "none":
            agent.edges[[x.dst for x in edges].index(dst)].load_state_dict(
                net.edges[e][ops.index(op)].state_dict())
    agent.stem.load_state_dict(net.stem.state_dict())
    agent.heads.load_state_dict(net.heads.state_dict())
    obs = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        logits, value = net(obs, {"encoder": w})
        a_logits, a_value = agent(obs)
        h = {0: torch.tanh(agent.stem(obs))}
        for (dst, _), op in zip(kept.items(), agent.edges, strict=True):
            h[dst] = op(h[kept[dst][1]])
        want_logits, want_value = agent.heads(torch.cat([h[1], h[2], h[3]], -1))
    assert torch.allclose(logits, want_logits, atol=1e-12)
    assert torch.allclose(value, want_value, atol=1e-12)
    assert torch.allclose(a_logits, want_logits, atol=1e-12)
    assert torch.allclose(a_value, want_value, atol=1e-12)


@pytest.mark.parametrize("kw, ok", [({"nodes": 32}, True), ({"nodes": 33}, False),
                                    ({"nodes": 0}, False), ({"hidden": 1}, True),
                                    ({"hidden": 0}, False)])
def test_the_encoder_space_s_bounds(kw, ok):
    from test_rl_example import _rl

    rl = _rl()
    if ok:
        rl.EncoderConfig(**kw)
    else:
        (key,) = kw
        with pytest.raises(ConfigError, match=re.escape(f"search.space.{key} must be")):
            rl.EncoderConfig(**kw)


@pytest.mark.parametrize("setting", ["engine={gamma: 0}", "engine={lam: 0}",
                                     "engine={gamma: 1, lam: 1}", "retrain.batch_size=512",
                                     "data.batch_size=256"])
def test_the_rl_settings_accept_their_boundaries(setting):
    """gamma and lam in [0, 1] closed; a retraining minibatch as large as a rollout
    (8 x 64), a bilevel search minibatch as large as its half."""
    _rl_space(setting)


def test_an_rl_retraining_step_is_adam_on_the_ppo_loss_with_the_gradient_clipped():
    """AgentTrainTask.step on a hand-made minibatch equals Adam replayed on a twin whose
    gradient norm is clipped to retrain.grad_clip."""
    rl, cfg, space = _rl_space("retrain.grad_clip=0.01", "retrain.lr=0.05")
    g = Genotype("rl_encoder", (CellGenotype("encoder", (
        Edge("linear_relu", 0, 1), Edge("linear_tanh", 1, 2), Edge("skip_connect", 0, 3)),
        (1, 2, 3)),))
    torch.manual_seed(0)
    model = space.build_network(g)
    twin = copy.deepcopy(model)
    task = rl.AgentTrainTask(model, cfg, torch.device("cpu"))
    opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    objective = rl.PPOObjective(rl.PPOSettings())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = {"obs": torch.randn(16, 4, generator=gen),
                 "actions": torch.randint(0, 2, (16,), generator=gen),
                 "logp": torch.full((16,), math.log(0.5)),
                 "advantages": torch.randn(16, generator=gen),
                 "returns": torch.randn(16, generator=gen) * 5}
        task.step(batch)
        loss, _ = objective(twin(batch["obs"]), batch)
        opt.zero_grad()
        loss.backward()
        norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in twin.parameters()))
        assert norm > 0.01
        for p in twin.parameters():
            p.grad.mul_(0.01 / (norm + 1e-6))
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_the_mean_return_metric_is_higher_is_better():
    from test_rl_example import _rl

    assert not _rl().MEAN_RETURN.lower_is_better
