"""Collapse diagnostics for any strategy, as loop callbacks.

DARTS-like searches can collapse onto parameter-free ops: the number of ``skip_connect``
edges in the derived normal cell grows with the epochs (Liang et al., DARTS+), and the
largest eigenvalue of the validation-loss Hessian with respect to alpha grows before it
(Zela et al., RobustDARTS). :class:`CollapseDiagnostics` writes both per epoch to a
JSON-lines file; the eigenvalue is optional (power iteration on Hessian-vector products).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from diffnas.arch.relax import SoftmaxRelaxation
from diffnas.engine.callbacks import drop_epochs_from, json_line
from diffnas.engine.loop import Callback, Loop
from diffnas.genotype import Genotype
from diffnas.ops import twice_differentiable


def skip_count(genotype: Genotype, cell: str | None = None, op: str = "skip_connect") -> int:
    """Edges of ``cell`` (default: ``normal`` if present, else the first cell) using ``op``."""
    names = [c.name for c in genotype.cells]
    name = cell or ("normal" if "normal" in names else names[0])
    return sum(e.op == op for e in genotype.cell(name).edges)


Vec = list[torch.Tensor]


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _power(op: Callable[[Vec], Vec], v: Vec, iters: int, tol: float) -> float:
    """Power iteration on the symmetric ``op`` from unit ``v``: the Rayleigh quotient at
    the last iterate; stops when the residual ``|op(v) - lambda v|`` is at most
    ``tol * |lambda|`` (a quotient that merely stops changing is not enough: with
    eigenvalues +a and -a the iterate swings between two vectors of equal quotient)."""
    lam = 0.0
    for _ in range(iters):
        hv = op(v)
        lam = float(_dot(hv, v))
        norm = float(torch.sqrt(_dot(hv, hv)))
        if norm == 0:
            return 0.0
        residual = float(torch.sqrt(sum(((h - lam * x) ** 2).sum()
                                        for h, x in zip(hv, v, strict=True))))
        if residual <= tol * max(abs(lam), 1e-12):
            break
        v = [x / norm for x in hv]
    return lam


def _hessian_operator(loss: torch.Tensor, params: list[torch.Tensor],
                      seed: int) -> tuple[Callable[[Vec], Vec], Vec] | None:
    """Hessian-vector products of ``loss`` w.r.t. the ``params`` it uses (double
    backward) and a unit start vector from a private generator (torch's global RNG is
    left untouched); None when the loss uses none of them."""
    got = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # parameters the loss does not use have zero Hessian rows: leave them out
    used = [(p, g) for p, g in zip(params, got, strict=True) if g is not None]
    if not used:
        return None
    params, grads = [p for p, _ in used], [g for _, g in used]
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(_dot(v, v))

    def hvp(x: Vec) -> Vec:
        return list(torch.autograd.grad(grads, params, grad_outputs=x, retain_graph=True))

    return hvp, [x / norm for x in v]


def dominant_eigenvalue(
    loss: torch.Tensor, params: list[torch.Tensor], iters: int = 20, tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of ``loss`` w.r.t. ``params`` by power
    iteration on Hessian-vector products."""
    found = _hessian_operator(loss, params, seed)
    return 0.0 if found is None else _power(*found, iters, tol)


def largest_eigenvalue(
    loss: torch.Tensor, params: list[torch.Tensor], iters: int = 20, tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """The largest (most positive) eigenvalue of the Hessian of ``loss`` w.r.t.
    ``params``, RobustDARTS's collapse signal ``max(eig(H))`` (the alpha Hessian is
    indefinite: the largest-magnitude eigenvalue is often its most negative). Lanczos with
    full reorthogonalisation: ``iters`` Hessian-vector products build a tridiagonal
    matrix whose largest eigenvalue converges to ``lambda_max`` much faster than power
    iteration (which needs a shift here, and then crawls when ``lambda_max`` is small next
    to the most negative one). Stops early when the Krylov space is exhausted; ``tol``
    is the relative size of that breakdown."""
    found = _hessian_operator(loss, params, seed)
    if found is None:
        return 0.0
    hvp, v = found
    basis: list[Vec] = [v]
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(iters):
        w = hvp(basis[-1])
        a = float(_dot(w, basis[-1]))
        alphas.append(a)
        for q in basis:  # full reorthogonalisation (the basis is small)
            c = _dot(w, q)
            w = [wi - c * qi for wi, qi in zip(w, q, strict=True)]
        b = float(torch.sqrt(_dot(w, w)))
        if b <= tol * max(abs(a), 1e-12):
            break
        betas.append(b)
        basis.append([wi / b for wi in w])
    n = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if n > 1:
        off = torch.tensor(betas[:n - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T).max())


def alpha_hessian_eigenvalue(strategy: Any, batch: Any, iters: int = 20,
                             tol: float = 1e-4) -> float:
    """Largest eigenvalue (:func:`largest_eigenvalue`) of the Hessian of the loss on
    ``batch`` w.r.t. the architecture parameters, at the current weights. A stochastic
    relaxation (Gumbel) is replaced by its expectation-free counterpart, the softmax, so
    the quantity is deterministic. The
    supernet's buffers (BN running statistics) are restored afterwards: measuring must not
    change the run."""
    relax = strategy.relaxation
    if relax.stochastic:
        relax = SoftmaxRelaxation()
    aw = strategy.arch_params.normalize(relax(strategy.arch_params.as_dict()))
    buffers = {n: b.clone() for n, b in strategy.supernet.named_buffers()}
    try:
        with twice_differentiable():
            loss, _ = strategy.loss(batch, aw)
    finally:
        with torch.no_grad():
            for n, b in strategy.supernet.named_buffers():
                b.copy_(buffers[n])
    return largest_eigenvalue(loss, strategy.alphas(), iters, tol)


class CollapseDiagnostics(Callback):
    """Per epoch: ``{"epoch", "skip_connect", "cell", ["hessian_eig"]}`` to ``path``.

    Works with any search task that has ``genotype()`` and ``strategy`` (the engine's
    ``SearchTask``). ``hessian_batch`` (e.g. a fixed validation batch) switches on the
    eigenvalue, computed with ``hessian_iters`` power iterations."""

    def __init__(self, path: str | Path, cell: str | None = None,
                 hessian_batch: Any = None, hessian_iters: int = 20) -> None:
        self.path = Path(path)
        self.cell = cell
        self.hessian_batch = hessian_batch
        self.hessian_iters = hessian_iters

    def on_run_start(self, loop: Loop) -> None:
        drop_epochs_from(self.path, loop.epoch)  # lines past the checkpoint (as JsonLines)

    def on_epoch_end(self, loop: Loop, epoch: int, metrics: dict[str, Any]) -> None:
        genotype = loop.task.genotype()
        names = [c.name for c in genotype.cells]
        cell = self.cell or ("normal" if "normal" in names else names[0])
        row: dict[str, Any] = {"epoch": epoch, "cell": cell,
                               "skip_connect": skip_count(genotype, cell)}
        if self.hessian_batch is not None:
            row["hessian_eig"] = alpha_hessian_eigenvalue(
                loop.task.strategy, self.hessian_batch, self.hessian_iters)
        with self.path.open("a") as f:
            f.write(json_line(row))
