"""A discretizer plugin (docs/extending.md, "A discretizer"): the DARTS rule that never
keeps ``skip_connect``, ``search.discretizer: no_skip``."""

from diffnas.genotype import register_discretizer
from diffnas.genotype.discretize import darts_discretize


@register_discretizer("no_skip")
def no_skip(logits, space, edge_weights=None):
    """``logits``: per cell type, ``(num_edges, num_ops)`` in ``space.edge_groups()``
    order; ``edge_weights`` (given because the parameter exists): per cell type, one
    weight per edge when the strategy has ``edge_norm: true``, else None."""
    masked = {}
    for group, edges in space.edge_groups().items():
        a = logits[group].detach().clone()
        for row, edge in enumerate(edges):
            for col, op in enumerate(edge.candidates):
                if op == "skip_connect":
                    a[row, col] = a[row].min() - 1e4  # a weight of ~0 after the softmax
        masked[group] = a
    return darts_discretize(masked, space, edge_weights)

