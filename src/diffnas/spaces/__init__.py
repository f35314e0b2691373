"""Search spaces. Importing this package registers the built-in spaces."""

from diffnas.spaces import (
    darts_cnn,  # noqa: F401  (registration)
    darts_rnn,  # noqa: F401  (registration)
    gnn,  # noqa: F401  (registration)
    nb201,  # noqa: F401  (registration)
)
from diffnas.spaces.base import DataShape, EdgeSpec, SearchSpace
from diffnas.spaces.registry import (
    SPACES,
    create_space,
    list_spaces,
    register_space,
    space_config,
    space_engine,
)

__all__ = [
    "SPACES", "DataShape", "EdgeSpec", "SearchSpace", "create_space", "list_spaces",
    "register_space", "space_config", "space_engine",
]
