"""Figures and W&B charts of a pruning run: what a reader of a Shapley-pruning paper expects.

:class:`PruningReporter` follows a :class:`~lightning_shapley.callback.ShapleyPruning` run
and draws five figures, saved as PNG files and sent to every logger that takes images
(W&B and TensorBoard: as images; other loggers, such as CSV: the files only):

* ``coalition_values.png``: the coalition value against the coalition size, per unit, on
  the dense model (random coalitions of each size: mean and spread);
* ``ranked_values.png``: each unit's channel scores of the last step, ranked, with their
  standard errors as error bars and the channels that step pruned in red;
* ``architecture.png``: channels per unit, dense and kept;
* ``accuracy_steps.png``: the scoring accuracy before pruning, after pruning and after
  fine-tuning, per step;
* ``model_size.png``: the parameters of the dense model and after each step, and the
  sizes in bytes given to :meth:`PruningReporter.add_sizes` (compacted, quantized...).

With a ``WandbLogger`` each step is also logged for W&B's charts: the pruning curves
(``pruning/curve/*``: accuracy, loss, value and parameters, against the sparsity), per
unit a ranked bar chart of the channel scores (``pruning/channel_values/<unit>/step_<k>``)
and the step's ranked figure with error bars (``pruning/ranked_values``); at the end of
fit, a table of all steps (``pruning/steps``), line charts against the sparsity and
against the step (``pruning/charts/*``) and the figures (``pruning/figures/*``).

The modules, one job each:

* :mod:`~lightning_shapley.reporting.curves`: the coalition curves, measured on a
  :class:`~lightning_shapley.shapley.game.ChannelGame`;
* :mod:`~lightning_shapley.reporting.steps`: the table of the steps, one row per history
  entry with what came after it;
* :mod:`~lightning_shapley.reporting.figures`: the figures, pure functions of numbers,
  built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``, so no
  global figure state is created or left behind;
* :mod:`~lightning_shapley.reporting.reporter`: :class:`PruningReporter`, which measures,
  draws and hands everything to the loggers.
"""

from lightning_shapley.reporting.curves import MAX_SIZES, CoalitionCurve, coalition_values_by_size
from lightning_shapley.reporting.figures import (
    accuracy_steps_figure,
    architecture_figure,
    coalition_size_figure,
    model_size_figure,
    ranked_values_figure,
    save_figure,
)
from lightning_shapley.reporting.reporter import FIGURES, PruningReporter
from lightning_shapley.reporting.steps import STEP_COLUMNS, step_rows

__all__ = [
    "FIGURES",
    "MAX_SIZES",
    "STEP_COLUMNS",
    "CoalitionCurve",
    "PruningReporter",
    "accuracy_steps_figure",
    "architecture_figure",
    "coalition_size_figure",
    "coalition_values_by_size",
    "model_size_figure",
    "ranked_values_figure",
    "save_figure",
    "step_rows",
]
