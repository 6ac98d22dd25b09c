"""The record of one pruning step: logged, drawn, printed and checkpointed alike.

The callback logs it, the reporter draws it, the app prints it and a checkpoint stores it.

A record is a plain dictionary (:class:`StepRecord` types it), so that it travels through
``torch.save``, JSON and every logger unchanged; this module is the one place that says
which keys it has and which of them are numbers to log and tabulate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict


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
