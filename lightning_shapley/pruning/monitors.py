"""Monitored metrics after a pruning step: never rank pruned weights by their dense score.

Lightning validates before ``on_train_epoch_end``, where a step prunes; ModelCheckpoint
and EarlyStopping then read the monitored metric at the end of that epoch (by default,
when validation runs every epoch), after the step. The value they would read belongs to
the weights before it. :func:`mark_stale` replaces each such value with the worst finite
number for the monitor's mode for the rest of the epoch, so the pruned, not yet
fine-tuned weights never become "best" and EarlyStopping counts the epoch as one without
improvement; the next validation measures the pruned model. :func:`restore` puts the
measured values back.
"""

from __future__ import annotations

import lightning
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import Tensor


def mark_stale(trainer: lightning.Trainer) -> dict[str, Tensor]:
    """Sets every monitored metric to its mode's worst value; returns the measured ones."""
    measured: dict[str, Tensor] = {}
    for callback in trainer.callbacks:
        if not isinstance(callback, ModelCheckpoint | EarlyStopping):
            continue
        value = trainer.callback_metrics.get(callback.monitor) if callback.monitor else None
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        measured.setdefault(callback.monitor, value)
        info = torch.finfo(value.dtype)
        worst = info.min if callback.mode == "max" else info.max
        trainer.callback_metrics[callback.monitor] = torch.full_like(value, worst)
    return measured


def restore(trainer: lightning.Trainer, measured: dict[str, Tensor]) -> None:
    """Puts back the values :func:`mark_stale` replaced."""
    trainer.callback_metrics.update(measured)
