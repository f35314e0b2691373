"""A worked engine for another domain (docs/extending.md, "An engine"): searching the
layers of a variational quantum circuit, added by this one file.

The task is a variational quantum eigensolver (VQE): find the circuit whose output state
has the lowest energy under a Hamiltonian. The "datasets" are two spin chains of
``search.space.qubits`` qubits (open ends), whose exact ground energy is known from
diagonalising the Hamiltonian, so every run reports how far above it the circuit ends:

- ``tfim``: the transverse-field Ising chain at its critical point,
  ``H = -sum_i Z_i Z_{i+1} - sum_i X_i``;
- ``heisenberg``: the antiferromagnetic Heisenberg chain,
  ``H = sum_i (X_i X_{i+1} + Y_i Y_{i+1} + Z_i Z_{i+1})``.

The space ``qcircuit`` is a chain of ``nodes`` layers: node 0 is ``|+...+>``, node ``j``
is one layer applied to node ``j - 1``, chosen among ``skip_connect`` (no layer), ``rx``,
``ry``, ``rz`` (a rotation of every qubit, one angle each), ``zz`` (``exp(-i t/2 Z Z)`` on
every neighbouring pair, one angle each) and ``cz`` (a controlled-Z on every neighbouring
pair, no angle). In the supernet an edge's output is the softmax(alpha)-weighted sum of
its candidates' output states, normalised (a superposition of circuits, the continuous
relaxation of DARTS); with GDAS's hard samples every pass is a real circuit. The engine
``quantum`` searches it with any diffnas strategy but ``random_labels`` (angles are the
weights; there is no data and no label, so both levels minimise the energy) and
retrains the derived circuit from fresh angles with Adam, keeping the angles of its
lowest-energy epoch. Its runs are judged by a
:class:`~diffnas.engine.engines.Metric` of their own: the energy error above the exact
ground energy (lower is better), in ``--seeds`` summaries and ``diffnas report``.

    diffnas search "plugins=[docs/examples/plugins/quantum_engine.py]" \\
        search.space.name=qcircuit data.name=tfim search.epochs=300 \\
        "search.strategy={name: darts, w_optim: {lr: 0.1}, a_optim: {lr: 0.05}}" \\
        retrain.epochs=300 retrain.lr=0.05
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffnas.arch import ArchParams
from diffnas.config import ConfigError, RunConfig, require
from diffnas.engine.callbacks import counted
from diffnas.engine.checkpoint import seed_everything
from diffnas.engine.engines import (
    Engine,
    Metric,
    refuse_image_search_settings,
    register_engine,
)
from diffnas.engine.loop import Loop
from diffnas.engine.retrain import retrain_dir, run_retrain_loop, save_retrain_result
from diffnas.engine.rundir import resolve_device
from diffnas.engine.search import (
    StrategyTask,
    run_search_loop,
    search_callbacks,
)
from diffnas.genotype import CellGenotype, Genotype
from diffnas.spaces import DataShape, EdgeSpec, SearchSpace, create_space, register_space
from diffnas.strategies import create_strategy
from diffnas.strategies.objective import check_finite_loss

CELL = "circuit"
MAX_QUBITS = 10  # the Hamiltonian is a dense 2^n x 2^n matrix
DTYPE = torch.complex128  # exact enough to compare with the diagonalised ground energy


# --- the problems (this engine's "datasets") ------------------------------------------------
_PAULI = {"I": [[1, 0], [0, 1]], "X": [[0, 1], [1, 0]], "Y": [[0, -1j], [1j, 0]],
          "Z": [[1, 0], [0, -1]]}


def pauli_string(ops: dict[int, str], qubits: int) -> torch.Tensor:
    """The 2^n x 2^n matrix of a product of Pauli operators (``{qubit: "X"}``; qubit 0 is
    the most significant bit of a basis index)."""
    mats = [torch.tensor(_PAULI[ops.get(q, "I")], dtype=DTYPE) for q in range(qubits)]
    return reduce(torch.kron, mats)


PROBLEMS = ("tfim", "heisenberg")


def hamiltonian(name: str, qubits: int) -> torch.Tensor:
    """The Hamiltonian of problem ``name`` on an open chain of ``qubits`` qubits."""
    pairs = [(q, q + 1) for q in range(qubits - 1)]
    if name == "tfim":
        terms = [-pauli_string({a: "Z", b: "Z"}, qubits) for a, b in pairs] + \
                [-pauli_string({q: "X"}, qubits) for q in range(qubits)]
    elif name == "heisenberg":
        terms = [pauli_string({a: p, b: p}, qubits) for a, b in pairs for p in "XYZ"]
    else:
        raise ConfigError(f"data.name: {name!r} is not a quantum problem; one of "
                          f"{', '.join(PROBLEMS)}")
    return sum(terms)


@dataclass
class Problem:
    """A Hamiltonian and its exact ground energy (its lowest eigenvalue)."""

    name: str
    qubits: int
    h: torch.Tensor
    ground_energy: float

    def energy(self, psi: torch.Tensor) -> torch.Tensor:
        """<psi|H|psi> of a normalised state (a real scalar tensor, differentiable)."""
        return torch.vdot(psi, self.h @ psi).real


def load_problem(name: str, qubits: int, device: torch.device | str = "cpu") -> Problem:
    h = hamiltonian(name, qubits)
    ground = float(torch.linalg.eigvalsh(h)[0])
    return Problem(name, qubits, h.to(device), ground)


# --- the ops: layers acting on a state vector of 2^n amplitudes ----------------------------
def _bits(qubits: int) -> torch.Tensor:
    """(2^n, n) the bits of each basis index, qubit 0 first."""
    index = torch.arange(2 ** qubits)
    return torch.stack([(index >> (qubits - 1 - q)) & 1 for q in range(qubits)], 1)


class Rotation(nn.Module):
    """``exp(-i t_q / 2 P)`` on every qubit q (P = X, Y or Z), one angle each."""

    def __init__(self, axis: str, qubits: int) -> None:
        super().__init__()
        self.axis, self.qubits = axis, qubits
        self.angles = nn.Parameter(torch.empty(qubits, dtype=torch.float64).uniform_(-0.5, 0.5))

    def gates(self) -> torch.Tensor:
        """(n, 2, 2) the one-qubit matrices."""
        c = torch.cos(self.angles / 2).to(DTYPE)
        s = torch.sin(self.angles / 2).to(DTYPE)
        zero = torch.zeros_like(c)
        rows = {"X": ((c, -1j * s), (-1j * s, c)), "Y": ((c, -s), (s, c)),
                "Z": ((c - 1j * s, zero), (zero, c + 1j * s))}[self.axis]
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        n, state = self.qubits, psi.reshape((2,) * self.qubits)
        for q, gate in enumerate(self.gates()):
            state = torch.movedim(torch.tensordot(gate, state, dims=([1], [q])), 0, q)
        return state.reshape(2 ** n)


class ZZ(nn.Module):
    """``exp(-i t_q / 2 Z_q Z_{q+1})`` on every neighbouring pair: a diagonal phase."""

    def __init__(self, qubits: int) -> None:
        super().__init__()
        z = 1 - 2 * _bits(qubits).to(torch.float64)  # +1 for |0>, -1 for |1>
        self.register_buffer("zz", z[:, :-1] * z[:, 1:])  # (2^n, n - 1)
        self.angles = nn.Parameter(torch.empty(qubits - 1, dtype=torch.float64).uniform_(-0.5,
                                                                                          0.5))

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi * torch.exp(-0.5j * (self.zz @ self.angles))


class CZ(nn.Module):
    """A controlled-Z on every neighbouring pair: -1 on basis states with both bits 1."""

    def __init__(self, qubits: int) -> None:
        super().__init__()
        b = _bits(qubits)
        flips = (b[:, :-1] & b[:, 1:]).sum(1)
        self.register_buffer("sign", (1 - 2 * (flips % 2)).to(DTYPE))

    def forward(self, psi: torch.Tensor) -> torch.Tensor:
        return psi * self.sign


QUBIT_OPS = ("skip_connect", "rx", "ry", "rz", "zz", "cz")
ANGLED_OPS = ("rx", "ry", "rz", "zz")  # the layers with angles to train


def _op(name: str, qubits: int) -> nn.Module:
    if name == "skip_connect":
        return nn.Identity()
    if name in ("rx", "ry", "rz"):
        return Rotation(name[1].upper(), qubits)
    return ZZ(qubits) if name == "zz" else CZ(qubits)


def _start(qubits: int) -> torch.Tensor:
    """|+...+>, every basis state with the same amplitude: a diagonal layer (zz, cz) acts
    on it at once (on |0...0> it would only change a global phase)."""
    return torch.full((2 ** qubits,), 2 ** (-qubits / 2), dtype=DTYPE)


# --- the space ------------------------------------------------------------------------------
@dataclass
class QCircuitConfig:
    qubits: int = 4
    nodes: int = 6  # layers of the circuit
    ops: list[str] = field(default_factory=lambda: list(QUBIT_OPS))

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in QUBIT_OPS]
        if unknown:
            raise ValueError(f"unknown circuit op(s) {unknown}; known: {', '.join(QUBIT_OPS)}")
        require(len(set(self.ops)) == len(self.ops), "search.space.ops", "without repeats",
                self.ops)
        require(any(o in ANGLED_OPS for o in self.ops), "search.space.ops",
                f"a list with one of {', '.join(ANGLED_OPS)} at least (a circuit without "
                "angles has nothing to train)", self.ops)
        require(2 <= self.qubits <= MAX_QUBITS, "search.space.qubits",
                f"in 2..{MAX_QUBITS} (the Hamiltonian is a dense 2^n x 2^n matrix)",
                self.qubits)
        require(self.nodes >= 1, "search.space.nodes", ">= 1", self.nodes)


class _SuperNet(nn.Module):
    """Every candidate layer at every depth; node j is the normalised weighted sum of the
    candidates' outputs on node j - 1."""

    def __init__(self, config: QCircuitConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList(_op(o, config.qubits) for o in config.ops)
                                    for _ in range(config.nodes))
        self.register_buffer("start", _start(config.qubits))

    def forward(self, _: Any, arch_weights: Any) -> torch.Tensor:
        psi = self.start
        for w, ops in zip(arch_weights[CELL], self.layers, strict=True):
            mixed = sum(wk * op(psi) for wk, op in zip(w, ops, strict=True))
            psi = mixed / torch.linalg.vector_norm(mixed)
        return psi


