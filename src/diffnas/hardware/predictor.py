"""A learned latency predictor: an MLP over the per-edge op encoding of an architecture.

The input is, per cell type, a ``(num_edges, num_ops)`` matrix: a one-hot row per edge
for a discrete genotype (a dropped edge is ``none``), or the relaxed architecture weights
during search, so the predicted latency is differentiable in alpha. The output is in
milliseconds, ``mean + std * z`` with

    z = linear(counts) + edge_linear(x) + mlp(counts / edges)

where ``counts`` sums the rows of each cell type (how much of each op the cell holds).
The shared per-op costs (``linear(counts)``) are what a few hundred measurements can pin
down; ``edge_linear`` (per-edge corrections, e.g. strided edges of a reduction cell) and
the MLP (interactions between op mixtures) are weight-decayed more strongly, so they only
take what the data supports. Fitting only an MLP on the 224 raw one-hot inputs of
``darts_cnn`` overfits 300 records badly (docs/latency.md).

The predictor stores the op name of each column (``ops``, per cell type): the columns
follow the op list of the space it was fitted on, which a config may reorder or shorten,
so anything that builds its input from op indices of another list maps them by name.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffnas.genotype import Genotype
from diffnas.hardware.dataset import (
    anchored_latencies,
    describe_differences,
    edge_ops,
    genotype_key,
    one_hot,
    record_op_mismatch,
    settings_differences,
    space_ops,
)
from diffnas.spaces import SearchSpace
from diffnas.spaces.base import EdgeSpec
from diffnas.spaces.nb201 import GROUP as NB201_GROUP
from diffnas.spaces.nb201 import NB201_EDGES, NB201_OPS

log = logging.getLogger("diffnas")


class LatencyPredictor(nn.Module):
    """``forward(weights) -> latency in ms``; ``weights[group]`` is ``(..., edges, ops)``
    (leading batch dimensions allowed), e.g. an :class:`~diffnas.arch.relax.ArchWeights`.
    ``ops[group]`` names the op of each column; ``None`` where unknown (a hand-built
    predictor, or a file saved before the names were stored)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], hidden: int = 64,
                 mean_ms: float = 1.0, std_ms: float = 1.0,
                 ops: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        self.shapes = {g: (int(s[0]), int(s[1])) for g, s in shapes.items()}
        self.ops: dict[str, tuple[str, ...]] | None = None
        if ops is not None:
            self.ops = {g: tuple(str(o) for o in names) for g, names in ops.items()}
            if set(self.ops) != set(self.shapes) or any(
                    len(self.ops[g]) != o for g, (_, o) in self.shapes.items()):
                raise ValueError(f"op names {self.ops} do not match the predictor's shapes "
                                 f"{self.shapes} (one name per op column of each group)")
        self.hidden = hidden
        d = sum(e * o for e, o in self.shapes.values())
        k = sum(o for _, o in self.shapes.values())
        self.linear = nn.Linear(k, 1)
        self.edge_linear = nn.Linear(d, 1, bias=False)
        nn.init.zeros_(self.edge_linear.weight)
        self.mlp = nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("mean_ms", torch.tensor(float(mean_ms)))
        self.register_buffer("std_ms", torch.tensor(float(std_ms)))
        self.meta: dict[str, Any] = {}

    def features(self, weights: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-edge weights flattened, op counts per cell type, counts / edges)."""
        p = self.linear.weight
        edges, counts, fractions = [], [], []
        for g, (e, o) in self.shapes.items():
            w = weights[g]
            if tuple(w.shape[-2:]) != (e, o):
                raise ValueError(f"predictor expects {g!r} weights of shape (..., {e}, {o}), "
                                 f"got {tuple(w.shape)}")
            w = w.to(device=p.device, dtype=p.dtype)
            edges.append(w.flatten(-2))
            counts.append(w.sum(-2))
            fractions.append(w.sum(-2) / e)
        return torch.cat(edges, -1), torch.cat(counts, -1), torch.cat(fractions, -1)

    def normalized(self, weights: Any) -> torch.Tensor:
        edges, counts, fractions = self.features(weights)
        return (self.linear(counts) + self.edge_linear(edges) + self.mlp(fractions)).squeeze(-1)

    def forward(self, weights: Any) -> torch.Tensor:
        dtype = next(iter(weights[g] for g in self.shapes)).dtype
        return (self.mean_ms + self.std_ms * self.normalized(weights)).to(dtype)

    @property
    def ref_ms(self) -> float:
        """The typical latency of the training set (to make penalties unit-free)."""
        return float(self.mean_ms)

    def outside_fitted_range(self, ms: float) -> list[float] | None:
        """The range of latencies the predictor was fitted on (its fit report's
        ``latency_ms_range``) when the prediction ``ms`` lies outside it, an extrapolation
        its held-out error says nothing about (and a logged warning says so); ``None``
        inside it or when not recorded."""
        fitted = self.meta.get("latency_ms_range")
        if fitted and not fitted[0] <= ms <= fitted[1]:
            log.warning("the predicted %.3g ms lies outside the latencies the predictor was "
                        "fitted on (%.3g to %.3g ms): an extrapolation, less reliable than "
                        "its held-out error says", ms, *fitted)
            return list(fitted)
        return None

    def op_names(self, group: str) -> tuple[str, ...]:
        """The op of each column of ``group``; an error where the predictor does not know
        them (nothing that maps ops by name should guess)."""
        if self.ops is None:
            raise ValueError("this latency predictor does not record which op each input "
                             "column is (a hand-built one, or a file saved before op names "
                             "were stored); refit it (`diffnas latency fit`)")
        return self.ops[group]

    def check_space(self, space: SearchSpace) -> None:
        """Refuse a space whose edges or op lists differ from the predictor's, so its
        one-hot encodings would land on the wrong columns. A predictor without op names
        is only checked for its shapes."""
        self.check_edges(space.edge_groups(), f"space {space.name!r}")

    def check_edges(self, groups: Mapping[str, Sequence[EdgeSpec]], what: str) -> None:
        """:meth:`check_space` for edge groups (a space's, or an ``ArchParams.edges``);
        ``what`` names their owner in the error."""
        shapes = edge_shapes(groups)
        if shapes != self.shapes:
            raise ValueError(f"the latency predictor expects (edges, ops) per cell type "
                             f"{self.shapes}, {what} has {shapes}")
        ops = edge_ops(groups)
        if self.ops is not None and self.ops != ops:
            raise ValueError(f"the latency predictor was fitted with ops {self.ops}, {what} "
                             f"has {ops}; the op columns would not match (fit a predictor "
                             "with the same search.space section)")

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from diffnas.engine.checkpoint import atomic_save

        atomic_save({"shapes": self.shapes, "hidden": self.hidden, "meta": self.meta,
                     "ops": self.ops, "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"latency predictor not found: {p}")
        from diffnas.engine.checkpoint import load_saved

        with p.open("rb") as f:
            head = f.read(64).lstrip()
        if head[:1] in (b"{", b"["):  # the fit's report or a latency dataset, given for it
            raise ValueError(f"{p} is a JSON file (a fit report or a latency dataset), not a "
                             "latency predictor: give the .pt file `diffnas latency fit "
                             "--out` wrote")
        blob = load_saved(p, "refit it with `diffnas latency fit`", what="latency predictor")
        missing = [k for k in ("shapes", "hidden", "state") if k not in blob]
        if missing:
            raise ValueError(f"{p} is not a latency predictor (no {', '.join(missing)}); "
                             "refit it with `diffnas latency fit`")
        meta = blob.get("meta", {})
        ops = blob.get("ops")
        if ops is None and "ops" not in blob:  # saved before op names were stored
            ops = legacy_ops(blob["shapes"], meta)
            if ops is not None:
                log.warning("latency predictor %s does not record its op names; its records "
                            "were measured on nb201 with the default ops, so the default "
                            "order %s is assumed (refit to record them)", p, list(NB201_OPS))
        model = cls(blob["shapes"], blob["hidden"], ops=ops)
        model.load_state_dict(blob["state"])
        model.meta = meta
        return model


def legacy_ops(shapes: Mapping[str, Sequence[int]],
               meta: Mapping[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """Op names of a predictor file saved before they were stored, where unambiguous: its
    records were measured on ``nb201`` with the default op list (the ``space`` section in
    the fit report's settings names no other) and it has that shape: NAS-Bench-201's
    default order. ``None`` (unknown) otherwise."""
    settings = meta.get("settings")
    section = settings.get("space") if isinstance(settings, Mapping) else None
    if not isinstance(section, Mapping) or section.get("name") != "nb201":
        return None
    if list(section.get("ops", NB201_OPS)) != list(NB201_OPS):
        return None
    if {g: tuple(s) for g, s in shapes.items()} != {
            NB201_GROUP: (len(NB201_EDGES), len(NB201_OPS))}:
        return None
    return {NB201_GROUP: tuple(NB201_OPS)}


def edge_shapes(groups: Mapping[str, Sequence[EdgeSpec]]) -> dict[str, tuple[int, int]]:
    """``(edges, ops)`` per cell type of edge groups (``space.edge_groups()``)."""
    return {g: (len(es), len(es[0].candidates)) for g, es in groups.items()}


def space_shapes(space: SearchSpace) -> dict[str, tuple[int, int]]:
    return edge_shapes(space.edge_groups())


def encode_records(records: Sequence[dict], space: SearchSpace) -> dict[str, torch.Tensor]:
    """Stacked one-hot encodings ``(N, edges, ops)`` per group of dataset records."""
    shapes = space_shapes(space)
    stacked: dict[str, list[torch.Tensor]] = {g: [] for g in shapes}
    for i, r in enumerate(records, 1):  # (numbered from 1, as the file's lines)
        enc = r["encoding"]
        if set(enc) != set(shapes) or any(len(enc[g]) != shapes[g][0] for g in shapes):
            raise ValueError(f"record {i} does not fit space {space.name!r} (edges per group "
                             f"{ {g: s[0] for g, s in shapes.items()} })")
        for g, w in one_hot(enc, space).items():
            stacked[g].append(w)
    return {g: torch.stack(v) for g, v in stacked.items()}


def mean_relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((pred - target).abs() / target).mean())


def split_by_architecture(records: Sequence[Mapping[str, Any]], holdout: float, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) record indices, a ``holdout`` fraction of the architectures held
    out: repeated measurements of one network (merged files) stay on one side, or the
    held-out error would flatter the predictor. Without repeats: a seeded permutation of
    the records, its first ``round(holdout * n)`` (at least 1) held out."""
    keys = [genotype_key(Genotype.from_dict(r["genotype"])) for r in records]
    groups = list(dict.fromkeys(keys))
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(holdout * len(groups)))
    if len(groups) == len(keys):
        return perm[n_test:], perm[:n_test]
    held = {groups[i] for i in perm[:n_test].tolist()}
    return (torch.tensor([i for i, k in enumerate(keys) if k not in held], dtype=torch.long),
            torch.tensor([i for i, k in enumerate(keys) if k in held], dtype=torch.long))


def fit_predictor(
    records: Sequence[dict], space: SearchSpace, holdout: float = 0.2, epochs: int = 600,
    lr: float = 3e-3, weight_decay: float = 1e-4, hidden: int = 32, seed: int = 0,
    target: str = "anchored", edge_decay: float = 1.0, mlp_decay: float = 1e-2,
) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Train on a seeded random ``1 - holdout`` of ``records`` (full batch, Adam, squared
    relative error; ``weight_decay`` on the shared op costs, ``edge_decay`` and
    ``mlp_decay`` on the rest) and report the mean relative error on the held-out rest.
    ``target``:
    ``anchored`` (load-corrected, see :mod:`diffnas.hardware.dataset`) or ``raw`` medians.
    Records must come from one device and one set of measuring settings (batch size, clock,
    input shape, network, ...; only ``warmup`` and ``repeats`` may differ), and from a
    space with ``space``'s op lists: a record's op indices are read against them (see
    :func:`~diffnas.hardware.dataset.record_op_mismatch`). The predictor stores the op
    names."""
    if target not in ("anchored", "raw"):
        raise ValueError(f"target must be 'anchored' or 'raw', got {target!r}")
    if len(records) < 10:
        raise ValueError(f"need at least 10 latency records to fit, got {len(records)}")
    devices = {r["device"]["id"] for r in records}
    if len(devices) > 1:
        raise ValueError(f"records come from {len(devices)} devices {sorted(devices)}; fit "
                         "one predictor per device (diffnas latency fit --fingerprint ID)")
    for i, r in enumerate(records, 1):  # (numbered from 1, as the file's lines)
        diff = settings_differences(records[0]["settings"], r["settings"])
        if diff:
            raise ValueError(f"records 1 and {i} were measured with different settings "
                             f"({describe_differences(diff)}); fit one predictor per setting")
    for i, r in enumerate(records, 1):
        why = record_op_mismatch(r, space)
        if why:
            raise ValueError(f"record {i} does not fit space {space.name!r}: {why}; fit with "
                             "the search.space section the records were measured with "
                             "(--config)")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1 (the MLP's width), got {hidden}")
    for name, value in (("lr", lr), ("weight_decay", weight_decay),
                        ("edge_decay", edge_decay), ("mlp_decay", mlp_decay)):
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise ValueError(f"{name} must be a finite number "
                             f"{'> 0' if name == 'lr' else '>= 0'}, got {value}")
    x = encode_records(records, space)
    raw = torch.tensor([float(r["latency_ms"]) for r in records])
    y = torch.tensor(anchored_latencies(list(records))) if target == "anchored" else raw
    train, test = split_by_architecture(records, holdout, seed)
    archs = len({genotype_key(Genotype.from_dict(r["genotype"])) for r in records})
    if archs == 1:
        raise ValueError(f"the {len(records)} records measure one architecture only: a "
                         "predictor needs several (measure more)")
    if len(train) < 2:  # the target's std (and any fit) needs two records
        raise ValueError(f"holdout {holdout} leaves {len(train)} of {len(records)} "
                         "records to train on; need at least 2 (lower the holdout)")
    if bool((y[train] == y[train][0]).all()):  # (std 0: one prediction for every cell)
        raise ValueError(f"the {len(train)} training records all take {y[train][0]:g} ms "
                         f"({target} latency): a predictor would give every architecture "
                         "that latency (the clock did not tell the architectures apart: "
                         "measure them again with a larger --batch-size)")
    torch.manual_seed(seed)
    model = LatencyPredictor(space_shapes(space), hidden, y[train].mean().item(),
                             y[train].std().item(), ops=space_ops(space))
    opt = torch.optim.Adam([
        {"params": model.linear.parameters(), "weight_decay": weight_decay},
        {"params": model.edge_linear.parameters(), "weight_decay": edge_decay},
        {"params": model.mlp.parameters(), "weight_decay": mlp_decay},
    ], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    xtr = {k: v[train] for k, v in x.items()}
    for _ in range(epochs):
        opt.zero_grad()
        loss = (((model(xtr) - y[train]) / y[train]) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = model(x)
    iqr = torch.tensor([(r["q75_ms"] - r["q25_ms"]) / r["latency_ms"] for r in records
                        if "q75_ms" in r])
    report = {
        "records": len(records), "train": len(train), "heldout": len(test),
        "heldout_mre": mean_relative_error(pred[test], y[test]),
        "train_mre": mean_relative_error(pred[train], y[train]),
        "heldout_max_rel_err": float(((pred[test] - y[test]).abs() / y[test]).max()),
        "mean_baseline_heldout_mre": mean_relative_error(
            torch.full_like(y[test], y[train].mean().item()), y[test]),
        "heldout_kendall_tau": kendall_tau(pred[test], y[test]),
        "target": target,
        "heldout_mre_vs_raw_median": mean_relative_error(pred[test], raw[test]),
        "median_relative_iqr": float(iqr.median()) if len(iqr) else math.nan,
        "latency_ms_range": [float(y.min()), float(y.max())],
        "anchor_ms_median": (statistics.median(r["anchor_ms"] for r in records)
                             if all("anchor_ms" in r for r in records) else None),
        "device": records[0]["device"], "settings": records[0]["settings"],
    }
    if not torch.isfinite(pred).all():
        raise FloatingPointError(
            "the latency predictor's fit diverged (non-finite predictions); lower lr or "
            "the decays, or check the records' latencies")
    model.meta = report
    return model, report


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank agreement of two 1-D tensors (tau-a)."""
    da = torch.sign(a[:, None] - a[None, :])
    db = torch.sign(b[:, None] - b[None, :])
    n = len(a)
    return float((da * db).sum() / max(n * (n - 1), 1))
