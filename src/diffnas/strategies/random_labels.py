"""RLNAS (Zhang et al., 2021): neural architecture search with random labels.

The training labels are permuted once at the start (a fixed random permutation of the
label vector, seeded by ``label_seed``, so resume reproduces it) and the supernet is
trained by single-path uniform sampling: every step samples one op per edge and computes
only those. Architecture parameters are never trained. After each epoch an evolutionary
search looks for the path whose weights moved most from their initialization, by the
*angle* between the initial and current weight vectors of the path (the shared weights
plus the ops on the path); the best path is written into the architecture logits, so the
usual discretizer returns it. As in RLNAS's code, a pooling op enters the vectors as a
fixed ``C x k x k`` kernel of ``1/k^2`` (the same in both, so it pulls the angle towards
0 and a pooling path ranks below a skip path), and a skip connection has no weights (its
NAS-Bench-201 code; its DARTS code counts an identity matrix there). Each op counts once,
where RLNAS's code concatenates the vector per input-to-output path.

Genotype: in spaces that keep every edge (nb201, ``argmax``) it is exactly the path. In
spaces that keep ``k`` inputs per node (``darts``), the path's op logit on each edge is
``5 + angle`` of that op's own weights, so each node keeps the inputs whose ops moved most
(parameter-free ops score 0): a deviation from the paper, which samples input edges too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffnas.arch import ArchParams
from diffnas.arch.relax import ArchWeights
from diffnas.strategies.base import ArchOptimConfig, Batch, SearchStrategy, StrategyConfig
from diffnas.strategies.registry import register_strategy

Path = dict[str, torch.Tensor]  # group -> op index per edge


def angle_from_sums(dot: float, n0: float, n1: float) -> float:
    """Angle between two vectors from ``<a, b>``, ``|a|^2``, ``|b|^2`` (0 for equal ones:
    ``sqrt(x * x) == x`` exactly in IEEE arithmetic, so cos is exactly 1)."""
    if n0 <= 0.0 or n1 <= 0.0:
        return 0.0
    return math.acos(max(-1.0, min(1.0, dot / math.sqrt(n0 * n1))))


@dataclass
class RandomLabelsConfig(StrategyConfig):
    label_seed: int = 0
    exclude_ops: list[str] = field(default_factory=lambda: ["none"])  # never sampled
    population: int = 20
    iterations: int = 10
    parents: int = 5
    mutate_prob: float = 0.2

    def __post_init__(self) -> None:
        if self.population < 2 or not 1 <= self.parents <= self.population:
            raise ValueError(f"random_labels needs population >= 2 and 1 <= parents <= "
                             f"population, got {self.population}, {self.parents}")
        if self.iterations < 0 or not 0 <= self.mutate_prob <= 1:
            raise ValueError("random_labels needs iterations >= 0 and mutate_prob in [0, 1]")
        default = ArchOptimConfig()
        unused = [key for key, used in (
            ("relaxation", self.relaxation != {"name": "softmax"}),
            ("edge_norm", self.edge_norm),
            ("a_optim", (self.a_optim.lr, self.a_optim.weight_decay, tuple(self.a_optim.betas))
             != (default.lr, default.weight_decay, tuple(default.betas))),
        ) if used]
        if unused:  # settings that would otherwise be accepted and silently ignored
            raise ValueError(
                "random_labels samples paths uniformly and trains no architecture "
                "parameters, so it has no use for "
                f"{', '.join('search.strategy.' + k for k in unused)}: drop them")


@register_strategy("random_labels")
class RandomLabelsStrategy(SearchStrategy):
    Config = RandomLabelsConfig
    uses_validation = False
    # the labels are permuted before the data is split over ranks, the paths and the
    # evolution draw from torch's RNG (synchronised), the weight step averages gradients
    data_parallel = True

    @staticmethod
    def _allowed(config: RandomLabelsConfig, arch_params: ArchParams) -> dict[str, torch.Tensor]:
        """Indices of the ops each group may sample (not in ``exclude_ops``, whose names
        must be candidates of the space: a typo would silently exclude nothing)."""
        known = {n for g in arch_params.groups() for n in arch_params.candidates(g)}
        unknown = [n for n in config.exclude_ops if n not in known and n != "none"]
        if unknown:
            raise ValueError(f"random_labels: exclude_ops {unknown} are not ops of this space; "
                             f"its ops: {', '.join(sorted(known))}")
        allowed = {}
        for g in arch_params.groups():
            ok = [i for i, n in enumerate(arch_params.candidates(g))
                  if n not in config.exclude_ops]
            if not ok:
                raise ValueError(f"random_labels: exclude_ops {config.exclude_ops} leave no op "
                                 f"in group {g!r}")
            allowed[g] = torch.tensor(ok)
        return allowed

    @classmethod
    def check_setup(cls, config: RandomLabelsConfig, arch_params: ArchParams,
                    epochs: int) -> None:
        if config.penalties:
            raise ValueError("random_labels ranks paths by the angle of their weights and "
                             "takes no alpha gradient: it cannot use search.strategy."
                             f"penalties ({[p.get('name') for p in config.penalties]})")
        cls._allowed(config, arch_params)

    @classmethod
    def check_discretizer(cls, config: RandomLabelsConfig, rule: str,
                          arch_params: ArchParams | None = None) -> None:
        """Under the ``darts`` rule (every node keeps its top-k inputs, ``none`` dropped) a
        path may sample ``none`` only if excluded: a node whose path edges are mostly
        ``none`` would get an input, with an op, that the path never trained. A space
        without ``none`` (given as ``arch_params``) has nothing to exclude."""
        has_none = arch_params is None or any(
            "none" in arch_params.candidates(g) for g in arch_params.groups())
        if rule == "darts" and has_none and "none" not in config.exclude_ops:
            raise ValueError(f"random_labels: exclude_ops {config.exclude_ops} lets paths "
                             "sample 'none', but the 'darts' discretizer keeps a fixed number "
                             "of non-'none' inputs per node, so the genotype could hold ops "
                             "the best path never had; keep 'none' in exclude_ops (the "
                             "default) or use the 'argmax' discretizer where the space takes it")

    def __init__(self, config: RandomLabelsConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)  # check_setup first
        self.allowed = self._allowed(config, self.arch_params)
        self.init_weights = {n: p.detach().clone() for n, p in self.supernet.named_parameters()}
        self.counts = {g: torch.zeros_like(a, dtype=torch.long)
                       for g, a in self.arch_params.as_dict().items()}
        self.edge_params: dict[tuple[str, int, int], list[str]] | None = None
        # |fixed kernel|^2 of the pooling ops, by (group, edge, op)
        self.fixed: dict[tuple[str, int, int], float] = {}
        self.best_path: Path | None = None
        self.best_angle = 0.0

    # --- data -----------------------------------------------------------------------------
    def relabel(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels permuted once by ``label_seed`` (the same every call)."""
        g = torch.Generator().manual_seed(self.config.label_seed)
        return labels[torch.randperm(len(labels), generator=g).to(labels.device)]

    # --- paths ----------------------------------------------------------------------------
    def sample_path(self) -> Path:
        """One allowed op per edge, uniformly (torch's global RNG)."""
        return {g: ok[torch.randint(len(ok), (len(self.arch_params.edges[g]),))]
                for g, ok in self.allowed.items()}

    def path_weights(self, path: Path) -> ArchWeights:
        """One-hot weights with ``active`` set: the supernet computes only the path."""
        weights = {g: torch.nn.functional.one_hot(idx, self.arch_params[g].shape[-1])
                   .to(self.arch_params[g]) for g, idx in path.items()}
        return ArchWeights(weights, {g: idx.clone() for g, idx in path.items()})

    def map_edges(self, x: torch.Tensor) -> None:
        """Find which parameters belong to which (group, edge, op), by one traced forward:
        each mixed op (a module with ``ops`` and ``candidates``) receives a view of one row
        of the weights, whose address identifies the edge. Works for any space."""
        mixed = {m: name for name, m in self.supernet.named_modules()
                 if hasattr(m, "candidates") and isinstance(getattr(m, "ops", None),
                                                            torch.nn.ModuleList)}
        # a fixed path (no RNG draw, so a resumed run traces without shifting the stream)
        path = {g: ok[:1].repeat(len(self.arch_params.edges[g])) for g, ok in self.allowed.items()}
        aw = self.path_weights(path)
        rows = {}
        for g, w in aw.weights.items():
            for r in range(w.shape[0]):
                rows[(w[r].data_ptr(), tuple(w[r].shape))] = (g, r)
        seen: dict[torch.nn.Module, tuple[str, int]] = {}
        channels: dict[torch.nn.Module, int] = {}

        def hook(module, args):
            # the weight row's position differs between spaces' mixed ops: match any argument
            keys = {rows.get((a.data_ptr(), tuple(a.shape))) for a in args
                    if isinstance(a, torch.Tensor)} - {None}
            if len(keys) != 1:
                raise RuntimeError(f"random_labels: mixed op {mixed[module]!r} received "
                                   f"{len(keys)} views of weight rows of the arch weights "
                                   "(needs exactly one)")
            seen[module] = keys.pop()
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                channels[module] = args[0].shape[1]  # the ops' input (C // k under PC)

        handles = [m.register_forward_pre_hook(hook) for m in mixed]
        training = self.supernet.training
        self.supernet.eval()  # leaves BN's running statistics alone (resume stays exact)
        try:
            with torch.no_grad():
                self.supernet(x, aw)
        finally:
            self.supernet.train(training)
            for h in handles:
                h.remove()
        names = {id(p): n for n, p in self.supernet.named_parameters()}
        edge_params: dict[tuple[str, int, int], list[str]] = {}
        owned = set()
        self.fixed = {}
        for m, (g, r) in seen.items():
            for j, op in enumerate(m.ops):
                for p in op.parameters():
                    edge_params.setdefault((g, r, j), []).append(names[id(p)])
                    owned.add(names[id(p)])
                for pool in op.modules():
                    if isinstance(pool, (torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
                        ks = pool.kernel_size
                        area = ks * ks if isinstance(ks, int) else ks[0] * ks[1]
                        # C * area entries of 1/area: squared norm C / area
                        self.fixed[(g, r, j)] = (self.fixed.get((g, r, j), 0.0)
                                                 + channels[m] / area)
        edge_params[("", -1, -1)] = [n for n in names.values() if n not in owned]  # shared
        self.edge_params = edge_params

    def _sums(self) -> dict[tuple[str, int, int], tuple[float, float, float]]:
        """(dot, |w0|^2, |w|^2) of every parameter block, in float64."""
        cur = dict(self.supernet.named_parameters())
        out = {}
        for key, names in self.edge_params.items():
            d = a = b = 0.0
            for n in names:
                w0, w = self.init_weights[n].double(), cur[n].detach().double()
                d += float((w0 * w).sum())
                a += float((w0 * w0).sum())
                b += float((w * w).sum())
            out[key] = (d, a, b)
        for key, f in self.fixed.items():  # a fixed kernel: the same in both vectors
            d, a, b = out.get(key, (0.0, 0.0, 0.0))
            out[key] = (d + f, a + f, b + f)
        return out

    def angle(self, path: Path, include_shared: bool = True, sums=None) -> float:
        """Angle between the path's initial and current weights (0 for an untrained path).
        Needs :meth:`map_edges` (done at the first step)."""
        if self.edge_params is None:
            raise RuntimeError("random_labels: call map_edges(x) or step() before angle()")
        sums = sums or self._sums()
        keys = [("", -1, -1)] if include_shared else []
        keys += [(g, r, int(op)) for g, idx in path.items() for r, op in enumerate(idx)]
        tot = [0.0, 0.0, 0.0]
        for k in keys:
            for i, v in enumerate(sums.get(k, (0.0, 0.0, 0.0))):
                tot[i] += v
        return angle_from_sums(*tot)

    # --- evolution ------------------------------------------------------------------------
    def _mutate(self, path: Path) -> Path:
        out = {}
        for g, idx in path.items():
            flip = torch.rand(len(idx)) < self.config.mutate_prob
            new = self.allowed[g][torch.randint(len(self.allowed[g]), (len(idx),))]
            out[g] = torch.where(flip, new, idx)
        return out

    def _cross(self, a: Path, b: Path) -> Path:
        return {g: torch.where(torch.rand(len(a[g])) < 0.5, a[g], b[g]) for g in a}

    def evolve(self) -> tuple[Path, float]:
        """Evolutionary search for the path with the largest angle."""
        c = self.config
        sums = self._sums()
        scored: dict[tuple, tuple[float, Path]] = {}

        def score(p: Path) -> None:
            key = tuple(tuple(p[g].tolist()) for g in sorted(p))
            if key not in scored:
                scored[key] = (self.angle(p, sums=sums), p)

        population = [self.sample_path() for _ in range(c.population)]
        for p in population:
            score(p)
        for _ in range(c.iterations):
            top = sorted(scored.values(), key=lambda t: -t[0])[: c.parents]
            children = []
            for _ in range(c.population):
                i = int(torch.randint(len(top), (1,)))
                if torch.rand(()) < 0.5:
                    children.append(self._mutate(top[i][1]))
                else:
                    j = int(torch.randint(len(top), (1,)))
                    children.append(self._cross(top[i][1], top[j][1]))
            for p in children:
                score(p)
        best_angle, best = max(scored.values(), key=lambda t: t[0])
        return best, best_angle

    def export(self, path: Path) -> None:
        """Write ``path`` into the logits: the op logit is ``5 + angle`` of its own weights."""
        sums = self._sums()
        with torch.no_grad():
            for g, idx in path.items():
                a = self.arch_params[g]
                a.zero_()
                for r, op in enumerate(idx.tolist()):
                    own = angle_from_sums(*sums.get((g, r, op), (0.0, 0.0, 0.0)))
                    a[r, op] = 5.0 + own

    # --- the interface --------------------------------------------------------------------
    def step(self, train_batch: Batch, val_batch: Batch | None = None) -> dict[str, float]:
        if val_batch is not None:
            raise ValueError("random_labels trains on one stream; it got a validation batch")
        if self.edge_params is None:
            x = self.objective.inputs(train_batch)
            # a few samples suffice to trace; a graph input (one whole graph) stays whole
            self.map_edges(x[:2] if isinstance(x, torch.Tensor) else x)
        path = self.sample_path()
        for g, idx in path.items():
            self.counts[g][torch.arange(len(idx)), idx] += 1
        return self.weight_step(train_batch, self.path_weights(path))

    def end_epoch(self) -> None:
        super().end_epoch()
        if self.edge_params is not None:
            self.best_path, self.best_angle = self.evolve()
            self.export(self.best_path)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "init_weights": self.init_weights,
                "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.init_weights = {n: t.clone() for n, t in state["init_weights"].items()}
        self.counts = {g: t.clone() for g, t in state["counts"].items()}
