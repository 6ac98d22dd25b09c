"""The record of one pruning step: logged, drawn, printed and checkpointed alike.

The callback logs it, the reporter draws it, the app prints it and a checkpoint stores it.

A record is a plain dictionary (:class:`StepRecord` types it), so that it travels through
``torch.save``, JSON and every logger unchanged; this module is the one place that says
which keys it has and which of them are numbers to log and tabulate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from torch import nn

from lightning_shapley.layers import Unit
from lightning_shapley.pruning.masking import pruned_channels, unmasked_parameters
from lightning_shapley.pruning.scorers import ChannelScores
from lightning_shapley.shapley.values import Evaluation


class StepRecord(TypedDict, total=False):
    """One entry of ``ShapleyPruning.history``: a step, or the roll-back of one.

    Keys:
        epoch: the epoch at whose end the step ran.
        target_sparsity: the sparsity the schedule asked for.
        sparsity: the fraction of all units' channels pruned after the step.
        unit_sparsity: that fraction per unit.
        parameters: parameters not held at zero by a mask, after the step.
        masks: per unit, which channels are pruned after the step.
        rolled_back: whether this entry undid the step before it.
        value_before, value_after: the scoring value before and after the step.
        accuracy_before, accuracy_after: the scoring accuracy before and after it.
        scoring_seconds: wall-clock seconds of the step (the slowest process).
        evaluations: coalition evaluations the step spent (0 for free criteria).
        values, stderr: per unit, each channel's latest score and its standard error.
        dense_metric: the dense model's metric, on a roll-back entry.
    """

    epoch: int
    target_sparsity: float
    sparsity: float
    unit_sparsity: dict[str, float]
    parameters: int
    masks: dict[str, list[bool]]
    rolled_back: bool
    value_before: float
    value_after: float
    accuracy_before: float
    accuracy_after: float
    scoring_seconds: float
    evaluations: int
    values: dict[str, list[float]]
    stderr: dict[str, list[float]]
    dense_metric: float


#: The numbers of a record, in the order tables show them.
SCALARS = (
    "epoch",
    "target_sparsity",
    "sparsity",
    "parameters",
    "rolled_back",
    "accuracy_before",
    "accuracy_after",
    "value_before",
    "value_after",
    "scoring_seconds",
    "evaluations",
    "dense_metric",
)


def scalars(record: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of ``record`` that it has, in the order of :data:`SCALARS`.

    Example:
        >>> scalars({"epoch": 3, "sparsity": 0.5, "masks": {"conv": [True, False]}})
        {'epoch': 3, 'sparsity': 0.5}
    """
    return {key: record[key] for key in SCALARS if key in record}


def metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The record as logger metrics: ``pruning/<number>`` and ``pruning/sparsity/<unit>``."""
    logged = {f"pruning/{key}": float(value) for key, value in scalars(record).items()}
    return logged | {f"pruning/sparsity/{k}": v for k, v in record["unit_sparsity"].items()}


def step_record(
    model: nn.Module,
    units: Sequence[Unit],
    *,
    epoch: int,
    target: float,
    before: Evaluation,
    after: Evaluation,
    scores: Mapping[str, ChannelScores],
    seconds: float,
) -> StepRecord:
    """The record of a step that just ran: where the model stands, and what it cost."""
    return {
        **_standing(model, units, epoch, target),
        "rolled_back": False,
        **_change(before, after),
        "scoring_seconds": seconds,
        "evaluations": sum(s.evaluations for s in scores.values()),
        "values": {name: s.values.tolist() for name, s in scores.items()},
        "stderr": {name: s.stderr.tolist() for name, s in scores.items()},
    }


def rollback_record(
    model: nn.Module,
    units: Sequence[Unit],
    *,
    epoch: int,
    target: float,
    dense_metric: float,
    before: Evaluation,
    after: Evaluation,
) -> StepRecord:
    """The record of a roll-back that just happened, back to the sparsity ``target``."""
    return {
        **_standing(model, units, epoch, target),
        "rolled_back": True,
        "dense_metric": dense_metric,
        **_change(before, after),
    }


def _standing(model: nn.Module, units: Sequence[Unit], epoch: int, target: float) -> StepRecord:
    """Where the model stands now: sparsities, unmasked parameters and masks."""
    pruned = {unit.name: pruned_channels(model, unit) for unit in units}
    total = sum(unit.n_channels for unit in units)
    removed = sum(int(p.sum()) for p in pruned.values())
    return {
        "epoch": epoch,
        "target_sparsity": target,
        "sparsity": removed / total,
        "unit_sparsity": {name: float(p.double().mean()) for name, p in pruned.items()},
        "parameters": unmasked_parameters(model),
        "masks": {name: p.tolist() for name, p in pruned.items()},
    }


def _change(before: Evaluation, after: Evaluation) -> StepRecord:
    return {
        "value_before": before.value,
        "value_after": after.value,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
    }