class Circuit(nn.Module):
    """The genotype's circuit: its layers in order, from fresh angles."""

    def __init__(self, cell: CellGenotype, qubits: int) -> None:
        super().__init__()
        self.names = [e.op for e in sorted(cell.edges, key=lambda e: e.dst)]
        self.layers = nn.ModuleList(_op(o, qubits) for o in self.names)
        self.register_buffer("start", _start(qubits))

    def forward(self, _: Any = None) -> torch.Tensor:
        psi = self.start
        for layer in self.layers:
            psi = layer(psi)
        return psi


@register_space("qcircuit")
class QCircuitSpace(SearchSpace):
    engine = "quantum"
    Config = QCircuitConfig

    def edges(self) -> list[EdgeSpec]:
        ops = tuple(self.config.ops)  # a chain: node j reads node j - 1 only
        return [EdgeSpec(f"{CELL}/n{j}/e{j - 1}", CELL, j - 1, j, ops)
                for j in range(1, self.config.nodes + 1)]

    def inputs_per_node(self) -> int:
        return 1

    def concat(self, group: str) -> tuple[int, ...]:
        return (self.config.nodes,)  # the circuit's output is its last state

    def concat_candidates(self, group: str) -> tuple[int, ...]:
        return self.concat(group)

    def build_supernet(self) -> nn.Module:
        return _SuperNet(self.config)

    def build_network(self, genotype: Genotype, **overrides: Any) -> nn.Module:
        self.validate(genotype)
        if overrides:
            raise ConfigError(f"retrain.network: the qcircuit space has no network settings, "
                              f"got {', '.join(sorted(overrides))}")
        return Circuit(genotype.cell(CELL), self.config.qubits)


