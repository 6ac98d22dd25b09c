"""Measurements: what a model or an exported artifact costs and what it scores.

:func:`measure_latency` times forward calls, :func:`accuracy` counts top-1 hits on
labelled batches, :func:`file_size` weighs a file. The first two take an ``nn.Module``
(TorchScript modules included) or any callable taking tensors, such as an onnxruntime
session wrapped in a function, and run it in eval mode without gradients, restoring each
module's train/eval flag afterwards.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_shapley.checks import check_int
from lightning_shapley.model_io import output_tensors
from lightning_shapley.pruning.units import checked_example_inputs


def measure_latency(
    model: Callable[..., object],
    inputs: Tensor | Sequence[Tensor],
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Median seconds per forward call of ``model`` on ``inputs``, without gradients.

    ``warmup`` calls first (allocator, lazy initialization, TorchScript's profiling runs),
    then ``repeats`` timed calls. An ``nn.Module`` runs in eval mode; each of its modules
    gets its own train/eval flag back afterwards. On CUDA inputs the device is synchronized
    around each call. The median resists the odd slow call of a busy machine; to compare
    models, interleave their calls (``benchmarks/deploy.py`` does).

    Args:
        model: an ``nn.Module`` (TorchScript modules included) or any callable taking the
            inputs' tensors, e.g. an onnxruntime session wrapped in a function.
        inputs: a batch, or a tuple of the forward's tensors.
        repeats: timed calls, at least one.
        warmup: untimed calls before them.

    Returns:
        The median wall-clock time of one call, in seconds.

    Raises:
        ValueError: if ``repeats < 1`` or ``warmup < 0``, or ``inputs`` is not a tensor
            or a sequence of tensors.

    Example:
        >>> net = nn.Linear(4, 2).train()
        >>> measure_latency(net, torch.zeros(8, 4), repeats=3) > 0, net.training
        (True, True)
    """
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    args = checked_example_inputs(inputs)
    sync = torch.cuda.synchronize if any(arg.is_cuda for arg in args) else (lambda: None)
    times = []
    with _evaluating(model):
        for _ in range(warmup):
            model(*args)
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(*args)
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def accuracy(
    model: Callable[..., object], batches: Sequence[tuple[Tensor | Sequence[Tensor], Tensor]]
) -> float:
    """Top-1 accuracy of ``model`` over ``batches``, in eval mode, without gradients.

    Args:
        model: an ``nn.Module`` or a callable returning logits ``[N, classes]`` (the first
            tensor, when it returns several).
        batches: ``(inputs, targets)`` pairs: inputs as the forward takes them, targets
            integer class labels ``[N]``.

    Returns:
        The fraction of samples whose highest logit is their target.

    Raises:
        ValueError: if ``batches`` is empty or not such pairs.
    """
    pairs = _checked_batches(batches)
    correct = total = 0
    with _evaluating(model):
        for args, targets in pairs:
            out = model(*args)
            logits = output_tensors(out)[0]
            correct += int((logits.argmax(dim=1).cpu() == targets.cpu()).sum())
            total += len(targets)
    return correct / total


@contextmanager
def _evaluating(model: Callable[..., object]) -> Iterator[None]:
    """Eval mode and no gradients; each module's train/eval flag restored on exit."""
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in zip(modules, modes, strict=True):
            module.train(training)


def _checked_batches(
    batches: object,
) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    problem = (
        f"batches is a {type(batches).__name__}; give a non-empty list of (inputs, targets) "
        "pairs, targets a 1-D tensor of class labels"
    )
    if not isinstance(batches, list | tuple) or not batches:
        raise ValueError(problem)
    pairs = []
    for batch in batches:
        if not isinstance(batch, list | tuple) or len(batch) != 2:
            raise ValueError(problem)
        inputs, targets = batch
        if not isinstance(targets, Tensor) or targets.ndim != 1 or targets.is_floating_point():
            raise ValueError(problem)
        pairs.append((checked_example_inputs(inputs), targets))
    return pairs


def file_size(path: str | Path) -> int:
    """Size of the file at ``path`` in bytes."""
    return Path(path).stat().st_size
