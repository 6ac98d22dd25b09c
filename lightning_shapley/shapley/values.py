"""Characteristic functions: how good the model is on the scoring data, one number per coalition.

A coalition value function takes the logits of ``k`` coalitions over all scoring samples,
shape ``[k, N, ...]``, and the targets, shape ``[N, ...]``, and returns ``[k]`` values,
higher is better. :func:`resolve_value` turns the user's setting into a
:class:`ValueFunction` once, where the setting enters; everything below it takes the
resolved object. :func:`evaluate` measures a model on the scoring batches with one, and
:func:`scoring_mode` is the state every such measurement runs in.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torchmetrics import Metric

Batch = tuple[Tensor, Tensor]
ValueSetting = str | Metric | Callable[[Tensor, Tensor], float | Tensor]


def negative_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative mean cross-entropy of each coalition's logits (class dimension 1 of a sample)."""
    k = logits.shape[0]
    flat_targets = targets.expand(k, *targets.shape).flatten(0, 1)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), flat_targets, reduction="none")
    return -losses.reshape(k, -1).mean(1)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of samples whose highest logit is the target class (dimension 1 of a sample)."""
    return (logits.argmax(2) == targets).flatten(1).float().mean(1)


@dataclass(frozen=True)
class ValueFunction:
    """A resolved coalition value: ``fn(logits [k, N, ...], targets [N, ...]) -> [k]``.

    Attributes:
        name: ``"loss"``, ``"accuracy"``, ``"metric"`` or ``"callable"``.
        fn: the function of a batch of coalitions.
        label: what the value is, for axis labels.
    """

    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    label: str

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The ``[k]`` values of ``k`` coalitions' logits."""
        return self.fn(logits, targets)


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


LOSS = ValueFunction("loss", negative_loss, "\N{MINUS SIGN}cross-entropy (nats)")
ACCURACY = ValueFunction("accuracy", accuracy, "accuracy (fraction)")
#: The named values.
VALUES = {value.name: value for value in (LOSS, ACCURACY)}


def resolve_value(value: ValueSetting | ValueFunction) -> ValueFunction:
    """The coalition value function for a setting; a resolved one is returned as it is.

    Args:
        value: ``"loss"`` (negative mean cross-entropy), ``"accuracy"``, a torchmetrics
            ``Metric`` (higher must be better), a callable ``fn(logits, targets)``
            returning a float for one coalition's logits ``[N, ...]``, or a
            :class:`ValueFunction` resolved before.

    Example:
        >>> fn = resolve_value("accuracy")
        >>> fn(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([0, 0]))
        tensor([0.5000])
    """
    if isinstance(value, ValueFunction):
        return value
    allowed = f"use one of {tuple(VALUES)}, a torchmetrics Metric, or a callable(logits, targets)"
    if isinstance(value, str):
        if value not in VALUES:
            raise ValueError(f"value={value!r} is not known; {allowed} -> float")
        return VALUES[value]
    if isinstance(value, Metric):
        return ValueFunction("metric", _MetricValue(value), type(value).__name__)
    if callable(value):
        label = getattr(value, "__name__", type(value).__name__)
        return ValueFunction("callable", _CallableValue(value), label)
    raise ValueError(f"value={value!r} is not allowed; {allowed} -> float")


@contextlib.contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients; restores every module's train/eval flag afterwards.

    The flags come back also when an exception or Ctrl-C interrupts the block.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass(frozen=True)
class Evaluation:
    """How a model does on the scoring batches: its value, accuracy and cross-entropy."""

    value: float
    accuracy: float
    loss: float


def evaluate(model: nn.Module, batches: Sequence[Batch], value: ValueFunction) -> Evaluation:
    """The model, as it is, on the scoring batches (in :func:`scoring_mode`).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> result = evaluate(net, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], LOSS)
        >>> result.value == -result.loss
        True
    """
    with scoring_mode(model):
        logits = torch.cat([model(x) for x, _ in batches]).unsqueeze(0)
    targets = torch.cat([y for _, y in batches])
    loss = -float(negative_loss(logits, targets)[0])
    measured = -loss if value is LOSS else float(value(logits, targets)[0])
    return Evaluation(measured, float(accuracy(logits, targets)[0]), loss)
