"""Characteristic functions: how good the model is on the scoring data, one number per coalition.

A coalition value function takes the logits of ``k`` coalitions over all scoring samples,
shape ``[k, N, ...]``, and the targets, shape ``[N, ...]``, and returns ``[k]`` values,
higher is better. :func:`resolve_value` turns the user's setting into one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor
from torchmetrics import Metric

CoalitionValue = Callable[[Tensor, Tensor], Tensor]
ValueSetting = str | Metric | Callable[[Tensor, Tensor], float | Tensor]

VALUES = ("loss", "accuracy")


def negative_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative mean cross-entropy of each coalition's logits (class dimension 1 of a sample)."""
    k = logits.shape[0]
    flat_targets = targets.expand(k, *targets.shape).flatten(0, 1)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), flat_targets, reduction="none")
    return -losses.reshape(k, -1).mean(1)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of samples whose highest logit is the target class (dimension 1 of a sample)."""
    return (logits.argmax(2) == targets).flatten(1).float().mean(1)


class _MetricValue:
    """A torchmetrics ``Metric`` computed afresh for every coalition (on a private copy)."""

    def __init__(self, metric: Metric) -> None:
        self._metric = copy.deepcopy(metric)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._metric.to(logits.device)
        results = []
        for coalition_logits in logits:
            self._metric.reset()
            self._metric.update(coalition_logits, targets)
            results.append(torch.as_tensor(self._metric.compute(), dtype=torch.float64))
        self._metric.reset()
        return torch.stack(results)


class _CallableValue:
    """A user function ``fn(logits, targets) -> float`` applied to each coalition."""

    def __init__(self, fn: Callable[[Tensor, Tensor], float | Tensor]) -> None:
        self._fn = fn

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        results = [torch.as_tensor(self._fn(c, targets), dtype=torch.float64) for c in logits]
        for result in results:
            if result.numel() != 1:
                raise ValueError(
                    f"value function {self._fn!r} returned a tensor of shape "
                    f"{tuple(result.shape)}; it must return one number per call"
                )
        return torch.stack([r.reshape(()) for r in results]).cpu()


def resolve_value(value: ValueSetting) -> CoalitionValue:
    """The coalition value function for a setting.

    Args:
        value: ``"loss"`` (negative mean cross-entropy), ``"accuracy"``, a torchmetrics
            ``Metric`` (higher must be better), or a callable ``fn(logits, targets)``
            returning a float for one coalition's logits ``[N, ...]``.

    Example:
        >>> fn = resolve_value("accuracy")
        >>> fn(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([0, 0]))
        tensor([0.5000])
    """
    if isinstance(value, str):
        if value == "loss":
            return negative_loss
        if value == "accuracy":
            return accuracy
        raise ValueError(
            f"value={value!r} is not known; use one of {VALUES}, a torchmetrics Metric, "
            "or a callable(logits, targets) -> float"
        )
    if isinstance(value, Metric):
        return _MetricValue(value)
    if callable(value):
        return _CallableValue(value)
    raise ValueError(
        f"value={value!r} is not allowed; use one of {VALUES}, a torchmetrics Metric, "
        "or a callable(logits, targets) -> float"
    )
