"""The layer kinds a prunable unit is made of: one table that every stage reads.

A unit (see :mod:`~lightning_shapley.pruning.units`) is the set of layers one channel
cuts through. Each of its layers is of a kind listed in :data:`LAYER_KINDS`, and the row
of that kind says everything the pipeline needs to know about it:

* which parameters hold the channel, and along which dimension (masking, the L1 and
  BatchNorm gamma criteria, rolling a step back);
* which axis of its output activation the channels are on (the channel game);
* the attributes that count its output and input channels (finding units; a consumer
  reads the channels through its input);
* the running statistics re-estimated after a removal (recalibration);
* the constructor arguments that fix its shapes (compact checkpoints);
* why a module of the kind cannot take part, when it cannot (a grouped convolution);
* how torch-pruning removes its channels physically (``compact``): ``None`` where
  torch-pruning has a pruner of its own for the type.

Adding a layer kind is adding a row, plus whatever is truly new about it (a custom
torch-pruning pruner, say).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch_pruning as tp
from torch import Tensor, nn

#: The roles a layer plays in a unit.
PRODUCER, NORM = "producer", "norm"


class Unit(Protocol):
    """What the stages read of a prunable unit (``pruning.units.PrunableUnit`` has it)."""

    name: str
    producers: tuple[str, ...]
    batchnorms: tuple[str, ...]
    consumers: tuple[str, ...]
    n_channels: int


def copies_of(unit: Unit) -> int:
    """How many copies of the unit's channels its producers hold (see :func:`spread`).

    1 unless the unit says otherwise: a packed query/key/value projection holds 3.
    """
    return getattr(unit, "copies", 1)


def spread(channels: Tensor, size: int, copies: int = 1) -> Tensor:
    """Per-channel values (last axis) spread over the ``size`` entries that hold the channels.

    The entries are ``copies`` consecutive copies of the channels (a packed query/key/value
    projection holds 3), and in each a channel is a block of consecutive entries (a
    GroupNorm's group, an attention head; one entry for a plain channel).

    Example:
        >>> import torch
        >>> spread(torch.tensor([1, 0]), 8, copies=2)
        tensor([1, 1, 0, 0, 1, 1, 0, 0])
    """
    width = size // (copies * channels.shape[-1])
    return channels.repeat_interleave(width, -1).repeat(*(1,) * (channels.ndim - 1), copies)


def by_channel(entries: Tensor, n_channels: int, copies: int = 1) -> Tensor:
    """``entries`` as ``[n_channels, -1]``: every value of one channel in its row.

    The channels' entries are on dim 0, laid out as :func:`spread` says.

    Example:
        >>> import torch
        >>> by_channel(torch.arange(8), 2, copies=2)
        tensor([[0, 1, 4, 5],
                [2, 3, 6, 7]])
    """
    return entries.reshape(copies, n_channels, -1).transpose(0, 1).reshape(n_channels, -1)


@dataclass(frozen=True)
class LayerKind:
    """How one kind of layer takes part in a unit.

    Attributes:
        name: a short name for messages.
        types: the module classes of this kind (exact classes or their subclasses).
        role: :data:`PRODUCER` (makes the channels; a dense one may also consume them)
            or :data:`NORM` (normalizes them, channel by channel).
        parameters: ``(parameter name, channel dimension)`` of every parameter that holds
            the channels; a parameter the module lacks (``bias=None``) is skipped.
        output_axis: the axis of the layer's output that holds the channels, counted
            from the front (``1`` for ``[B, C, ...]``) or from the back (``-1``: a
            Linear's features are last, whatever the leading shape).
        out_attribute: the attribute that counts the channels the layer makes.
        in_attribute: the attribute that counts the channels it reads, for a layer that
            can consume a unit's channels; ``None`` for one that cannot.
        statistics: running buffers that describe the channels and are re-estimated
            after a removal.
        shape_attributes: the constructor arguments that fix the layer's shapes: what a
            compact checkpoint records, so that it reloads into the model's own class.
        problem: why a module of these types cannot take part in a unit, or ``None``.
        tp_pruner: torch-pruning's pruner for the type, when torch-pruning has none built
            in (given to its ``DependencyGraph`` as a customized pruner).
    """

    name: str
    types: tuple[type[nn.Module], ...]
    role: str
    parameters: tuple[tuple[str, int], ...]
    output_axis: int
    out_attribute: str
    in_attribute: str | None = None
    statistics: tuple[str, ...] = ()
    shape_attributes: tuple[str, ...] = ()
    problem: Callable[[nn.Module], str | None] = lambda _module: None
    tp_pruner: Any = None

    def channel_parameters(self, module: nn.Module) -> list[tuple[str, int]]:
        """The ``(name, dim)`` of the parameters of ``module`` that hold its channels."""
        return [
            (name, dim) for name, dim in self.parameters if getattr(module, name, None) is not None
        ]


def _is_depthwise(module: nn.Module) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _grouped(module: nn.Module) -> str | None:
    if module.groups == 1 or _is_depthwise(module):
        return None
    return (
        f"a grouped {type(module).__name__} (groups={module.groups}): removing one of its "
        "channels would leave unequal groups"
    )


def _without_affine(module: nn.Module) -> str | None:
    if module.affine:
        return None
    return (
        f"a {type(module).__name__} with affine=False: with no weight and bias to mask, its "
        "shift would leak through a pruned channel"
    )


CONVOLUTION = LayerKind(
    name="convolution",
    types=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    role=PRODUCER,
    parameters=(("weight", 0), ("bias", 0)),
    output_axis=1,
    out_attribute="out_channels",
    in_attribute="in_channels",
    shape_attributes=("in_channels", "out_channels", "groups"),
    problem=_grouped,
)
LINEAR = LayerKind(
    name="linear",
    types=(nn.Linear,),
    role=PRODUCER,
    parameters=(("weight", 0), ("bias", 0)),
    output_axis=-1,
    out_attribute="out_features",
    in_attribute="in_features",
    shape_attributes=("in_features", "out_features"),
)


class _WholeGroupsPruner(tp.pruner.function.GroupNormPruner):
    """torch-pruning's GroupNorm pruner, which also lowers ``num_groups`` by the groups removed.

    Units prune a GroupNorm's channels a whole group at a time; torch-pruning's own
    pruner keeps ``num_groups``, which would merge the surviving channels into other
    groups and change their statistics.
    """

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: list[int]) -> nn.Module:
        group_size = layer.num_channels // layer.num_groups
        removed = sorted(set(idxs))
        whole = [
            range(g * group_size, (g + 1) * group_size) for g in {i // group_size for i in removed}
        ]
        if sorted(i for group in whole for i in group) != removed:
            raise ValueError(
                f"a GroupNorm of {layer.num_groups} groups loses channels {removed}, which "
                "are not whole groups"
            )
        layer.num_groups -= len(whole)
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


BATCHNORM = LayerKind(
    name="batchnorm",
    types=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    role=NORM,
    parameters=(("weight", 0), ("bias", 0)),
    output_axis=1,
    out_attribute="num_features",
    statistics=("running_mean", "running_var"),
    shape_attributes=("num_features",),
    problem=_without_affine,
)

GROUPNORM = LayerKind(
    name="groupnorm",
    types=(nn.GroupNorm,),
    role=NORM,
    parameters=(("weight", 0), ("bias", 0)),
    output_axis=1,
    out_attribute="num_channels",
    shape_attributes=("num_groups", "num_channels"),
    tp_pruner=_WholeGroupsPruner(),
)


class _TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's surgery for Hugging Face's ``Conv1D``.

    A linear layer whose weight is stored ``[in, out]`` (``nx`` inputs, ``nf`` outputs).
    """

    def prune_out_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.nf)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list[int]) -> nn.Module:
        keep = sorted(set(range(layer.nx)) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.nf

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.nx


def _transposed_linear_types() -> tuple[type[nn.Module], ...]:
    try:  # transformers is optional: its layer kind exists where it is installed
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return (Conv1D,)


#: Hugging Face's ``Conv1D`` (GPT-2's projections), a linear layer with its weight stored
#: transposed.
TRANSPOSED_LINEAR = LayerKind(
    name="transposed linear",
    types=_transposed_linear_types(),
    role=PRODUCER,
    parameters=(("weight", 1), ("bias", 0)),
    output_axis=-1,
    out_attribute="nf",
    in_attribute="nx",
    shape_attributes=("nx", "nf"),
    tp_pruner=_TransposedLinearPruner(),
)

#: Every layer kind a unit can hold, in the order they are matched.
LAYER_KINDS: tuple[LayerKind, ...] = tuple(
    kind for kind in (CONVOLUTION, LINEAR, TRANSPOSED_LINEAR, BATCHNORM, GROUPNORM) if kind.types
)
#: The module classes of the normalization kinds.
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for kind in LAYER_KINDS if kind.role == NORM for t in kind.types
)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The row of ``module``'s kind, or ``None`` when no row lists its class.

    Example:
        >>> kind_of(nn.Conv2d(3, 8, 3)).name, kind_of(nn.LayerNorm(4))
        ('convolution', None)
    """
    return next((kind for kind in LAYER_KINDS if isinstance(module, kind.types)), None)


def is_depthwise(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise convolution: one filter per channel, in and out."""
    return kind_of(module) is CONVOLUTION and _is_depthwise(module)


def supported_types() -> str:
    """The module classes of every kind, for messages: ``"Conv1d, Conv2d, ..."``."""
    return ", ".join(t.__name__ for kind in LAYER_KINDS for t in kind.types)


def customized_pruners() -> dict[type[nn.Module], Any]:
    """The torch-pruning pruners of the kinds torch-pruning does not know by itself."""
    return {t: kind.tp_pruner for kind in LAYER_KINDS if kind.tp_pruner for t in kind.types}
