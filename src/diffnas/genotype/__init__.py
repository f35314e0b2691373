"""Genotypes (discrete architectures) and discretizers."""

from diffnas.genotype.genotype import (
    CellGenotype,
    Edge,
    Genotype,
    GenotypeError,
    cell_title,
    from_darts_str,
    to_darts_str,
)
from diffnas.genotype.published import PUBLISHED, published_genotype, resolve_genotype

__all__ = [
    "DISCRETIZERS", "PUBLISHED", "CellGenotype", "Edge", "Genotype", "GenotypeError",
    "cell_title", "from_darts_str", "published_genotype", "register_discretizer",
    "resolve_genotype", "to_darts_str",
]

_DISCRETIZE = ("DISCRETIZERS", "register_discretizer")


def __getattr__(name: str):
    """The discretizer names, imported on first use: discretize.py imports the spaces,
    whose modules import this package (an eager import here would be circular)."""
    if name in _DISCRETIZE:
        import importlib

        return getattr(importlib.import_module("diffnas.genotype.discretize"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
