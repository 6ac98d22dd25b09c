"""Undoing a pruning step: the masks before it, and the weights and statistics it took away.

A schedule that judges each step after an epoch of fine-tuning (``UntilDrop``) may roll
the step back. What that needs is saved before the step runs (:func:`before_step`): the
rounds re-estimate the BatchNorm statistics of every channel, so the state of every
channel still in play is kept until the step is over; then only the channels the step
pruned are kept (:meth:`BeforeStep.undo`), as a plain dictionary that a checkpoint can
hold. :func:`roll_back` puts them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_shapley.layers import Unit
from lightning_shapley.pruning.masking import (
    channel_state,
    load_channel_state,
    pruned_channels,
    set_pruned_channels,
)


@dataclass(frozen=True)
class BeforeStep:
    """The units' masks and the state of their channels in play, before a step.

    Attributes:
        masks: per unit, the channels pruned before the step.
        state: per unit, what :func:`~lightning_shapley.pruning.masking.channel_state`
            saved of the channels not pruned then.
    """

    masks: dict[str, Tensor]
    state: dict[str, dict[str, Tensor]]

    def undo(self, model: nn.Module, units: Sequence[Unit], target: float) -> dict[str, Any]:
        """What rolling the step back needs, now that it ran: a checkpointable dictionary.

        Args:
            model: the model after the step.
            units: its units.
            target: the target sparsity before the step.
        """
        pruned = {u.name: pruned_channels(model, u) & ~self.masks[u.name] for u in units}
        return {
            "masks": {name: flags.tolist() for name, flags in self.masks.items()},
            "pruned": {name: flags.tolist() for name, flags in pruned.items()},
            "state": {
                name: _restrict(self.state[name], ~self.masks[name], pruned[name])
                for name in pruned
            },
            "target": target,
        }


def before_step(model: nn.Module, units: Sequence[Unit]) -> BeforeStep:
    """Saves the masks of ``units`` and the state of every channel still in play."""
    masks = {unit.name: pruned_channels(model, unit) for unit in units}
    state = {unit.name: channel_state(model, unit, ~masks[unit.name]) for unit in units}
    return BeforeStep(masks, state)


def roll_back(model: nn.Module, units: Sequence[Unit], undo: Mapping[str, Any]) -> None:
    """Restores the masks before a step, and its channels' weights and statistics.

    Args:
        model: the model.
        units: its units.
        undo: what :meth:`BeforeStep.undo` returned for the step.
    """
    for unit in units:
        set_pruned_channels(model, unit, _flags(undo["masks"][unit.name]))
        revived = _flags(undo["pruned"][unit.name])
        load_channel_state(model, unit, revived, undo["state"][unit.name])


def _restrict(state: dict[str, Tensor], saved: Tensor, wanted: Tensor) -> dict[str, Tensor]:
    """The part of a ``channel_state`` of the ``saved`` channels that holds ``wanted``."""
    rows = wanted[saved.nonzero().flatten()]
    return {key: tensor[rows] for key, tensor in state.items()}


def _flags(values: list[bool]) -> Tensor:
    return torch.tensor(values, dtype=torch.bool)
