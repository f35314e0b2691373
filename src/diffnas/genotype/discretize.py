"""Discretizers: architecture parameters -> genotype.

``darts``: per intermediate node, keep the ``k`` incoming edges (``k`` = the space's
``inputs_per_node()``) whose strongest non-``none`` op weight is largest; each kept edge
takes that op; a node's kept edges are listed strongest first, as DARTS's ``genotype()``
lists them. ``argmax``: every edge keeps its strongest op, ``none`` included (the
NAS-Bench-201 rule). Ties are broken deterministically: the lower source node wins, and
among ops the one listed first. Logits that are not finite (a diverged search) are an
error, not a genotype.

Your own rule: ``@register_discretizer("name")`` on a function ``(logits, space) ->
Genotype``, selected by ``search.discretizer: name``. One that also takes an
``edge_weights`` parameter receives the edge-normalisation weights (``edge_norm: true``:
per group, one weight per edge) when the run has them (docs/extending.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping

import torch

from diffnas.genotype.genotype import CellGenotype, Edge, Genotype
from diffnas.registry import Registry
from diffnas.spaces.base import SearchSpace

Discretizer = Callable[[Mapping[str, torch.Tensor], SearchSpace], Genotype]
DISCRETIZERS: Registry[Discretizer] = Registry("discretizer")


def register_discretizer(name: str) -> Callable[[Discretizer], Discretizer]:
    """Register a discretizer ``(logits, space[, edge_weights]) -> Genotype`` under
    ``name`` (``search.discretizer: name``). ``logits`` are the raw architecture logits
    per cell type, ``(num_edges, num_ops)`` in ``space.edge_groups()`` order; a function
    with an ``edge_weights`` parameter (or ``**kwargs``) is given the edge-normalisation
    weights when the run uses them."""
    return DISCRETIZERS.register(name)


def takes_edge_weights(fn: Callable) -> bool:
    """Whether ``fn`` accepts an ``edge_weights`` keyword (named, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # not introspectable: call it the plain way
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "edge_weights" and p.kind in (
        p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) for p in params)


def _check_finite(values: Mapping[str, torch.Tensor], what: str) -> None:
    """NaN or inf would still pick ops (every comparison is false) and hand back a
    valid-looking genotype from a diverged search: refuse instead."""
    for g, a in values.items():
        if not bool(torch.isfinite(a.detach()).all()):
            raise ValueError(f"{what} of group {g!r} are not finite (NaN or inf): the search "
                             "diverged, so there is no architecture to read from them")


def _check_shapes(logits: Mapping[str, torch.Tensor], space: SearchSpace) -> None:
    """Logits must be one row per edge and one column per candidate op of each group:
    other shapes would silently drop edges or ops (rows are matched to edges in order)."""
    for group, edges in space.edge_groups().items():
        if group not in logits:
            raise ValueError(f"no logits for cell group {group!r} of space {space.name!r} "
                             f"(got groups {sorted(logits)})")
        want = (len(edges), max((len(e.candidates) for e in edges), default=0))
        got = tuple(logits[group].shape)
        if got != want:
            raise ValueError(f"logits of group {group!r} have shape {got}, but space "
                             f"{space.name!r} has {want[0]} edges of {want[1]} candidate ops")


def _weights(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    _check_finite(logits, "architecture logits")
    return {g: torch.softmax(a.detach().double(), dim=-1) for g, a in logits.items()}


def _first_argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


@DISCRETIZERS.register("darts")
def darts_discretize(
    logits: Mapping[str, torch.Tensor], space: SearchSpace,
    edge_weights: Mapping[str, torch.Tensor] | None = None,
) -> Genotype:
    """The DARTS rule (top-k inputs per node by strongest non-``none`` weight). With
    ``edge_weights`` (PC-DARTS edge normalization, one per edge) an edge's strength is
    its edge weight times its strongest op weight."""
    k = space.inputs_per_node()
    weights = _weights(logits)
    cells = []
    for group, edges in space.edge_groups().items():
        W = weights[group].tolist()
        scale = [1.0] * len(edges)
        if edge_weights and group in edge_weights:
            _check_finite({group: edge_weights[group]}, "edge weights")
            scale = edge_weights[group].detach().double().tolist()
        by_dst: dict[int, list[tuple[float, int, str]]] = {}
        for row, e, sc in zip(W, edges, scale, strict=True):
            live = [i for i, name in enumerate(e.candidates) if name != "none"]
            if not live:
                raise ValueError(f"edge {e.label}: every candidate op is 'none'; the darts "
                                 "rule keeps an edge's strongest other op")
            best = live[_first_argmax([row[i] for i in live])]
            by_dst.setdefault(e.dst, []).append((sc * row[best], e.src, e.candidates[best]))
        kept: list[Edge] = []
        for dst in sorted(by_dst):
            # strongest first, as DARTS's genotype() lists them (the text then reads the
            # same, and a retrained network builds its ops in DARTS's order); equal
            # strengths keep the lower source first, like DARTS's stable sort
            ranked = sorted(by_dst[dst], key=lambda t: (-t[0], t[1]))[:k]
            kept += [Edge(op, src, dst) for _, src, op in ranked]
        cells.append(CellGenotype(group, tuple(kept), space.concat(group)))
    return Genotype(space.name, tuple(cells))


@DISCRETIZERS.register("argmax")
def argmax_discretize(logits: Mapping[str, torch.Tensor], space: SearchSpace) -> Genotype:
    """Every edge keeps its strongest op (``none`` included)."""
    weights = _weights(logits)
    cells = []
    for group, edges in space.edge_groups().items():
        kept = []
        for row, e in zip(weights[group].tolist(), edges, strict=True):
            kept.append(Edge(e.candidates[_first_argmax(row)], e.src, e.dst))
        cells.append(CellGenotype(group, tuple(kept), space.concat(group)))
    return Genotype(space.name, tuple(cells))


def discretize(
    logits: Mapping[str, torch.Tensor], space: SearchSpace, rule: str | None = None,
    edge_weights: Mapping[str, torch.Tensor] | None = None,
) -> Genotype:
    """Apply ``rule`` (default: the space's own) to logits keyed by cell type;
    ``edge_weights`` (edge normalization, when the run has them) go to the rules that take
    an ``edge_weights`` parameter: ``darts``, which ranks edges by them, and any
    registered rule that declares it (argmax keeps every edge: no edge ranking to scale)."""
    name = rule or space.default_discretizer
    fn = DISCRETIZERS.get(name)
    _check_shapes(logits, space)
    if edge_weights and takes_edge_weights(fn):
        genotype = fn(logits, space, edge_weights=edge_weights)
    else:
        genotype = fn(logits, space)
    if not isinstance(genotype, Genotype):  # (a plugin's rule; a dict has no .space)
        raise ValueError(f"discretizer {name!r} returned {type(genotype).__name__}, not a "
                         "Genotype: a discretizer is (logits, space) -> diffnas.genotype."
                         "Genotype (Genotype.from_dict reads a genotype's dict)")
    return genotype
