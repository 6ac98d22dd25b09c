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
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_shapley.model_io import IGNORE_INDEX, Inputs, align_targets, call_model, logits_of

#: A scoring batch: the model's inputs (a tensor, or the arguments of a forward call) and
#: the targets.
Batch = tuple[Inputs, Tensor]
OutputTransform = Callable[[Any], Tensor]
ValueSetting = str | Metric | Callable[[Tensor, Tensor], float | Tensor]


def negative_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Negative mean cross-entropy of each coalition's logits over the scored positions.

    Classes may be on a sample's dim 1 or last (see ``model_io.align_targets``); targets
    equal to ``-100`` are padding and not scored.
    """
    logits, targets = align_targets(logits, targets)
    k = logits.shape[0]
    flat_targets = targets.expand(k, *targets.shape).flatten(0, 1)
    losses = F.cross_entropy(logits.flatten(0, 1).float(), flat_targets, reduction="none")
    scored = _scored(targets)
    return -(losses.reshape(k, -1) * scored).sum(1) / scored.sum().clamp_min(1)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of scored positions whose highest logit is the target class."""
    logits, targets = align_targets(logits, targets)
    scored = _scored(targets)
    hits = (logits.argmax(2) == targets).flatten(1).float() * scored
    return hits.sum(1) / scored.sum().clamp_min(1)


def _scored(targets: Tensor) -> Tensor:
    """``1.0`` for every target position that is scored, ``0.0`` for padding, flattened."""
    if targets.is_floating_point():
        return torch.ones(targets.numel() // targets.shape[-1], device=targets.device)
    return (targets != IGNORE_INDEX).flatten().float()


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
    output_transform: Callable[[Any], Tensor] | None = None

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The ``[k]`` values of ``k`` coalitions' logits."""
        return self.fn(logits, targets)

    def logits(self, output: object) -> Tensor:
        """The logits in one model output (``output_transform``, then ``logits_of``)."""
        transform = self.output_transform
        return logits_of(output if transform is None else transform(output))


class _MetricValue:
    """A torchmetrics ``Metric`` computed afresh for every coalition (on a private copy)."""

    def __init__(self, metric: Metric) -> None:
        self._metric = copy.deepcopy(metric)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        self._metric.to(logits.device)
        logits, targets = align_targets(logits, targets)
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


def resolve_value(
    value: ValueSetting | ValueFunction, output_transform: OutputTransform | None = None
) -> ValueFunction:
    """The coalition value function for a setting; a resolved one is returned as it is.

    Args:
        value: ``"loss"`` (negative mean cross-entropy), ``"accuracy"``, a torchmetrics
            ``Metric`` (higher must be better), a callable ``fn(logits, targets)``
            returning a float for one coalition's logits ``[N, ...]``, or a
            :class:`ValueFunction` resolved before.
        output_transform: reads the logits out of the model's output, when
            :func:`~lightning_shapley.model_io.logits_of` cannot find them.

    Example:
        >>> fn = resolve_value("accuracy")
        >>> fn(torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]), torch.tensor([0, 0]))
        tensor([0.5000])
    """
    resolved = _resolve(value)
    if output_transform is None:
        return resolved
    if not callable(output_transform):
        raise ValueError(
            f"output_transform={output_transform!r} is not allowed; give a callable that "
            "returns the logits tensor of a model output"
        )
    return replace(resolved, output_transform=output_transform)


def _resolve(value: ValueSetting | ValueFunction) -> ValueFunction:
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
        outputs = [value.logits(call_model(model, x)) for x, _ in batches]
    targets = torch.cat([y for _, y in batches])
    logits = torch.cat(outputs).unsqueeze(0)
    loss = -float(negative_loss(logits, targets)[0])
    measured = -loss if value.name == "loss" else float(value(logits, targets)[0])
    return Evaluation(measured, float(accuracy(logits, targets)[0]), loss)
