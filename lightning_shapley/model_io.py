"""How the pipeline calls a user's model and reads what it returns.

Scoring, tracing and recalibration run the user's model on batches the user's loaders
give. Its forward may take one tensor, several positional tensors or keyword tensors
(Hugging Face's ``input_ids`` and ``attention_mask``), and it may return a tensor, a
tuple or an object with ``.logits``. This module is the one place that knows these
shapes:

* :class:`ModelInputs` holds the arguments of one forward call, batch-first tensors
  among them, and moves and repeats them as one batch; a plain tensor is used as it is.
* :func:`as_model_inputs` reads what a ``batch_transform`` returned as inputs;
  :func:`call_model` calls the model with them.
* :func:`logits_of` finds the logits in an output; :func:`align_targets` lines logits
  up with their targets (classes on dim 1 or last, per-token outputs flattened or not).
* :func:`eager` shows a model with its ``torch.compile``d submodules as their originals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import OptimizedModule

#: Targets equal to this are padding (Hugging Face's and PyTorch's convention): not scored.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelInputs:
    """The positional and keyword arguments of one forward call on a batch.

    Tensors whose first dimension is the batch are moved, repeated and counted together;
    other values (flags, masks without a batch dimension) are passed as they are.

    Example:
        >>> inputs = ModelInputs(kwargs={"input_ids": torch.zeros(4, 6, dtype=torch.long)})
        >>> len(inputs), len(inputs.repeat_interleave(3))
        (4, 12)
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not any(isinstance(value, Tensor) and value.ndim > 0 for value in self._values()):
            raise ValueError(
                "the model's inputs hold no tensor with a batch dimension; a forward call "
                "needs at least one"
            )

    def _values(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]

    def __len__(self) -> int:
        """The batch size: the first dimension of the first batch tensor."""
        return next(v.shape[0] for v in self._values() if isinstance(v, Tensor) and v.ndim > 0)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        size = len(self)

        def apply(value: Any) -> Any:
            batched = isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == size
            return fn(value) if batched else value

        return ModelInputs(
            tuple(apply(v) for v in self.args), {k: apply(v) for k, v in self.kwargs.items()}
        )

    def to(self, device: torch.device | str) -> ModelInputs:
        """The same arguments with every tensor on ``device``."""
        return ModelInputs(
            tuple(_to(v, device) for v in self.args),
            {k: _to(v, device) for k, v in self.kwargs.items()},
        )

    def repeat_interleave(self, repeats: int, dim: int = 0) -> ModelInputs:
        """Each sample repeated ``repeats`` times in a row, in every batch tensor."""
        if dim != 0:
            raise ValueError(f"dim={dim}: model inputs repeat along the batch dimension only")
        return self._map(lambda t: t.repeat_interleave(repeats, 0))


Inputs = Tensor | ModelInputs


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


