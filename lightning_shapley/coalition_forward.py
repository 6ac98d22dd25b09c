"""Forward passes of many channel coalitions at once.

Scoring a layer means running the model once per coalition with the channels outside it
zeroed. Two engines do this in batches of ``k`` coalitions; both stack the coalitions
*sample-major* (row ``b * k + j`` is sample ``b`` under coalition ``j``) and return logits
shaped ``[k, B, ...]``.

- :class:`SplitForward` traces the model with ``torch.fx`` and cuts the graph where the
  mask applies: everything upstream runs once per batch and is cached, only the
  downstream part runs per coalition. When the masked activation reaches a convolution or
  linear layer through channel-wise, zero-preserving operations only (ReLU, pooling,
  dropout, flatten), the mask is folded into that layer's weights instead: the ``k``
  coalitions become one layer with ``k`` times the output channels on the cached input,
  a single large matrix product.
- :class:`FullForward` works for any model: it replays the whole model on the batch
  repeated ``k`` times, with a forward hook that zeroes the channels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn


class UnsplittableModelError(RuntimeError):
    """The model cannot be cut at the masked module; :class:`FullForward` still works."""


def _tensors(value: object) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def activation_bytes(module: nn.Module, run: Callable[[], Tensor]) -> int:
    """Bytes of every leaf module's output (and the result) during ``run()``.

    An upper bound of the activation memory of one forward pass, used to size batches of
    coalitions to a memory budget.
    """
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        total += sum(t.numel() * t.element_size() for t in _tensors(output))

    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return total + result.numel() * result.element_size()


def _mask_view(masks: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """``masks [k, C]`` shaped to multiply a ``[B, k, ...]`` activation of ``ndim + 1`` dims."""
    shape = [1] * (ndim + 1)
    shape[1] = masks.shape[0]
    shape[channel_dim + 1] = masks.shape[1]
    return masks.reshape(shape)


def _to_coalition_major(output: Tensor, batch_size: int, k: int) -> Tensor:
    return output.reshape(batch_size, k, *output.shape[1:]).transpose(0, 1)


class FullForward:
    """Runs the whole model per coalition, zeroing channels with a forward hook.

    Args:
        model: the model, in the mode and grad state the caller set.
        mask_module: the module whose output channels are masked.
        channel_dim: the channel dimension of that output.
        inputs: one input tensor per scoring batch.
    """

    name = "full"

    def __init__(
        self, model: nn.Module, mask_module: nn.Module, channel_dim: int, inputs: Sequence[Tensor]
    ) -> None:
        self._model = model
        self._mask_module = mask_module
        self._channel_dim = channel_dim
        self._inputs = list(inputs)

    def bytes_per_coalition(self) -> int:
        """Activation bytes of one coalition on the largest batch."""
        largest = max(self._inputs, key=len)
        return activation_bytes(self._model, lambda: self._model(largest))

    def __call__(self, masks: Tensor, batch: int) -> Tensor:
        """Logits ``[k, B, ...]`` of batch ``batch`` under each of the ``k`` channel masks."""
        inputs = self._inputs[batch]
        k = len(masks)

        def zero_channels(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            stacked = output.reshape(len(inputs), k, *output.shape[1:])
            masked = stacked * _mask_view(masks.to(output.dtype), output.ndim, self._channel_dim)
            return masked.reshape(output.shape)

        handle = self._mask_module.register_forward_hook(zero_channels)
        try:
            output = self._model(inputs.repeat_interleave(k, 0))
        finally:
            handle.remove()
        return _to_coalition_major(output, len(inputs), k)


# --------------------------------------------------------------------------- split engine

# Channel-wise operations that map a zero channel to a zero channel: masking commutes with
# them, so the mask can move past them to the next convolution or linear layer.
CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardtanh, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh,
    torch.relu, torch.tanh, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}  # fmt: skip
_CHANNELWISE_METHODS = {"relu", "relu_", "tanh", "contiguous"}
_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``flatten(x, 1)`` in any spelling: keeps the batch, merges channels with the rest."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    return is_flatten and start == 1 and end == -1


def _is_channelwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS


def _is_foldable(module: nn.Module) -> bool:
    """A plain linear layer or dense convolution without hooks.

    The folded head calls the layer's functional form, so subclasses (which may override
    ``forward``) and layers with hooks must run as they are.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    if type(module) is nn.Linear:
        return True
    return type(module) in _FOLDABLE_CONVS and module.groups == 1 and module.padding_mode == "zeros"


