"""Compacting: a physically smaller model, with the pruned channels removed.

A masked model (see :mod:`~lightning_shapley.pruning.masking`) still computes every
channel; its pruned channels are merely exactly zero after their last coupled layer.
:func:`compact` removes them: the producers lose those output channels, the BatchNorms
those features, and the consumers the matching input channels (or input features, behind
a ``Flatten``).

torch-pruning does that surgery, not only the search for units: on a copy of the model,
:func:`compact` builds a torch-pruning ``DependencyGraph`` and, for each unit, lets the
pruning group of its first producer slice the pruned channels out of every coupled layer
(weights, biases, BatchNorm statistics, the consumers' input channels, residual partners)
and set the layers' size attributes (``out_channels``, ``num_features``, ``in_features``...)
to match. What this package adds around it: which channels go (read from the masks), the
masks baked in first, and a check that the outputs did not change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from lightning_shapley.export._outputs import mismatch
from lightning_shapley.layers import spread
from lightning_shapley.model_io import Inputs, call_model, kept_outputs
from lightning_shapley.pruning import masking, units
from lightning_shapley.pruning.units import example_call, traceable_copy


def compact(model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | Inputs) -> nn.Module:
    """A new model without the pruned channels, computing the same outputs as ``model``.

    The model is deep-copied first and left exactly as it was. On the copy, each prunable
    unit (``units.find_units``) reads its pruned channels from the masks
    (``masking.pruned_channels``), or, when the model holds no mask at all (it was loaded
    from a pruned checkpoint's plain weights), takes the channels that are zero in every
    coupled parameter (``masking.zero_channels``; a warning says when there are none).
    Every mask is baked in (``masking.make_permanent``), and
    torch-pruning removes the pruned channels from every coupled layer: producers,
    BatchNorms, consumers and residual partners. The copy keeps the model's train/eval
    flags and ``requires_grad`` flags; it holds no pruning masks.

    The outputs are checked on ``example_inputs`` in eval mode: a pruned channel is
    removable only when it feeds zeros to its consumers, which holds after a masked
    BatchNorm followed by ReLU-like activations, but not after, say, a sigmoid
    (``sigmoid(0) = 0.5``).

    Args:
        model: a model masked by :mod:`~lightning_shapley.pruning.masking` (a model with
            nothing pruned comes back as an equal copy).
        example_inputs: a batch the model's forward takes, a tuple of its positional
            arguments, a mapping of its keyword arguments or
            :class:`~lightning_shapley.model_io.ModelInputs`. Real data makes the output
            check meaningful; zeros work too.

    Returns:
        The compacted copy.

    Raises:
        ValueError: if torch-pruning cannot trace the model, the model cannot be copied,
            or the compacted copy's outputs on ``example_inputs`` differ from the masked
            model's.

    Example:
        >>> from lightning_shapley.app.models import DigitsCNN
        >>> net, x = DigitsCNN(channels=(4, 4, 8)).eval(), torch.randn(2, 1, 8, 8)
        >>> unit = units.find_units(net, x)[0]
        >>> masking.prune_channels(net, unit, torch.tensor([True, False, True, False]))
        >>> small = compact(net, x)
        >>> small.features[0].weight.shape, small.features[3].weight.shape
        (torch.Size([2, 1, 3, 3]), torch.Size([4, 2, 3, 3]))
        >>> torch.allclose(small(x), net(x), atol=1e-6)
        True
    """
    args = example_call(example_inputs)
    replica = traceable_copy(model)
    # traceable_copy turns requires_grad on for tracing; remember the model's flags by name.
    requires_grad = {
        id(copied): original.requires_grad
        for original, copied in zip(model.parameters(), replica.parameters(), strict=True)
    }
    training = {name: module.training for name, module in replica.named_modules()}

    found = units.find_units(replica, args)
    pruned = _pruned(replica, found, type(model).__name__)
    masking.make_permanent(replica)
    flags = {name: requires_grad[id(p)] for name, p in replica.named_parameters()}

    replica.eval()
    with torch.no_grad():
        expected = kept_outputs(call_model(replica, args))
    with units.torch_pruning_fixes(replica):
        _remove_pruned(replica, found, pruned, args, type(model).__name__)
    _check_outputs(expected, replica, args, type(model).__name__)

    for name, parameter in replica.named_parameters():
        parameter.requires_grad_(flags[name])
    for name, module in replica.named_modules():
        module.train(training[name])
    return replica


def _remove_pruned(
    model: nn.Module,
    found: list[units.PrunableUnit],
    pruned: dict[str, Tensor],
    args: Inputs,
    model_name: str,
) -> None:
    """torch-pruning slices each unit's pruned channels out of every layer coupled to them."""
    graph = _dependency_graph(model, args, model_name)
    for unit in found:
        channels = pruned[unit.name]
        if not channels.any():
            continue
        if unit.copies > 1:
            _remove_packed(model, graph, unit, channels)
        else:
            producer = model.get_submodule(unit.producers[0])
            pruner = graph.get_pruner_of_module(producer)
            idxs = _indices(channels, pruner.get_out_channels(producer))
            graph.get_pruning_group(producer, pruner.prune_out_channels, idxs=idxs).prune()
        _count_heads(model, unit, int(channels.sum()))


def _remove_packed(
    model: nn.Module, graph: tp.DependencyGraph, unit: units.PrunableUnit, channels: Tensor
) -> None:
    """Removes the heads of a packed query/key/value unit from its producer and its reader.

    torch-pruning's group maps the values alone to the reader (see ``find_units``), so
    each layer is cut by its own pruner instead.
    """
    for name in unit.producers:
        producer = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(producer)
        size = pruner.get_out_channels(producer)
        pruner.prune_out_channels(producer, _indices(channels, size, unit.copies))
    for name in unit.consumers:
        consumer = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(consumer)
        pruner.prune_in_channels(consumer, _indices(channels, pruner.get_in_channels(consumer)))


def _indices(channels: Tensor, size: int, copies: int = 1) -> list[int]:
    """The entries of the pruned ``channels`` among ``size`` (see ``layers.spread``)."""
    return spread(channels, size, copies).nonzero().flatten().tolist()


def _pruned(
    model: nn.Module, found: list[units.PrunableUnit], model_name: str
) -> dict[str, Tensor]:
    """Each unit's pruned channels: its masks', or, with no mask anywhere, its zero channels.

    A model reloaded from a pruned checkpoint holds plain weights with the pruned channels
    at zero; those are what compacting it removes.
    """
    if masking.has_masks(model):
        return {unit.name: masking.pruned_channels(model, unit) for unit in found}
    zero = {unit.name: masking.zero_channels(model, unit) for unit in found}
    if not any(channels.any() for channels in zero.values()):
        warnings.warn(
            f"{model_name} holds no pruning masks and no channel that is zero throughout, "
            "so compact has nothing to remove: was the model pruned (masked, or loaded "
            "from a pruned checkpoint)?",
            stacklevel=3,
        )
    return zero


def _dependency_graph(model: nn.Module, args: Inputs, model_name: str) -> tp.DependencyGraph:
    def forward(module: nn.Module, inputs: Inputs) -> object:
        # As given, not split into samples; the tensors alone, which torch-pruning can walk.
        return kept_outputs(call_model(module, inputs))

    try:
        return units.dependency_graph(model, args, forward)
    except Exception as error:
        raise ValueError(
            f"torch-pruning could not trace {model_name} on example_inputs, so its pruned "
            f"channels cannot be removed ({type(error).__name__}: {error})"
        ) from error


def _count_heads(model: nn.Module, unit: units.PrunableUnit, removed: int) -> None:
    """Lowers the head count of an attention unit's module by the heads removed.

    The forward of most attention modules reads the count (to split the projections into
    heads), and a checkpoint's config should say how many heads are left.
    """
    if units.attention_heads(model, unit.name) is None:
        return
    attention = model.get_submodule(unit.name.rpartition(".")[0])
    for attribute in units.HEAD_COUNT_ATTRIBUTES:
        heads = getattr(attention, attribute, None)
        if isinstance(heads, int):
            setattr(attention, attribute, heads - removed)
    for attribute in _ALL_HEADS_WIDTH_ATTRIBUTES:
        size = getattr(attention, attribute, None)
        if isinstance(size, int):
            setattr(attention, attribute, size // unit.n_channels * (unit.n_channels - removed))


#: Attributes in which Hugging Face attention modules keep the width of all heads together
#: (BERT and ViT, GPT-2).
_ALL_HEADS_WIDTH_ATTRIBUTES = ("all_head_size", "split_size")


def _check_outputs(expected: list[Tensor], model: nn.Module, args: Inputs, model_name: str) -> None:
    try:
        with torch.no_grad():
            actual = kept_outputs(call_model(model, args))
    except Exception as error:
        # The model's forward may hard-code a width (a reshape to the input's width).
        raise ValueError(
            f"{model_name} fails to run once its pruned channels are removed "
            f"({type(error).__name__}: {error}); its forward may fix a width that pruning "
            "changes (a reshape to the input's width, say)"
        ) from error
    problem = mismatch(expected, actual)
    if problem:
        raise ValueError(
            f"removing the pruned channels of {model_name} changed its outputs on "
            f"example_inputs (the compacted copy {problem}): a pruned channel feeds a "
            "non-zero value to its consumers (an activation with f(0) != 0 between the "
            "masked layer and its consumer, or a coupling torch-pruning and find_units see "
            "differently)"
        )
