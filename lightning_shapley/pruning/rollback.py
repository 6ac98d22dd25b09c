"""Undoing a pruning step: after it was judged, or because it failed half-way.

A schedule that judges each step after an epoch of fine-tuning (``UntilDrop``) may roll
the step back. What that needs is saved before the step runs (:func:`before_step`): the
rounds re-estimate the BatchNorm statistics of every channel, so the state of every
channel still in play is kept until the step is over; then only the channels the step
pruned are kept (:meth:`BeforeStep.undo`), as a plain dictionary that a checkpoint can
hold. :func:`roll_back` puts them back.

A step that fails (an exception, Ctrl-C) is undone whole: :class:`ModelState` holds what
the step may change in the model, and puts it back bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

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


class ModelState:
    """Everything a pruning step may change in a model, saved so a failed step leaves no trace.

    A step reparametrizes parameters (``torch.nn.utils.prune``: ``<p>`` becomes ``<p>_orig``
    with a ``<p>_mask`` buffer and a forward pre-hook), grows masks, and re-estimates the
    BatchNorm statistics. :meth:`restore` puts every module back as it was when the state
    was taken: the same ``Parameter`` objects under the same names (so optimizers keep
    them), every parameter's and buffer's values bit for bit, no buffer, hook or attribute
    the step added, the pruning methods' records, and the train/eval flags.

    Example:
        >>> from lightning_shapley.pruning.masking import ChannelMask
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        >>> state = ModelState(net)
        >>> _ = ChannelMask.apply(net[0], "weight", torch.tensor([True, False]))
        >>> state.restore()
        >>> sorted(name for name, _ in net.named_parameters())[:2], len(net[0]._forward_pre_hooks)
        (['0.bias', '0.weight'], 0)
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [_ModuleState(module) for module in model.modules()]

    def restore(self) -> None:
        """Puts every module back as it was when this state was taken."""
        for module_state in self._modules:
            module_state.restore()


class _ModuleState:
    """One module's parameters, buffers, hooks, tensor attributes and pruning records."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.parameters = dict(module._parameters)
        self.values = {
            name: parameter.detach().clone()
            for name, parameter in module._parameters.items()
            if parameter is not None
        }
        self.buffers = {
            name: (buffer, None if buffer is None else buffer.detach().clone())
            for name, buffer in module._buffers.items()
        }
        self.pre_hooks = dict(module._forward_pre_hooks)
        self.load_hooks = dict(module._load_state_dict_post_hooks)
        self.load_pre_hooks = dict(module._load_state_dict_pre_hooks)
        # torch.nn.utils.prune keeps each effective weight as a plain tensor attribute.
        self.attributes = {k: v for k, v in vars(module).items() if isinstance(v, Tensor)}
        self.records = [
            (hook, dict(vars(hook)))
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)
        ]
        self.training = module.training

    def restore(self) -> None:
        module = self.module
        module._parameters.clear()
        module._parameters.update(self.parameters)
        with torch.no_grad():
            for name, values in self.values.items():
                self.parameters[name].copy_(values)
        module._buffers.clear()
        with torch.no_grad():
            for name, (buffer, values) in self.buffers.items():
                if buffer is not None:
                    buffer.copy_(values)
                module._buffers[name] = buffer
        for hooks, saved in (
            (module._forward_pre_hooks, self.pre_hooks),
            (module._load_state_dict_post_hooks, self.load_hooks),
            (module._load_state_dict_pre_hooks, self.load_pre_hooks),
        ):
            hooks.clear()
            hooks.update(saved)
        for name in [k for k, v in vars(module).items() if isinstance(v, Tensor)]:
            if name not in self.attributes:
                object.__delattr__(module, name)  # not Module's, which would look elsewhere
        for name, value in self.attributes.items():
            object.__setattr__(module, name, value)
        for hook, record in self.records:
            vars(hook).clear()
            vars(hook).update(record)
        module.training = self.training
