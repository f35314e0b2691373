"""Collapse diagnostics for any strategy, as loop callbacks.

DARTS-like searches can collapse onto parameter-free ops: the number of ``skip_connect``
edges in the derived normal cell grows with the epochs (Liang et al., DARTS+), and the
dominant eigenvalue of the validation-loss Hessian with respect to alpha grows before
it (Zela et al., RobustDARTS). :class:`CollapseDiagnostics` writes both per epoch to a
JSON-lines file; the eigenvalue is optional (power iteration on Hessian-vector products).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffnas.arch.relax import SoftmaxRelaxation
from diffnas.engine.callbacks import drop_epochs_from
from diffnas.engine.loop import Callback, Loop
from diffnas.genotype import Genotype
from diffnas.ops import twice_differentiable


def skip_count(genotype: Genotype, cell: str | None = None, op: str = "skip_connect") -> int:
    """Edges of ``cell`` (default: ``normal`` if present, else the first cell) using ``op``."""
    names = [c.name for c in genotype.cells]
    name = cell or ("normal" if "normal" in names else names[0])
    return sum(e.op == op for e in genotype.cell(name).edges)


def dominant_eigenvalue(
    loss: torch.Tensor, params: list[torch.Tensor], iters: int = 20, tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Largest-magnitude eigenvalue of the Hessian of ``loss`` w.r.t. ``params`` by power
    iteration on Hessian-vector products (double backward). The start vector comes from a
    private generator, so calling this leaves torch's global RNG untouched."""
    got = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # parameters the loss does not use have zero Hessian rows: leave them out
    used = [(p, g) for p, g in zip(params, got, strict=True) if g is not None]
    if not used:
        return 0.0
    params, grads = [p for p, _ in used], [g for _, g in used]
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eig = 0.0
    for i in range(iters):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        new = float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))  # Rayleigh
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if norm == 0:
            return 0.0
        v = [x / norm for x in hv]
        if i > 0 and abs(new - eig) <= tol * max(abs(new), 1e-12):
            return new
        eig = new
    return eig


def alpha_hessian_eigenvalue(strategy: Any, batch: Any, iters: int = 20,
                             tol: float = 1e-4) -> float:
    """Dominant eigenvalue of the Hessian of the loss on ``batch`` w.r.t. the architecture
    parameters, at the current weights. A stochastic relaxation (Gumbel) is replaced by
    its expectation-free counterpart, the softmax, so the quantity is deterministic. The
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
    return dominant_eigenvalue(loss, strategy.alphas(), iters, tol)


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
            f.write(json.dumps(row) + "\n")