def as_model_inputs(inputs: object) -> Inputs:
    """What a ``batch_transform`` returned as inputs, as the arguments of a forward call.

    Accepted: a tensor (the one positional argument); a mapping (keyword arguments, as
    Hugging Face models take them); a sequence of tensors (positional arguments); an
    ``(args, kwargs)`` pair of a sequence and a mapping.

    Raises:
        ValueError: ``inputs`` is none of these.
    """
    if isinstance(inputs, Tensor | ModelInputs):
        return inputs
    if isinstance(inputs, Mapping):
        return ModelInputs(kwargs=dict(inputs))
    if (
        isinstance(inputs, list | tuple)
        and len(inputs) == 2
        and isinstance(inputs[0], list | tuple)
        and isinstance(inputs[1], Mapping)
    ):
        return ModelInputs(tuple(inputs[0]), dict(inputs[1]))
    if isinstance(inputs, list | tuple) and inputs and all(isinstance(v, Tensor) for v in inputs):
        return ModelInputs(tuple(inputs))
    raise ValueError(
        f"the inputs are a {type(inputs).__name__}; give a Tensor, a mapping of keyword "
        "arguments, a sequence of Tensors (positional arguments) or an (args, kwargs) pair"
    )


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` called on ``inputs``: ``model(x)`` for a tensor, else with its arguments."""
    if isinstance(inputs, ModelInputs):
        return model(*inputs.args, **inputs.kwargs)
    return model(inputs)


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``torch.compile``d submodule of ``model`` is its original module.

    A compiled submodule (``self.net = torch.compile(self.net)``, as
    lightning-hydra-template does in ``setup``) hides its layers under ``_orig_mod.``.
    Inside the block the layers have the names they had before compiling, masks go on the
    original parameters (which the compiled module shares), and scoring runs eagerly
    rather than recompiling for every coalition. The compiled modules are put back
    afterwards, also on an error; recompiling after a step is theirs to do.

    Example:
        >>> net = nn.Sequential(torch.compile(nn.Linear(2, 2)))
        >>> with eager(net):
        ...     type(net[0]).__name__
        'Linear'
        >>> type(net[0]).__name__
        'OptimizedModule'
    """
    with children_replaced(model, OptimizedModule, lambda compiled: compiled._orig_mod):
        yield


@contextlib.contextmanager
def children_replaced(
    model: nn.Module, kind: type[nn.Module], replacement: Callable[[nn.Module], nn.Module]
) -> Iterator[None]:
    """Within the block, every submodule of ``kind`` is ``replacement(submodule)``.

    Replacements that hold modules of ``kind`` themselves (a compiled module inside a
    compiled one) are replaced in turn. The originals are put back afterwards, also on an
    error.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    while found := [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, kind)
    ]:
        for parent, name, child in found:
            setattr(parent, name, replacement(child))
        swapped += found
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def logits_of(output: object) -> Tensor:
    """The logits in a model's output.

    The output itself when it is a tensor, else an object's or a mapping's ``logits``,
    else the first item of a tuple.

    Raises:
        ValueError: none of these holds a tensor; the message says to pass
            ``output_transform``.
    """
    if isinstance(output, Tensor):
        return output
    logits = _named_logits(output)
    if logits is None and isinstance(output, list | tuple) and output:
        logits = output[0]
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"the model returned a {type(output).__name__}, and no logits tensor was found in it "
        "(a Tensor, .logits, ['logits'] or the first item of a tuple); pass "
        "output_transform= to say how to read the logits"
    )


def output_tensors(output: object) -> list[Tensor]:
    """The tensors in a forward's result, in order, however it nests them.

    Tuples, lists and mappings are walked in order, and so are the attributes of other
    objects (a model-output dataclass); values that are not tensors are left out.

    Example:
        >>> out = {"logits": torch.zeros(2), "extra": (torch.zeros(3), "not a tensor")}
        >>> [tuple(t.shape) for t in output_tensors(out)]
        [(2,), (3,)]
    """
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, list | tuple):
        items = list(output)
    elif hasattr(output, "__dict__") and not isinstance(output, type):
        items = list(vars(output).values())
    else:
        return []
    return [tensor for item in items for tensor in output_tensors(item)]


def kept_outputs(output: object) -> list[Tensor]:
    """The tensors of a forward's result that pruning must leave as they are.

    An output with ``logits`` (a Hugging Face ``ModelOutput``, a mapping) keeps its logits
    alone: its caches of keys and values, hidden states and attention maps are by-products
    whose shapes follow the widths being pruned. Any other output keeps all its tensors.

    Example:
        >>> out = {"logits": torch.zeros(2), "past_key_values": (torch.zeros(3),)}
        >>> [tuple(t.shape) for t in kept_outputs(out)]
        [(2,)]
    """
    logits = _named_logits(output)
    return [logits] if isinstance(logits, Tensor) else output_tensors(output)


def _named_logits(output: object) -> object:
    """An output's ``.logits``, or a mapping's ``["logits"]``; ``None`` if it has neither."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return logits


def per_sample(logits: Tensor, batch_size: int) -> Tensor:
    """``[B * T, ...]`` per-token logits of ``B`` samples as ``[B, T, ...]``; others unchanged."""
    if logits.shape[0] == batch_size or logits.shape[0] % batch_size:
        return logits
    return logits.reshape(batch_size, -1, *logits.shape[1:])


def align_targets(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Logits ``[k, N, C, ...]`` and targets ``[N, ...]``, classes on dim 2 of the logits.

    ``logits`` is ``[k, N, ...]`` (``k`` coalitions of ``N`` samples); its classes may be
    on the sample's dim 1 (``[N, C, H, W]`` with targets ``[N, H, W]``) or last (per-token
    ``[N, T, V]`` with targets ``[N, T]``); per-token logits flattened to ``[N * T, V]``
    are matched with targets ``[N, T]`` flattened alike.

    Raises:
        ValueError: the shapes match none of these.
    """
    sample, expected = logits.shape[2:], targets.shape[1:]
    if targets.is_floating_point() and logits.shape[1:] == targets.shape:
        return logits, targets  # class probabilities
    if logits.shape[1] == targets.shape[0] and logits.ndim == targets.ndim + 2:
        if sample[1:] == expected:
            return logits, targets
        if sample[:-1] == expected:
            return logits.movedim(-1, 2), targets
    if logits.ndim == 3 and logits.shape[1] == targets.numel() and targets.ndim > 1:
        return logits, targets.reshape(-1)
    raise ValueError(
        f"the model's logits of shape {tuple(logits.shape[1:])} do not line up with targets "
        f"of shape {tuple(targets.shape)}: give classes on dim 1 ([N, C, ...] with targets "
        "[N, ...]) or last ([N, T, C] with targets [N, T]), or per-token logits [N * T, C]; "
        "or pass output_transform="
    )
