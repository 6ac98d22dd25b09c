"""The dry run at set-up: each unit scored and removed once, before any training step.

A unit that cannot be scored, or whose masked channels do not compute what removing them
computes, would otherwise fail at the first pruning step or when the model is compacted
at the end of fit, after hours of training. :func:`dry_run` tries both on one scoring
batch while fit sets up:

* **removal**: on a copy of the model, one channel of every unit is masked and the copy is
  compacted (:func:`~lightning_shapley.export.compact`); the outputs must not change. A
  unit fails when, say, an activation with ``f(0) != 0`` (a sigmoid) lies between it and
  its consumer, so a masked channel still feeds its consumer a constant.
* **scoring**: the channel game of every unit is built on the batch and one coalition
  is evaluated, through the engine the step will use (the model's inputs, outputs and
  targets, the value function and the mask points all take part).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_shapley.export import compact
from lightning_shapley.model_io import Inputs
from lightning_shapley.pruning.masking import copy_model, pruned_channels, set_pruned_channels
from lightning_shapley.pruning.units import PrunableUnit
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.values import Batch, ValueFunction


@dataclass(frozen=True)
class DryRun:
    """What the dry run found.

    Attributes:
        units: the units that passed, in the order given.
        refused: why each unit that failed the removal check cannot be pruned, by name.
        engines: the engine that scores each unit that passed (``"split+fold"``,
            ``"split"`` or ``"full"``), when its game was tried.
    """

    units: list[PrunableUnit]
    refused: dict[str, str]
    engines: dict[str, str]


def dry_run(
    model: nn.Module,
    units: Sequence[PrunableUnit],
    batch: Batch,
    value: ValueFunction,
    *,
    score: bool = True,
) -> DryRun:
    """Checks that every unit can be removed and scored, on one batch; the model is left as is.

    Args:
        model: the model, masked or not.
        units: its units.
        batch: one scoring batch, on the model's device.
        value: the coalition value.
        score: also build each unit's channel game and evaluate one coalition.

    Returns:
        The units that passed, why the others cannot be pruned, and the engines.

    Raises:
        ValueError: a unit's game fails; the message names the unit and the error.
    """
    refused = _removal_problems(model, list(units), batch[0])
    passed = [unit for unit in units if unit.name not in refused]
    engines = {}
    if score:
        for unit in passed:
            engines[unit.name] = _try_game(model, unit, batch, value)
    return DryRun(passed, refused, engines)


def _removal_problems(
    model: nn.Module, units: list[PrunableUnit], inputs: Inputs
) -> dict[str, str]:
    """Why removing a channel of each unit that fails changes the model's outputs.

    All units are tried together first; only when that fails is each tried alone, to
    name the ones to blame.
    """
    if not units or _removal_problem(model, units, inputs) is None:
        return {}
    problems = {unit.name: _removal_problem(model, [unit], inputs) for unit in units}
    return {name: problem for name, problem in problems.items() if problem is not None}


def _removal_problem(model: nn.Module, units: list[PrunableUnit], inputs: Inputs) -> str | None:
    replica = copy_model(model)
    for unit in units:
        pruned = pruned_channels(replica, unit)
        if int(pruned.sum()) < unit.n_channels - 1:
            pruned[int((~pruned).nonzero()[0])] = True
        set_pruned_channels(replica, unit, pruned)
    try:
        compact(replica, inputs)
    except ValueError as error:
        return str(error)
    return None


def _try_game(model: nn.Module, unit: PrunableUnit, batch: Batch, value: ValueFunction) -> str:
    try:
        game = ChannelGame.from_unit(model, unit, [batch], value=value)
        result = game(torch.ones(1, game.n_players, dtype=torch.bool))
    except Exception as error:
        raise ValueError(
            f"the dry run at set-up could not score unit {unit.name!r} on a scoring batch "
            f"({type(error).__name__}: {error}); see batch_transform= and output_transform= "
            "for the model's inputs and outputs, or leave the layer out with layers="
        ) from error
    if not torch.isfinite(result).all():
        raise ValueError(
            f"the dry run at set-up scored unit {unit.name!r} {result.item()} with all its "
            "channels kept; a value must be a finite number"
        )
    return game.engine
