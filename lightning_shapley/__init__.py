"""Game-theoretic structured pruning for PyTorch Lightning.

The tree follows the pipeline: :mod:`~lightning_shapley.shapley` values channels (the
game, its engines and estimators), :mod:`~lightning_shapley.pruning` turns values into
masks (units, masking, scorers, rounds, schedules), :mod:`~lightning_shapley.callback`
decides when inside a Lightning run, :mod:`~lightning_shapley.export` deploys the result,
:mod:`~lightning_shapley.reporting` draws it, and :mod:`~lightning_shapley.app` is the
Hydra application around all of it. The names below are the public surface.
"""

from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.export import (
    Artifact,
    compact,
    export_artifacts,
    load_compact,
    quantize,
    save_compact,
    to_onnx,
    to_torchscript,
)
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.schedule import (
    Gradual,
    MiddleOfTraining,
    OneShot,
    PruningSchedule,
    UntilDrop,
)
from lightning_shapley.pruning.scorers import (
    BatchNormScorer,
    ChannelScores,
    L1Scorer,
    LeaveOneOutScorer,
    RandomScorer,
    Scorer,
    ShapleyScorer,
    TaylorScorer,
)
from lightning_shapley.pruning.units import PrunableUnit, find_units
from lightning_shapley.reporting import PruningReporter
from lightning_shapley.shapley.estimators import ShapleyEstimate
from lightning_shapley.shapley.functional import shapley_values
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.weighting import Weighting

__all__ = [
    "Artifact",
    "BatchNormScorer",
    "ChannelGame",
    "ChannelScores",
    "Gradual",
    "L1Scorer",
    "LeaveOneOutScorer",
    "MiddleOfTraining",
    "OneShot",
    "PrunableUnit",
    "PruningReporter",
    "PruningSchedule",
    "RandomScorer",
    "RoundPruner",
    "Scorer",
    "ShapleyEstimate",
    "ShapleyPruning",
    "ShapleyScorer",
    "TaylorScorer",
    "UntilDrop",
    "Weighting",
    "compact",
    "export_artifacts",
    "find_units",
    "load_compact",
    "quantize",
    "save_compact",
    "shapley_values",
    "to_onnx",
    "to_torchscript",
]
__version__ = "0.1.0"
