"""Forward passes of many channel coalitions at once.

Scoring a layer means running the model once per coalition with the channels outside it
zeroed. Two engines do this in batches of ``k`` coalitions; both stack the coalitions
*sample-major* (row ``b * k + j`` is sample ``b`` under coalition ``j``) and return logits
shaped ``[k, B, ...]``.

- :class:`SplitForward` traces the model with ``torch.fx`` and cuts the graph where the
  masks apply: everything upstream of every mask point runs once per batch and is cached,
  only the downstream part runs per coalition. When the masked activation reaches a
  convolution or linear layer through channel-wise, zero-preserving operations only
  (ReLU, pooling, dropout, flatten), the mask is folded into that layer's weights
  instead: the ``k`` coalitions become one layer with ``k`` times the output channels on
  the cached input, a single large matrix product.
- :class:`FullForward` works for any model: it replays the whole model on the batch
  repeated ``k`` times, with forward hooks that zero the channels.

The channels may be masked at several modules at once (the mask points), when several
layers produce one set of channels: convolutions joined by a residual add, or an expand
convolution and the depthwise convolution after it. Every mask point zeroes the same
channels; a mask point downstream of another one is masked again where it is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_shapley.model_io import Inputs, call_model, logits_of, per_sample
from lightning_shapley.shapley.capture import (
    FOLDABLE_CONVS,
    ExportCapture,
    SymbolicCapture,
    UnsplittableModelError,
)

ReadOutput = Callable[[object], Tensor]


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _OutputBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor an operation returns (views excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            self.total += sum(t.numel() * t.element_size() for t in _tensors(out))
        return out


def activation_bytes(run: Callable[[], object]) -> int:
    """Bytes of every tensor the operations of ``run()`` return, views excluded.

    An upper bound of the activation memory of one forward pass, used to size batches of
    coalitions to a memory budget; counted per operation, it holds alike for a module, an
    fx graph of modules and one of ATen operations (torch.export's).
    """
    with _OutputBytes() as counter:
        run()
    return counter.total


def _mask_view(masks: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """``masks [k, C]`` shaped to multiply a ``[B, k, ...]`` activation of ``ndim + 1`` dims."""
    shape = [1] * (ndim + 1)
    shape[1] = masks.shape[0]
    shape[channel_dim + 1] = masks.shape[1]
    return masks.reshape(shape)


def _mask_stacked(output: Tensor, masks: Tensor, channel_dim: int) -> Tensor:
    """Zeroes channels of a sample-major stack: row ``b * k + j`` keeps the channels of mask ``j``.

    ``masks`` is ``[k, C]``; ``output`` is ``[B * k, ...]`` with ``C`` channels at ``channel_dim``.
    """
    stacked = output.reshape(-1, len(masks), *output.shape[1:])
    masked = stacked * _mask_view(masks.to(output.dtype), output.ndim, channel_dim)
    return masked.reshape(output.shape)


def _to_coalition_major(output: Tensor, batch_size: int, k: int) -> Tensor:
    """Sample-major ``[B * k, ...]`` logits (``[B * k * T, ...]`` per token) as ``[k, B, ...]``."""
    output = per_sample(output, batch_size * k)
    return output.reshape(batch_size, k, *output.shape[1:]).transpose(0, 1)


class FullForward:
    """Runs the whole model per coalition, zeroing channels with forward hooks.

    Args:
        model: the model, in the mode and grad state the caller set.
        mask_modules: the module whose output channels are masked, or several modules
            whose outputs carry the same channels; each is masked alike.
        channel_dim: the channel dimension of those outputs.
        inputs: the inputs of each scoring batch.
        read_output: finds the logits in the model's output.
    """

    name = "full"
    reads_attributes = False

    def __init__(
        self,
        model: nn.Module,
        mask_modules: nn.Module | Sequence[nn.Module],
        channel_dim: int,
        inputs: Sequence[Inputs],
        read_output: ReadOutput = logits_of,
    ) -> None:
        self._model = model
        self._read_output = read_output
        if isinstance(mask_modules, nn.Module):
            mask_modules = [mask_modules]
        self._mask_modules = list(dict.fromkeys(mask_modules))
        self._channel_dim = channel_dim
        self._inputs = list(inputs)

    def recache(self) -> None:
        """Nothing to do: every coalition runs the whole model as it is."""

    def release(self) -> None:
        """Nothing to do: nothing is cached."""

    def bytes_per_coalition(self) -> int:
        """Activation bytes of one coalition on the largest batch."""
        largest = max(self._inputs, key=len)
        return activation_bytes(lambda: call_model(self._model, largest))

    def __call__(self, masks: Tensor, batch: int) -> Tensor:
        """Logits ``[k, B, ...]`` of batch ``batch`` under each of the ``k`` channel masks."""
        inputs = self._inputs[batch]
        k = len(masks)

        def zero_channels(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            return _mask_stacked(output, masks, self._channel_dim)

        handles = [module.register_forward_hook(zero_channels) for module in self._mask_modules]
        try:
            output = call_model(self._model, inputs.repeat_interleave(k, 0))
        finally:
            for handle in handles:
                handle.remove()
        return _to_coalition_major(self._read_output(output), len(inputs), k)


# --------------------------------------------------------------------------- split engine


class _MultiplyHead:
    """Masks a cached activation: ``[B, ...]`` times ``k`` masks gives ``[B * k, ...]``."""

    def __init__(self, channel_dim: int) -> None:
        self._channel_dim = channel_dim

    def __call__(self, activation: Tensor, masks: Tensor) -> Tensor:
        view = _mask_view(masks.to(activation.dtype), activation.ndim, self._channel_dim)
        masked = activation.unsqueeze(1) * view
        return masked.flatten(0, 1)


class _FoldedHead:
    """Runs the consumer layer once with ``k`` masked copies of its weight stacked.

    ``conv(x * m) == conv_{W * m}(x)`` for a mask ``m`` over input channels, so ``k``
    coalitions become one layer with ``k`` times the output channels applied to the
    cached, unmasked input: a single large matrix product instead of ``k`` small ones.
    """

    def __init__(self, layer: nn.Module, features_per_channel: int) -> None:
        self._layer = layer
        self._features_per_channel = features_per_channel

    def __call__(self, layer_input: Tensor, masks: Tensor) -> Tensor:
        k = len(masks)
        weight = self._layer.weight
        feature_masks = masks.to(weight.dtype).repeat_interleave(self._features_per_channel, 1)
        mask_shape = (k, 1, weight.shape[1]) + (1,) * (weight.ndim - 2)
        stacked = (weight.unsqueeze(0) * feature_masks.reshape(mask_shape)).flatten(0, 1)
        bias = None if self._layer.bias is None else self._layer.bias.repeat(k)
        if isinstance(self._layer, nn.Linear):
            output = F.linear(layer_input, stacked, bias)
        else:
            output = self._layer._conv_forward(layer_input, stacked, bias)
        # [B, k * C_out, ...] -> [B * k, C_out, ...]
        return output.reshape(len(layer_input) * k, weight.shape[0], *output.shape[2:])


class SplitForward:
    """Caches everything upstream of the mask points; runs only the downstream part.

    A mask point that no other mask point precedes is a cut: its output is cached
    unmasked and multiplied by the ``k`` masks when the coalitions run. A mask point
    downstream of another one is computed per coalition anyway, so the masks are applied
    right after it inside the downstream graph. Folding the mask into the next layer
    needs a single mask point.

    Args:
        model: the model; it is traced with ``torch.fx.symbolic_trace``.
        mask_names: qualified name of the module whose output channels are masked, or the
            names of several modules whose outputs carry the same channels.
        channel_dim: the channel dimension of those outputs.
        n_channels: the number of channels there.
        inputs: the inputs of each scoring batch (positional arguments only).
        fold: fold the mask into the next convolution or linear layer where possible;
            :attr:`name` says whether it was (``"split+fold"``) or not (``"split"``).
        read_output: finds the logits in the model's output.

    Raises:
        UnsplittableModelError: the model cannot be traced, takes keyword arguments, calls
            a masked module more than once, or passes values across the cut that are not
            batch-shaped tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_names: str | Sequence[str],
        channel_dim: int,
        n_channels: int,
        inputs: Sequence[Inputs],
        fold: bool = True,
        read_output: ReadOutput = logits_of,
        capture: str = "fx",
    ) -> None:
        self._n_channels = n_channels
        self._read_output = read_output
        self._channel_dim = channel_dim
        names = [mask_names] if isinstance(mask_names, str) else list(dict.fromkeys(mask_names))
        self._capture = (
            SymbolicCapture(model) if capture == "fx" else ExportCapture(model, inputs[0])
        )
        gm = self._capture.graph_module
        mask_nodes = [self._capture.module_output(name) for name in names]
        #: Whether the graph holds copies of the model's tensors (``fx``'s ``get_attr``):
        #: they go stale when the model's weights change, so it must be traced anew.
        self.reads_attributes = self._capture.reads_attributes
        single = len(mask_nodes) == 1
        target = (
            self._capture.fold_target(mask_nodes[0])
            if fold and single and channel_dim == 1
            else None
        )
        head: _FoldedHead | _MultiplyHead | None = None
        if target is not None:
            consumer, layer = target
            self._cut(gm, [consumer], [consumer.args[0]], [], inputs)
            head = self._folded_head(layer)
        if head is None:
            after_a_mask = set().union(*(_descendants(node) for node in mask_nodes))
            cuts = [node for node in mask_nodes if node not in after_a_mask]
            inside = [node for node in mask_nodes if node in after_a_mask]
            self._cut(gm, cuts, cuts, inside, inputs)
            head = _MultiplyHead(channel_dim)
        self._head = head
        folded = "" if isinstance(head, _MultiplyHead) else "+fold"
        self.name = f"{self._capture.name}{folded}"

    def _cut(
        self,
        gm: fx.GraphModule,
        split_nodes: list[fx.Node],
        head_inputs: list[fx.Node],
        inside: list[fx.Node],
        inputs: Sequence[Inputs],
    ) -> None:
        """Splits the graph at ``split_nodes`` and caches the upstream values of every batch."""
        self._build(gm, split_nodes, head_inputs, inside)
        self._inputs = list(inputs)
        try:
            self.recache()
        except UnsplittableModelError:
            raise
        except Exception as error:  # the traced graph is not the model's forward on these
            raise UnsplittableModelError(
                f"the split graph failed on the inputs: {error}"
            ) from error

    def recache(self) -> None:
        """Runs the upstream part again on every batch: the model's weights or masks changed.

        A graph that reads the model's tensors by name is rebuilt from the model first.
        """
        if self._capture.rebuilds:
            self._prefix = self._capture.rebuild(self._prefix.graph)
            self._suffix = self._capture.rebuild(self._suffix.graph)
        self._cache = [self._cached(x) for x in self._inputs]

    def release(self) -> None:
        """Frees the cached upstream values until :meth:`recache`."""
        self._cache = None

    def _build(
        self,
        gm: fx.GraphModule,
        split_nodes: list[fx.Node],
        head_inputs: list[fx.Node],
        inside: list[fx.Node],
    ) -> None:
        """The prefix (upstream, cached) and suffix (per coalition) graphs.

        The suffix takes one placeholder per split node (the head's output standing for
        it), one per cached value that crosses the cut, then the ``[k, C]`` masks, which
        it multiplies into the output of every node in ``inside`` right after computing it.
        """
        graph = gm.graph
        splits, heads, remasked = set(split_nodes), set(head_inputs), set(inside)
        downstream = set().union(*(_descendants(node) for node in split_nodes))
        if not any(node.op == "output" for node in downstream):
            cut = ", ".join(str(node) for node in split_nodes)
            raise UnsplittableModelError(f"the model's output does not depend on {cut}")
        boundary = list(
            dict.fromkeys(
                arg
                for node in graph.nodes
                if node in downstream
                for arg in node.all_input_nodes
                if arg not in downstream and arg not in splits
            )
        )
        batch_dependent = _batch_dependent(graph)
        self._repeat = [node in batch_dependent for node in boundary]

        # A split node is cached when it is a head's input (a masked activation); a folded
        # consumer is not, the head replaces it.
        upstream = [
            node
            for node in graph.nodes
            if node not in downstream
            and node.op != "output"
            and (node not in splits or node in heads)
        ]
        prefix, env = fx.Graph(), {}
        for node in upstream:
            env[node] = prefix.node_copy(node, env.__getitem__)
        prefix.output(tuple(env[node] for node in [*head_inputs, *boundary]))
        self._prefix = fx.GraphModule(gm, prefix)

        suffix, env = fx.Graph(), {}
        for index, node in enumerate(split_nodes):
            env[node] = suffix.placeholder(f"masked_{index}")
        for index, node in enumerate(boundary):
            env[node] = suffix.placeholder(f"cached_{index}")
        masks = suffix.placeholder("masks")
        for node in graph.nodes:
            if node in downstream:
                env[node] = suffix.node_copy(node, env.__getitem__)
                if node in remasked:
                    env[node] = suffix.call_function(
                        _mask_stacked, (env[node], masks, self._channel_dim)
                    )
        self._suffix = fx.GraphModule(gm, suffix)

    def _cached(self, inputs: Inputs) -> tuple[list[Tensor], list[object]]:
        values = self._prefix(*self._capture.arguments(inputs))
        n_heads = len(values) - len(self._repeat)
        head_inputs, boundary = list(values[:n_heads]), list(values[n_heads:])
        for value, repeat in zip(boundary, self._repeat, strict=True):
            batched = isinstance(value, Tensor) and value.shape[:1] == (len(inputs),)
            # A size read off the batch (torch.export's sym_size: B, B * T) scales with it.
            size = isinstance(value, int) and value % len(inputs) == 0
            if repeat and not (batched or size):
                raise UnsplittableModelError(
                    "a value crossing the cut depends on the batch but is neither a tensor "
                    f"with the batch as its first dimension nor a size: {type(value).__name__}"
                )
        return head_inputs, boundary

    def _folded_head(self, layer: nn.Module) -> _FoldedHead | None:
        """The head that folds the mask into ``layer``, if its cached input maps to channels."""
        (head_input,) = self._cache[0][0]
        if isinstance(layer, FOLDABLE_CONVS):
            return _FoldedHead(layer, 1) if head_input.shape[1] == self._n_channels else None
        per_channel, remainder = divmod(head_input.shape[-1], self._n_channels)
        return None if head_input.ndim != 2 or remainder else _FoldedHead(layer, per_channel)

    def bytes_per_coalition(self) -> int:
        """Activation bytes of the downstream part for one coalition on the largest batch."""
        largest = max(range(len(self._cache)), key=lambda b: len(self._cache[b][0][0]))
        probe = torch.ones(1, self._n_channels, device=self._cache[largest][0][0].device)
        return activation_bytes(lambda: self(probe, largest))

    def __call__(self, masks: Tensor, batch: int) -> Tensor:
        """Logits ``[k, B, ...]`` of batch ``batch`` under each of the ``k`` channel masks."""
        if self._cache is None:
            raise RuntimeError("the upstream cache was released; call recache() first")
        head_inputs, boundary = self._cache[batch]
        k = len(masks)
        cached = [
            _stacked(value, k) if repeat else value
            for value, repeat in zip(boundary, self._repeat, strict=True)
        ]
        heads = [self._head(head_input, masks) for head_input in head_inputs]
        output = self._read_output(self._suffix(*heads, *cached, masks))
        return _to_coalition_major(output, len(head_inputs[0]), k)


def _stacked(value: Tensor | int, k: int) -> Tensor | int:
    """A batch-dependent value for ``k`` coalitions stacked sample-major.

    A tensor gets each sample ``k`` times in a row; a size gets ``k`` times larger.

    A size is taken to grow with the batch in proportion (``B``, ``B * T``); the game
    checks that stacked coalitions score as single ones, and runs them one at a time
    where they do not.
    """
    return value * k if isinstance(value, int) else value.repeat_interleave(k, 0)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.users)
    return seen


def _batch_dependent(graph: fx.Graph) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in dependent for arg in node.all_input_nodes):
            dependent.add(node)
    return dependent
