"""Resuming a pruned run: the masks come back from the pruning callbacks' checkpointed state.

A checkpoint holds plain weights (:func:`~lightning_shapley.pruning.masking.bake_masks`),
with the pruned channels at zero; the masks travel in each pruning callback's history.
Resumed, the masks are applied again before training starts, so the pruned channels
stay pruned; a unit the checkpoint pruned that no callback covers any more is refused,
since its channels would revive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_shapley.layers import Unit
from lightning_shapley.pruning.masking import prune_channels


def pruned_units(checkpoint: Mapping[str, Any], state_key_prefix: str) -> set[str]:
    """Every unit with pruned channels in the checkpointed state of the pruning callbacks.

    Args:
        checkpoint: a Lightning checkpoint.
        state_key_prefix: the start of the callbacks' state keys (their class name).
    """
    return {
        name
        for key, state in checkpoint.get("callbacks", {}).items()
        if key.startswith(state_key_prefix) and state.get("history")
        for name, mask in state["history"][-1]["masks"].items()
        if any(mask)
    }


def check_covered(pruned: Iterable[str], covered: Iterable[str], layers: object) -> None:
    """Raises a ``ValueError`` if a unit the checkpoint pruned is no callback's any more."""
    dropped = sorted(set(pruned) - set(covered))
    if dropped:
        raise ValueError(
            f"the checkpoint's pruning pruned the units {dropped}, which layers={layers} "
            "leaves out; resume with layers that include them, or their pruned channels "
            "would revive"
        )


def reapply_masks(
    model: nn.Module, units: Sequence[Unit], masks: Mapping[str, Sequence[bool]]
) -> None:
    """Masks again, in ``model``, the channels ``masks`` lists as pruned for each unit."""
    for unit in units:
        if unit.name in masks:
            pruned = torch.tensor(list(masks[unit.name]), dtype=torch.bool)
            if pruned.any():
                prune_channels(model, unit, pruned)
