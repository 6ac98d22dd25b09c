"""Game-theoretic structured pruning for PyTorch Lightning.

The public surface: :class:`ShapleyPruning`, the callback that prunes on schedule;
:func:`shapley_values` values one layer's channels; :func:`compact` removes the pruned
channels physically;
:class:`ChannelGame` is the game behind it; :mod:`lightning_shapley.estimators` holds the
estimators, pure functions of a value function over coalitions.
"""

from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.estimators import ShapleyEstimate
from lightning_shapley.export import compact
from lightning_shapley.functional import shapley_values
from lightning_shapley.game import ChannelGame
from lightning_shapley.weighting import Weighting

__all__ = [
    "ChannelGame",
    "ShapleyEstimate",
    "ShapleyPruning",
    "Weighting",
    "compact",
    "shapley_values",
]
__version__ = "0.1.0"
