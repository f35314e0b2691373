"""Genotypes (discrete architectures) and discretizers."""

from diffnas.genotype.genotype import (
    CellGenotype,
    Edge,
    Genotype,
    GenotypeError,
    from_darts_str,
    to_darts_str,
)
from diffnas.genotype.published import PUBLISHED, published_genotype, resolve_genotype

__all__ = [
    "PUBLISHED", "CellGenotype", "Edge", "Genotype", "GenotypeError", "from_darts_str",
    "published_genotype", "resolve_genotype", "to_darts_str",
]
