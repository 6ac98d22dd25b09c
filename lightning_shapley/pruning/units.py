"""Prunable units: output channels that must be pruned together, in any graph.

A unit is the set of layers a channel cuts through: the convolutions or linear layers that
produce it (several when a residual add joins their outputs), the BatchNorms that normalize
it, and the layers that read it as an input channel. torch-pruning's ``DependencyGraph``
finds this coupling by tracing the model through autograd, so it follows residual adds,
flattens and functional code alike.

Rules, in the order they apply to each coupled group:

* **The output layer is never a unit.** A group is left out when one of its layers (or a
  channel-wise operation such as an add or a final BatchNorm) *produces* a tensor the model
  returns: then its channels are the model's output, and pruning one would change the
  output's shape. Reading a group's channels is fine: the output layer is a *consumer* of
  the last hidden unit, and a residual stream that only feeds the head is a unit. A
  residual stream that is itself returned is not.
* **Only layers a unit has a role for**, as the layer-kind table
  (:mod:`~lightning_shapley.layers`) lists them. Producers are its producer
  kinds (convolutions with ``groups=1`` and linear layers); a depthwise convolution
  (``groups == in_channels == out_channels``) counts as a producer too, since each of its
  output channels is one of the unit's channels. Normalizations are its norm kinds
  (BatchNorm, GroupNorm by whole groups); consumers are producer kinds that read the
  channels as inputs. A group coupled to anything else is skipped with a warning that
  says why: grouped convolutions (removing one channel leaves unequal groups), transposed
  convolutions, LayerNorm (it normalizes across channels, so zeroing a channel is not
  removing it), PReLU, InstanceNorm, embeddings, recurrent layers,
  ``nn.MultiheadAttention``, and bare ``nn.Parameter`` tensors used outside a module.
* **Only index maps a unit can state.** Producers and BatchNorms hold exactly the unit's
  channels, index for index. A consumer reads them either one to one or flattened
  channel-major: ``in_features = n_channels * k`` and channel ``c`` is inputs
  ``c*k .. c*k + k - 1`` (a ``Flatten`` before a linear head). A group that reaches a
  consumer through a concatenation, split or channels-last reshape is skipped: the unit
  has no field for such a map.
* **Attention heads are channels.** Query, key and value projections coupled in a module
  that counts its heads make one unit whose channels are the heads. A packed projection
  (timm's ``qkv``, GPT-2's ``c_attn``) makes one too, though its group maps only the
  values to the reader: each head is then a block in each of the three copies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch_pruning.dependency import index_mapping
from torchmetrics import Metric

from lightning_shapley.layers import (
    LAYER_KINDS,
    NORM,
    PRODUCER,
    customized_pruners,
    is_depthwise,
    kind_of,
    supported_types,
)
from lightning_shapley.model_io import (
    Inputs,
    as_model_inputs,
    call_model,
    children_replaced,
    eager,
    kept_outputs,
)
from lightning_shapley.pruning.masking import copy_model

# Every layer whose output channels torch-pruning can take as the root of a group: the
# table's producers, and the transposed convolutions, so that groups rooted there are
# named in the warning rather than passed over.
_ROOTS = (
    *(t for kind in LAYER_KINDS if kind.role == PRODUCER for t in kind.types),
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_OUTPUT = "the output layer"


@dataclass(frozen=True)
class PrunableUnit:
    """Output channels that must be pruned together.

    Attributes:
        name: qualified name of the unit's first producer in registration order; the
            unit's identity, and the layer a channel game is played on.
        producers: the ``Conv1d/2d/3d`` or ``Linear`` modules whose output channels these
            are, in registration order; several when a residual add joins their outputs
            (a depthwise convolution on these channels is a producer too).
        batchnorms: the normalizations (the table's norm kinds) of these channels.
        consumers: the modules that read these channels as input channels. A consumer's
            input is either these channels one to one, or flattened channel-major:
            ``in_features == n_channels * k``, channel ``c`` being inputs
            ``c*k .. c*k + k - 1``.
        n_channels: the number of channels.
        copies: how many copies of the channels each producer makes side by side: 3 for
            the heads of a packed query/key/value projection, 1 otherwise (see
            :func:`~lightning_shapley.layers.spread`).
    """

    name: str
    producers: tuple[str, ...]
    batchnorms: tuple[str, ...]
    consumers: tuple[str, ...]
    n_channels: int
    copies: int = 1


def find_units(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | Inputs,
    layers: Sequence[str] | None = None,
) -> list[PrunableUnit]:
    """The prunable units of ``model``: every Conv/Linear output and what is coupled to it.

    torch-pruning traces a deep copy of the model in eval mode with gradients on (it
    follows autograd), so the model is left exactly as it was: parameters, buffers,
    train/eval flags, ``requires_grad`` and hooks. The copy's forward hooks do run once.
    The module docstring states which groups become units and which are left out.

    Args:
        model: any ``nn.Module``.
        example_inputs: a batch the model's forward takes, a tuple of its positional
            arguments, a mapping of its keyword arguments or
            :class:`~lightning_shapley.model_io.ModelInputs`; only shapes matter.
        layers: names of producers; only the units that contain them are returned, in
            this order, each once. ``None`` (the default) returns every unit, in the
            registration order of their first producers.

    Returns:
        The units, as :class:`PrunableUnit`.

    Raises:
        ValueError: if torch-pruning cannot trace the model, or a name in ``layers`` is not
            a producer of a unit (unknown, the output layer, or coupled to layers a unit
            has no role for).

    Example:
        >>> from lightning_shapley.app.models import DigitsCNN
        >>> units = find_units(DigitsCNN(), torch.zeros(2, 1, 8, 8))
        >>> [unit.name for unit in units]
        ['features.0', 'features.3', 'features.7']
        >>> units[1]
        PrunableUnit(name='features.3', producers=('features.3',), batchnorms=('features.4',), consumers=('features.7',), n_channels=32, copies=1)
    """  # noqa: E501 (a doctest's output line)
    check_layer_names(layers)
    args = example_call(example_inputs)
    replica = traceable_copy(model)
    with torch_pruning_fixes(replica):
        units, rejected = _DependencyGraph(replica, args, type(model).__name__).units()
    if layers is None:
        skipped = {name: why for name, why in rejected.items() if why != _OUTPUT}
        if skipped:
            details = "; ".join(f"{name!r}: {why}" for name, why in skipped.items())
            warnings.warn(
                f"find_units skipped channels that cannot be pruned as a unit: {details}",
                stacklevel=2,
            )
        return units
    return _select(units, rejected, list(layers), type(model).__name__)


#: Attributes in which an attention module counts its heads (Hugging Face, timm, PyTorch).
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_head", "n_heads")


def attention_heads(model: nn.Module, layer: str) -> int | None:
    """The head count of the module holding ``layer``, when it is an attention module."""
    parent = model.get_submodule(layer.rpartition(".")[0])
    for attribute in HEAD_COUNT_ATTRIBUTES:
        heads = getattr(parent, attribute, None)
        if isinstance(heads, int) and heads > 1:
            return heads
    return None


def check_layer_names(layers: object) -> None:
    """Raises a ``ValueError`` unless ``layers`` is ``None`` or a sequence of module names.

    A single name given as a string is the likely mistake, so it gets its own message.
    """
    if isinstance(layers, str):
        raise ValueError(
            f"layers={layers!r} is a string; give a sequence of module names, e.g. [{layers!r}]"
        )
    if layers is not None and not (
        isinstance(layers, Sequence) and all(isinstance(name, str) for name in layers)
    ):
        raise ValueError(f"layers={layers!r} is not allowed; give a sequence of module names")


class _DependencyGraph:
    """torch-pruning's dependency graph of a model (a traceable copy), read as units."""

    def __init__(self, model: nn.Module, args: Inputs, model_name: str) -> None:
        self.model = model
        self.names = {module: name for name, module in self.model.named_modules()}
        self.order = {name: index for index, name in enumerate(self.names.values())}
        outputs: list[Tensor] = []

        def forward(module: nn.Module, inputs: Inputs) -> object:
            # Called with the inputs as given: torch-pruning's default would also try
            # ``model(*batch)``, splitting a batch into samples.
            differentiable = _differentiable_outputs(call_model(module, inputs))
            outputs.extend(differentiable)
            return differentiable  # what torch-pruning can walk, whatever the output is

        try:
            self.graph = dependency_graph(self.model, args, forward)
        except Exception as error:
            raise ValueError(
                f"torch-pruning could not trace {model_name} on example_inputs, so "
                f"its prunable units are unknown ({type(error).__name__}: {error})"
            ) from error
        grad_fns = {output.grad_fn for output in outputs}
        self.output_nodes = {
            node for node in self.graph.module2node.values() if node.grad_fn in grad_fns
        }

    def units(self) -> tuple[list[PrunableUnit], dict[str, str]]:
        """The units, and why each producer outside them is not a unit."""
        units: list[PrunableUnit] = []
        rejected: dict[str, str] = {}
        visited: set[nn.Module] = set()
        for module in self.names:
            if (
                not isinstance(module, _ROOTS)
                or module not in self.graph.module2node  # not called by the forward
                or module in visited
            ):
                continue
            pruner = self.graph.get_pruner_of_module(module)
            n_channels = pruner.get_out_channels(module)
            group = self.graph.get_pruning_group(
                module, pruner.prune_out_channels, list(range(n_channels))
            )
            producers = {
                item.dep.target.module
                for item in group
                if self.graph.is_out_channel_pruning_fn(item.dep.handler)
            }
            # One unit per group: its other producers root no group of their own. A producer
            # can still be in a second group through a partial index map (a concatenation
            # added to a wider tensor), but such groups are never units (_index_problem).
            visited |= producers
            unit = self._unit(group, n_channels)
            if isinstance(unit, str):
                unit = self._packed_heads(group, producers, n_channels) or unit
            if isinstance(unit, PrunableUnit):
                units.append(unit)
            else:
                for producer in producers:
                    if isinstance(producer, _ROOTS) and producer in self.names:
                        rejected[self.names[producer]] = unit
        for module, name in self.names.items():
            why = _never_pruned(module)
            if why:
                rejected[name] = why
        units.sort(key=lambda unit: self.order[unit.name])
        return units, dict(sorted(rejected.items(), key=lambda item: self.order[item[0]]))

    def _unit(self, group: tp.dependency.Group, n_channels: int) -> PrunableUnit | str:
        """The unit of one pruning group, or why the group is not one."""
        roles: dict[str, set[str]] = {PRODUCER: set(), NORM: set(), _CONSUMER: set()}
        for item in group:
            node, handler = item.dep.target, item.dep.handler
            if node in self.output_nodes and self.graph.is_out_channel_pruning_fn(handler):
                return _OUTPUT
            module = node.module
            if isinstance(module, nn.Parameter):
                return (
                    f"an nn.Parameter of shape {tuple(module.shape)} used outside a module "
                    "is coupled to its channels"
                )
            if module not in self.names:
                continue  # an operation without parameters: add, ReLU, flatten, concat, ...
            name = self.names[module]
            role = _role(module, self.graph.is_out_channel_pruning_fn(handler))
            if role is None:
                return _no_role(name, module)
            pairs = list(zip(item.idxs, item.root_idxs, strict=True))
            problem = _index_problem(name, module, role, pairs, n_channels)
            if problem:
                return problem
            roles[role].add(name)
        producers, batchnorms, consumers = (
            tuple(sorted(roles[role], key=self.order.__getitem__))
            for role in (PRODUCER, NORM, _CONSUMER)
        )
        width = self._channel_width(producers, batchnorms, n_channels)
        return PrunableUnit(producers[0], producers, batchnorms, consumers, n_channels // width)

    def _channel_width(
        self, producers: tuple[str, ...], norms: tuple[str, ...], n_features: int
    ) -> int:
        """How many consecutive features one channel of the unit spans.

        A GroupNorm's group is one channel (its statistics are per group, so only whole
        groups can go), and so is an attention head: the query, key and value projections
        (coupled producers with one parent) sit in a module that counts its heads in one
        of :data:`HEAD_COUNT_ATTRIBUTES`, each head a block of consecutive features. The
        output projection of such a module makes the residual stream, not heads.
        """
        for name in norms:
            module = self.model.get_submodule(name)
            if isinstance(module, nn.GroupNorm):
                return n_features // module.num_groups
        if len(producers) > 1 and len({name.rpartition(".")[0] for name in producers}) == 1:
            heads = attention_heads(self.model, producers[0])
            if heads is not None and n_features % heads == 0:
                return n_features // heads
        return 1

    def _packed_heads(
        self, group: tp.dependency.Group, producers: set[nn.Module], n_features: int
    ) -> PrunableUnit | None:
        """The heads of a packed query/key/value projection, when ``group`` is one.

        One layer makes the queries, keys and values side by side (timm's ``qkv``, GPT-2's
        ``c_attn``) inside a module that counts its heads, and one layer reads what the
        heads return. torch-pruning maps only the values to that reader, so the group
        is no unit as it stands, but its heads are: head ``h`` is block ``h`` of each of
        the copies, and block ``h`` of the reader's input.
        """
        layers = [module for module in producers if module in self.names]
        if len(layers) != 1:
            return None
        (producer,) = layers
        name = self.names[producer]
        heads = attention_heads(self.model, name)
        if heads is None or _role(producer, prunes_output=True) != PRODUCER:
            return None
        readers = set()
        for item in group:
            node, module = item.dep.target, item.dep.target.module
            if node in self.output_nodes:
                return None
            if module in self.names and module is not producer:
                if self.graph.is_out_channel_pruning_fn(item.dep.handler):
                    return None
                readers.add(module)
        if len(readers) != 1 or _role(next(iter(readers)), prunes_output=False) != _CONSUMER:
            return None
        (reader,) = readers
        width = getattr(reader, kind_of(reader).in_attribute)
        copies, rest = divmod(n_features, width)
        if rest or copies < 2 or width % heads:
            return None
        return PrunableUnit(name, (name,), (), (self.names[reader],), heads, copies)


def example_call(example_inputs: object) -> Inputs:
    """``example_inputs`` as the arguments of one forward call (see :func:`find_units`)."""
    try:
        return as_model_inputs(example_inputs)
    except ValueError as error:
        raise ValueError(f"example_inputs: {error}") from error


def checked_example_inputs(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """The forward's positional arguments: a tensor, or a sequence of tensors."""
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple) and all(
        isinstance(value, Tensor) for value in example_inputs
    ):
        return tuple(example_inputs)
    raise ValueError(
        f"example_inputs is a {type(example_inputs).__name__}; give a Tensor the model's "
        "forward takes, or a tuple of Tensors (its positional arguments)"
    )


def dependency_graph(
    model: nn.Module, inputs: Inputs, forward: Callable[[nn.Module, Inputs], object]
) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, traced by ``forward(model, inputs)``.

    With this package's pruners for the layer kinds torch-pruning lacks and gradients on;
    build and use it under :func:`torch_pruning_fixes`.
    """
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model,
            inputs,
            forward_fn=forward,
            customized_pruners=customized_pruners(),
            verbose=False,
        )


@contextlib.contextmanager
def torch_pruning_fixes(model: nn.Module) -> Iterator[None]:
    """The workarounds every use of a torch-pruning graph of ``model`` runs under.

    Its metrics are taken out (:func:`without_metrics`), and a concatenation torch-pruning
    cannot size is left unmapped rather than failing the whole trace.
    """
    with without_metrics(model), _unsized_concatenations_unmapped():
        yield


@contextlib.contextmanager
def _unsized_concatenations_unmapped() -> Iterator[None]:
    """Lets torch-pruning skip a concatenation whose input sizes it cannot infer.

    Its index mapping means to leave such a concatenation unmapped, but first adds the
    unknown sizes up and raises a ``TypeError`` (torch-pruning 1.6; Hugging Face's GPT-2
    has such concatenations of position ids). Only that ``TypeError`` is caught.
    """
    original = index_mapping.update_concat_index_mapping

    def lenient(graph: tp.DependencyGraph, node: object) -> None:
        try:
            original(graph, node)
        except TypeError as error:
            if "NoneType" not in str(error):
                raise

    index_mapping.update_concat_index_mapping = lenient
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


@contextlib.contextmanager
def without_metrics(model: nn.Module) -> Iterator[None]:
    """Takes torchmetrics ``Metric`` submodules out of ``model`` for the block, then puts them back.

    A ``Metric`` overrides ``==``, and torch-pruning tests layers for membership in lists,
    so one metric held by a LightningModule would match every layer and hide the whole
    model from the trace. Metrics hold no channels and take no part in the forward.
    """
    with children_replaced(model, Metric, lambda _metric: nn.Module()):
        yield


def traceable_copy(model: nn.Module) -> nn.Module:
    """A deep copy to trace: tracing switches it to eval mode and runs a forward pass.

    Compiled submodules are copied as their original modules (see ``model_io.eager``):
    torch-pruning traces eager code, and the layers keep their names from before compiling.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; find_units needs an nn.Module")
    try:
        with eager(model):
            replica = copy_model(model)
    except Exception as error:
        raise ValueError(
            f"find_units traces a deep copy of {type(model).__name__}, and copying it failed "
            f"({type(error).__name__}: {error})"
        ) from error
    # Tracing follows autograd: a layer with frozen parameters would drop out of the graph.
    for parameter in replica.parameters():
        if parameter.is_floating_point() or parameter.is_complex():
            parameter.requires_grad_(True)
    return replica


def _differentiable_outputs(out: object) -> list[Tensor]:
    tensors = kept_outputs(out)
    differentiable = [t for t in tensors if t.grad_fn is not None]
    if not differentiable:
        raise ValueError(
            "no output of the model is computed from its parameters through autograd (an "
            "argmax, a detached tensor or a non-tensor result), and torch-pruning traces the "
            "autograd graph back from the outputs"
        )
    return differentiable


_CONSUMER = "consumer"


def _role(module: nn.Module, prunes_output: bool) -> str | None:
    """The module's role in a unit, as its layer kind says; ``None`` if it can have none."""
    kind = kind_of(module)
    if kind is None or kind.problem(module) is not None:
        return None
    if kind.role == NORM or is_depthwise(module):
        return kind.role
    return PRODUCER if prunes_output else _CONSUMER


def _never_pruned(module: nn.Module) -> str | None:
    """Why a layer with channels of its own is not pruned at all, for the layers users ask about."""
    if isinstance(module, nn.RNNBase):
        return (
            f"a recurrent layer ({type(module).__name__}): its hidden units are not pruned "
            "(the layers after it are)"
        )
    if isinstance(module, nn.MultiheadAttention):
        return (
            "an nn.MultiheadAttention ties the width of all its heads together to its "
            "embed_dim, so a head cannot be removed from it: its heads are not pruned (write "
            "the projections as nn.Linear layers, or one packed qkv layer, in a module with "
            "a num_heads attribute to prune heads)"
        )
    return None


def _no_role(name: str, module: nn.Module) -> str:
    kind = kind_of(module)
    if kind is not None and kind.problem(module) is not None:
        return f"{name!r} is {kind.problem(module)}"
    return (
        f"coupled to {name!r} ({type(module).__name__}), but a unit holds only layers of "
        f"the kinds it knows: {supported_types()}"
    )


def _index_problem(
    name: str, module: nn.Module, role: str, pairs: list[tuple[int, int]], n_channels: int
) -> str | None:
    """Why a layer does not see the unit's channels in a way the unit can state, if so.

    ``pairs`` holds (index in the layer, channel of the unit) for each coupled index.
    """
    kind = kind_of(module)
    if role == _CONSUMER:
        size = getattr(module, kind.in_attribute)
        k = size // n_channels
        if size % n_channels == 0 and sorted(pairs) == [(i, i // k) for i in range(size)]:
            return None
        return (
            f"{name!r} reads its {n_channels} channels among {size} inputs through a "
            "concatenation, split or reshape that a unit cannot state"
        )
    size = getattr(module, kind.out_attribute)
    if size == n_channels and sorted(pairs) == [(i, i) for i in range(size)]:
        return None
    return f"{name!r} holds {size} channels coupled to {n_channels} in a different order"


def _select(
    units: list[PrunableUnit], rejected: dict[str, str], layers: list[str], model_name: str
) -> list[PrunableUnit]:
    """The units that contain the named producers, in the given order, each once."""
    by_producer = {producer: unit for unit in units for producer in unit.producers}
    errors = []
    for layer in layers:
        if layer in by_producer:
            continue
        if rejected.get(layer) == _OUTPUT:
            errors.append(
                f"layers: {layer!r} produces the model's output channels; the output layer "
                "cannot be pruned"
            )
        elif layer in rejected:
            errors.append(f"layers: {layer!r} cannot be pruned: {rejected[layer]}")
        else:
            errors.append(
                f"layers: {layer!r} is not a producer of a prunable unit of {model_name}; "
                f"valid names: {list(by_producer)}"
            )
    if errors:
        raise ValueError("; ".join(errors))
    return list(dict.fromkeys(by_producer[layer] for layer in layers))
