"""Architecture parameters and relaxations."""

from diffnas.arch.params import ArchParams
from diffnas.arch.relax import (
    RELAXATIONS,
    ArchWeights,
    Relaxation,
    SoftmaxRelaxation,
    check_relaxation_output,
    create_relaxation,
    register_relaxation,
)

__all__ = [
    "RELAXATIONS", "ArchParams", "ArchWeights", "Relaxation", "SoftmaxRelaxation",
    "check_relaxation_output", "create_relaxation", "register_relaxation",
]
