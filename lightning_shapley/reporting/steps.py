"""The table of a run's steps: each history entry with what came after it.

A history entry (a :class:`~lightning_shapley.pruning.record.StepRecord`) knows the model
before and after its step; how the step fared after fine-tuning is only known from the
entry after it, or at the end of fit. :func:`step_rows` joins them, one row per entry,
for :func:`~lightning_shapley.reporting.figures.accuracy_steps_figure` and the W&B table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_shapley.pruning.record import SCALARS, scalars

# The record's numbers a row shows, in the record's order: all but the dense model's
# metric, which only a roll-back entry has, and the roll-back flag, which ends the row.
_RECORDED = tuple(key for key in SCALARS if key not in ("dense_metric", "rolled_back"))
# The reporter's own columns, known only from what came after the step: they follow the
# record's accuracies, so that each accuracy and loss reads before, after, fine-tuned.
_DERIVED = ("accuracy_finetuned", "loss_before", "loss_after", "loss_finetuned")
_AT = _RECORDED.index("accuracy_after") + 1

#: The columns of :func:`step_rows` and of the W&B table ``pruning/steps``.
STEP_COLUMNS = ("step", *_RECORDED[:_AT], *_DERIVED, *_RECORDED[_AT:], "rolled_back")


def step_rows(
    history: Sequence[Mapping[str, Any]],
    final: Mapping[str, float] | None = None,
    loss_from_value: bool = False,
    losses_after: Sequence[float | None] = (),
) -> list[dict[str, Any]]:
    """One row per history entry, with what came after it: fine-tuned accuracy and loss.

    The accuracy (and loss) after fine-tuning of a step is the one before the next entry
    (the next step, or the judgement that rolled it back); for the last entry, ``final``'s
    (``None`` when it is not given: no epoch of fine-tuning followed the last entry).

    Args:
        history: the callback's history.
        final: ``{"accuracy": ..., "loss": ..., "value": ...}`` measured at the end of fit.
        loss_from_value: whether the value is the negative cross-entropy, so that the
            loss before and after each step is minus the value.
        losses_after: otherwise, the cross-entropy measured after each entry, if known
            (the loss before a step is then not known).

    Returns:
        Rows with the keys of :data:`STEP_COLUMNS`, in that order; a number the entry
        lacks is ``None``.

    Example:
        >>> entry = {"epoch": 0, "sparsity": 0.5, "accuracy_before": 0.9,
        ...          "accuracy_after": 0.7, "value_before": -0.3, "value_after": -0.8}
        >>> (row,) = step_rows([entry], {"accuracy": 0.85, "loss": 0.4}, loss_from_value=True)
        >>> row["accuracy_finetuned"], row["loss_after"], row["loss_finetuned"]
        (0.85, 0.8, 0.4)
    """
    final = final or {}
    rows = []
    for index, entry in enumerate(history):
        numbers = scalars(entry)
        after = history[index + 1] if index + 1 < len(history) else None
        tuned = after["accuracy_before"] if after is not None else final.get("accuracy")
        # The loss before a step is known only as minus the value; at the end, as measured.
        loss = {"before": None, "after": None, "finetuned": None if after else final.get("loss")}
        if loss_from_value:
            loss["before"], loss["after"] = -entry["value_before"], -entry["value_after"]
            if after is not None:
                loss["finetuned"] = -after["value_before"]
        elif index < len(losses_after):
            loss["after"] = losses_after[index]
        row = {
            "step": index + 1,
            **{key: numbers.get(key) for key in _RECORDED},
            "accuracy_finetuned": tuned,
            **{f"loss_{when}": loss[when] for when in ("before", "after", "finetuned")},
            "rolled_back": bool(numbers.get("rolled_back", False)),
        }
        rows.append({column: row[column] for column in STEP_COLUMNS})
    return rows
