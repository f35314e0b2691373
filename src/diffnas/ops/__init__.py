"""Candidate operations. Importing this package registers the built-in ops."""

from diffnas.ops import conv, pool  # noqa: F401  (registration side effects)
from diffnas.ops.registry import (
    OPS,
    OpFactory,
    check_op_contract,
    create_op,
    list_ops,
    register_op,
)
from diffnas.ops.savers import twice_differentiable

__all__ = ["OPS", "OpFactory", "check_op_contract", "create_op", "list_ops", "register_op",
           "twice_differentiable"]