def _fold_target(gm: fx.GraphModule, mask_node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
    """The convolution or linear layer the mask can be folded into, if the path allows."""
    node, flattened = mask_node, False
    while len(node.users) == 1:
        (user,) = node.users
        if user.all_input_nodes != [node] or user.args[0] is not node:
            return None
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        if (
            module is not None
            and _is_foldable(module)
            and (type(module) is nn.Linear or not flattened)
        ):
            return user, module
        if _is_flatten(gm, user) and not flattened:
            flattened = True
        elif not _is_channelwise(gm, user):
            return None
        node = user
    return None


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
    """Caches everything upstream of the masked module; runs only the downstream part.

    Args:
        model: the model; it is traced with ``torch.fx.symbolic_trace``.
        mask_name: qualified name of the module whose output channels are masked.
        channel_dim: the channel dimension of that output.
        n_channels: the number of channels there.
        inputs: one input tensor per scoring batch.
        fold: fold the mask into the next convolution or linear layer where possible;
            :attr:`name` says whether it was (``"split+fold"``) or not (``"split"``).

    Raises:
        UnsplittableModelError: the model cannot be traced, calls the module more than
            once, or passes values across the cut that are not batch-shaped tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_name: str,
        channel_dim: int,
        n_channels: int,
        inputs: Sequence[Tensor],
        fold: bool = True,
    ) -> None:
        self._n_channels = n_channels
        try:
            gm = fx.symbolic_trace(model)
        except Exception as error:  # tracing fails in many ways on dynamic code
            raise UnsplittableModelError(f"torch.fx cannot trace the model: {error}") from error
        mask_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == mask_name]
        if len(mask_nodes) != 1:
            raise UnsplittableModelError(
                f"the traced graph calls {mask_name!r} {len(mask_nodes)} times, not once"
            )
        if sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
            raise UnsplittableModelError("the model's forward takes more than one input")
        (mask_node,) = mask_nodes
        target = _fold_target(gm, mask_node) if fold and channel_dim == 1 else None
        head: _FoldedHead | _MultiplyHead | None = None
        if target is not None:
            consumer, layer = target
            self._cut(gm, consumer, consumer.args[0], inputs)
            head = self._folded_head(layer)
        if head is None:
            self._cut(gm, mask_node, mask_node, inputs)
            head = _MultiplyHead(channel_dim)
        self._head = head
        self.name = "split" if isinstance(head, _MultiplyHead) else "split+fold"

    def _cut(
        self, gm: fx.GraphModule, split_node: fx.Node, head_input: fx.Node, inputs: Sequence[Tensor]
    ) -> None:
        """Splits the graph at ``split_node`` and caches the upstream values of every batch."""
        self._build(gm, split_node, head_input)
        self._cache = [self._cached(x) for x in inputs]

    def _build(self, gm: fx.GraphModule, split_node: fx.Node, head_input: fx.Node) -> None:
        graph = gm.graph
        downstream = _descendants(split_node)
        if not any(node.op == "output" for node in downstream):
            raise UnsplittableModelError(f"the model's output does not depend on {split_node}")
        boundary = list(
            dict.fromkeys(
                arg
                for node in graph.nodes
                if node in downstream
                for arg in node.all_input_nodes
                if arg not in downstream and arg is not split_node
            )
        )
        batch_dependent = _batch_dependent(graph)
        self._repeat = [node in batch_dependent for node in boundary]

        # The split node itself is cached when it is the head's input (the masked
        # activation); a folded consumer is not, the head replaces it.
        upstream = [
            node
            for node in graph.nodes
            if node not in downstream
            and node.op != "output"
            and (node is not split_node or node is head_input)
        ]
        prefix, env = fx.Graph(), {}
        for node in upstream:
            env[node] = prefix.node_copy(node, env.__getitem__)
        prefix.output(tuple(env[node] for node in [head_input, *boundary]))
        self._prefix = fx.GraphModule(gm, prefix)

        suffix, env = fx.Graph(), {}
        env[split_node] = suffix.placeholder("masked")
        for index, node in enumerate(boundary):
            env[node] = suffix.placeholder(f"cached_{index}")
        for node in graph.nodes:
            if node in downstream:
                env[node] = suffix.node_copy(node, env.__getitem__)
        self._suffix = fx.GraphModule(gm, suffix)

    def _cached(self, inputs: Tensor) -> tuple[Tensor, list[object]]:
        head_input, *boundary = self._prefix(inputs)
        for value, repeat in zip(boundary, self._repeat, strict=True):
            if repeat and not (isinstance(value, Tensor) and value.shape[:1] == inputs.shape[:1]):
                raise UnsplittableModelError(
                    "a value crossing the cut depends on the batch but is not a tensor with "
                    f"the batch as its first dimension: {type(value).__name__}"
                )
        return head_input, boundary

    def _folded_head(self, layer: nn.Module) -> _FoldedHead | None:
        """The head that folds the mask into ``layer``, if its cached input maps to channels."""
        head_input = self._cache[0][0]
        if isinstance(layer, _FOLDABLE_CONVS):
            return _FoldedHead(layer, 1) if head_input.shape[1] == self._n_channels else None
        per_channel, remainder = divmod(head_input.shape[-1], self._n_channels)
        return None if head_input.ndim != 2 or remainder else _FoldedHead(layer, per_channel)

    def bytes_per_coalition(self) -> int:
        """Activation bytes of the downstream part for one coalition on the largest batch."""
        largest = max(range(len(self._cache)), key=lambda b: len(self._cache[b][0]))
        probe = torch.ones(1, self._n_channels, device=self._cache[largest][0].device)
        return activation_bytes(self._suffix, lambda: self(probe, largest))

    def __call__(self, masks: Tensor, batch: int) -> Tensor:
        """Logits ``[k, B, ...]`` of batch ``batch`` under each of the ``k`` channel masks."""
        head_input, boundary = self._cache[batch]
        k = len(masks)
        cached = [
            value.repeat_interleave(k, 0) if repeat else value
            for value, repeat in zip(boundary, self._repeat, strict=True)
        ]
        output = self._suffix(self._head(head_input, masks), *cached)
        return _to_coalition_major(output, len(head_input), k)


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