def _space(cfg: RunConfig) -> SearchSpace:
    return create_space(cfg.search.space, DataShape(in_channels=1, resolution=1,
                                                    num_classes=1))


class EnergyObjective:
    """The loss is the output state's energy; ``err`` is how far above the exact ground
    energy it is. There is no data: every batch is a placeholder."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def inputs(self, batch: Any) -> Any:
        return batch

    def __call__(self, output: torch.Tensor, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        energy = self.problem.energy(output)
        check_finite_loss(energy.item())
        return energy, {"loss": energy.item(), "err": energy.item() - self.problem.ground_energy}


# --- search ---------------------------------------------------------------------------------
class CircuitSearchTask(StrategyTask):
    """One strategy step per epoch (weights = angles, then alphas; both on the energy)."""

    def __init__(self, cfg: RunConfig, problem: Problem, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.space, self.problem, self.rule = _space(cfg), problem, cfg.search.discretizer
        supernet = self.space.build_supernet().to(device)
        arch = ArchParams(self.space).to(device)
        self.objective = EnergyObjective(problem)
        self.strategy = create_strategy(cfg.search.strategy, supernet, arch, self.objective,
                                        cfg.search.epochs)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        nothing = torch.zeros(0)  # the placeholder batch of both levels
        yield nothing, (nothing if self.strategy.uses_validation else None)

    def num_batches(self) -> int:
        return 1

    def step(self, batch: Any) -> dict[str, float]:
        return self.strategy.step(*batch)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        self.strategy.end_epoch()
        with torch.no_grad():
            _, v = self.objective(self.strategy.supernet(None, self.measured_arch_weights()),
                                  None)
        return {"eval_energy": v["loss"], "eval_err": v["err"]}


@dataclass
class CircuitSearchResult:
    genotype: Genotype
    history: list[dict[str, float]]


def _problem(cfg: RunConfig, device: torch.device | str = "cpu") -> Problem:
    return load_problem(cfg.data.name, _space(cfg).config.qubits, device)


def run_circuit_search(cfg: RunConfig, run_dir: str | Path, resume: bool = False,
                       stop_after: int | None = None) -> CircuitSearchResult:
    """Search the circuit's layers; writes ``run_dir/search`` like every diffnas search
    (``stop_after``: end after that many epochs, as an interrupted run would)."""
    out = Path(run_dir) / "search"
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    problem = _problem(cfg, device)
    task = CircuitSearchTask(cfg, problem, device)
    loop = Loop(task, cfg.search.epochs, search_callbacks(task, out, cfg))
    history, genotype = run_search_loop(loop, task, out, resume, stop_after,
                                        f"circuit search: {problem.name}, {problem.qubits} "
                                        "qubits", "steps")
    return CircuitSearchResult(genotype, history)


# --- retraining -----------------------------------------------------------------------------
class CircuitTrainTask:
    """Adam on the angles, one step per epoch; keeps the angles of the lowest energy."""

    def __init__(self, model: Circuit, problem: Problem, cfg: RunConfig) -> None:
        self.model, self.problem, self.r = model, problem, cfg.retrain
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.retrain.lr) \
            if any(True for _ in model.parameters()) else None
        self.objective = EnergyObjective(problem)
        self.best: dict[str, Any] = {"energy": math.inf, "epoch": -1, "state": None}

    def batches(self, epoch: int) -> Iterator[None]:
        yield None

    def num_batches(self) -> int:
        return 1

    def step(self, batch: Any) -> dict[str, float]:
        loss, stats = self.objective(self.model(), batch)
        if self.optimizer is not None:  # (a circuit of cz and skips has no angle)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.r.grad_clip)
            self.optimizer.step()
        return stats

    def end_epoch(self, epoch: int) -> dict[str, float]:
        with torch.no_grad():
            _, v = self.objective(self.model(), None)
        if v["loss"] < self.best["energy"]:
            self.best = {"energy": v["loss"], "epoch": epoch,
                         "state": {k: t.clone() for k, t in self.model.state_dict().items()}}
        return {"energy": v["loss"], "err": v["err"],
                "best_err": self.best["energy"] - self.problem.ground_energy}

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "best": self.best,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.best = state["best"]
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])


def run_circuit_retrain(cfg: RunConfig, genotype: Genotype, run_dir: str | Path,
                        resume: bool = False, stop_after: int | None = None
                        ) -> dict[str, Any]:
    """Train ``genotype``'s circuit from fresh angles; writes ``run_dir/retrain`` (metrics,
    checkpoint, genotype.json, model.pt, result.json with ``energy_error``)."""
    out = retrain_dir(run_dir, genotype, resume)
    device = resolve_device(cfg.device)
    problem = _problem(cfg, device)
    seed_everything(cfg.seed)
    model = _space(cfg).build_network(genotype, **cfg.retrain.network).to(device)
    task = CircuitTrainTask(model, problem, cfg)
    loop, history = run_retrain_loop(task, cfg, out, resume, stop_after)
    if task.best["state"] is not None:
        model.load_state_dict(task.best["state"])
    with torch.no_grad():
        energy = problem.energy(model()).item()
    result = {"genotype": genotype.to_dict(), "epochs_done": loop.epoch,
              "params": sum(p.numel() for p in model.parameters()),
              "best_epoch": task.best["epoch"], "energy": energy,
              "ground_energy": problem.ground_energy,
              "energy_error": energy - problem.ground_energy, "history": history}
    save_retrain_result(out, model, result)
    return result


# --- the engine -----------------------------------------------------------------------------
def print_circuit_result(genotype: Genotype, result: dict[str, Any] | None) -> None:
    print("\n== genotype ==")
    print(genotype)
    if result is not None:
        print(f"angles: {result['params']}")
        print(f"energy: {result['energy']:.6f}, exact ground energy "
              f"{result['ground_energy']:.6f}: error {result['energy_error']:.2e} (angles of "
              f"the lowest-energy epoch {result['best_epoch'] + 1}) after "
              f"{counted(result['epochs_done'], 'epoch')}")


def circuit_summary(cfg: RunConfig, genotype: Genotype) -> dict[str, Any]:
    problem = _problem(cfg)
    model = _space(cfg).build_network(genotype, **cfg.retrain.network)
    return {"qubits": problem.qubits, "layers": model.names,
            "angles": sum(p.numel() for p in model.parameters()),
            "ground_energy": problem.ground_energy}


def check_circuit_search(cfg: RunConfig, device: bool = True) -> None:
    """Settings this engine cannot honour: refused, not ignored."""
    refuse_image_search_settings(cfg)  # amp, compile, cuda_graph, ...
    if cfg.search.strategy.get("name") == "random_labels":
        raise ConfigError("search.strategy.name=random_labels is not supported by the quantum "
                          "engine (docs/examples/plugins/quantum_engine.py): a VQE has no "
                          "labels to draw at random")


def check_circuit_retrain(cfg: RunConfig) -> None:
    """The circuit has no network settings: refused before the run directory exists."""
    if cfg.retrain.network:
        raise ConfigError(f"retrain.network: the qcircuit space has no network settings, "
                          f"got {', '.join(sorted(cfg.retrain.network))}")


#: lower is better; 0 is the exact ground state
ENERGY_ERROR = Metric("energy_error", "energy error", "err", ".3e", "eval_err",
                      title="Retrained energy error above the exact ground energy",
                      search_title="the supernet's energy error", lower_is_better=True)

register_engine(Engine(
    name="quantum", label="quantum (quantum_engine.py)",
    a_run="a quantum-circuit run (a VQE, no data)", data_kind="quantum problem",
    datasets=lambda: PROBLEMS, report=print_circuit_result,
    run_search=run_circuit_search, run_retrain=run_circuit_retrain, summary=circuit_summary,
    check_search=check_circuit_search, check_retrain=check_circuit_retrain,
    metric=ENERGY_ERROR,
    unused_data=("download", "resolution", "train_subset", "test_subset", "search_split",
                 "batch_size", "root"),
    unread_retrain=("batch_size", "lr_min", "momentum", "weight_decay", "auxiliary_weight",
                    "drop_path", "cutout", "crop_padding", "flip", "train_subset")))
