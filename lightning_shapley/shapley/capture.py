"""A model as a graph to cut where the masks apply: ``torch.fx`` tracing, or ``torch.export``.

:class:`~lightning_shapley.shapley.engines.SplitForward` runs the part of a model upstream
of the masked modules once per batch and only the rest per coalition. It needs the model
as an ``fx`` graph, and two answers about it: which node is a module's output (where the
mask goes), and which convolution or linear layer the mask can be folded into. Two
captures give them:

* :class:`SymbolicCapture`: ``torch.fx.symbolic_trace``. Fast, and modules stay
  ``call_module`` nodes; it fails on code that branches on a tensor's properties
  (``if x.dim() == 3``), reads attributes of tensors in Python, or returns objects.
* :class:`ExportCapture`: ``torch.export`` (non-strict, the batch dimension dynamic).
  It runs the Python code and records ATen operations, each tagged with the modules it
  came from, so it captures most of what ``fx`` cannot. Its graph reads the parameters
  by their qualified names (``get_attr``), looked up in the live model whenever the
  graph is rebuilt, so masks and weights changed since are seen.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn
from torch.utils import _pytree
from typing_extensions import override

from lightning_shapley.model_io import Inputs, ModelInputs


class UnsplittableModelError(RuntimeError):
    """The model cannot be cut at the masked module; the full engine still works."""


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
_aten = torch.ops.aten
# The same operations as ATen records them (what torch.export's graphs hold).
_CHANNELWISE_ATEN = {
    _aten.relu.default, _aten.hardtanh.default, _aten.leaky_relu.default, _aten.elu.default,
    _aten.gelu.default, _aten.silu.default, _aten.mish.default, _aten.hardswish.default,
    _aten.tanh.default, _aten.dropout.default, _aten.clone.default,
    _aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default,
    _aten.avg_pool1d.default, _aten.avg_pool2d.default, _aten.avg_pool3d.default,
    _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool2d.default,
    _aten.adaptive_avg_pool3d.default,
}  # fmt: skip
_LAYER_ATEN = {
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.linear.default,
}
FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_foldable(module: nn.Module) -> bool:
    """A plain linear layer or dense convolution without hooks.

    The folded head calls the layer's functional form, so subclasses (which may override
    ``forward``) and layers with hooks must run as they are.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    if type(module) is nn.Linear:
        return True
    return type(module) in FOLDABLE_CONVS and module.groups == 1 and module.padding_mode == "zeros"


class _Capture:
    """A captured graph: where a module's output is, and where a mask folds."""

    #: The engine's name when it cuts this graph (``"+fold"`` is added when it folds).
    name: str
    #: The graph, as a module.
    graph_module: fx.GraphModule
    #: Whether the graph must be rebuilt from the live model whenever it is recached.
    rebuilds: bool

    def module_output(self, name: str) -> fx.Node:
        """The one node whose value is the output of the module ``name``."""
        raise NotImplementedError

    def rebuild(self, graph: fx.Graph) -> fx.GraphModule:
        """``graph`` as a module reading the model's tensors now (when :attr:`rebuilds`)."""
        raise NotImplementedError

    def _layer(self, node: fx.Node) -> nn.Module | None:
        """The foldable layer that ``node`` runs whole, if it does."""
        raise NotImplementedError

    def _is_channelwise(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def _is_flatten(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def arguments(self, inputs: Inputs) -> tuple[Tensor, ...]:
        """The graph's positional arguments for one batch's inputs."""
        raise NotImplementedError

    def fold_target(self, mask_node: fx.Node) -> tuple[fx.Node, nn.Module] | None:
        """The convolution or linear layer a mask on ``mask_node`` can be folded into.

        The path there must be channel-wise and zero-preserving, with at most one flatten
        before a linear layer, and no other node may read the values along it.
        """
        node, flattened = mask_node, False
        while len(node.users) == 1:
            (user,) = node.users
            if user.all_input_nodes[:1] != [node] or user.args[0] is not node:
                return None
            layer = self._layer(user)
            if layer is not None and (type(layer) is nn.Linear or not flattened):
                return user, layer
            if self._is_flatten(user) and not flattened:
                flattened = True
            elif not self._is_channelwise(user) or len(user.all_input_nodes) != 1:
                return None
            node = user
        return None


class SymbolicCapture(_Capture):
    """The model traced by ``torch.fx.symbolic_trace``; modules are ``call_module`` nodes.

    Raises:
        UnsplittableModelError: ``fx`` cannot trace the model.
    """

    name = "split"

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as error:  # tracing fails in many ways on dynamic code
            raise UnsplittableModelError(f"torch.fx cannot trace the model: {error}") from error
        # Its get_attr nodes hold copies of tensors: a graph that has any is traced anew.
        self.rebuilds = False
        self.reads_attributes = any(n.op == "get_attr" for n in self.graph_module.graph.nodes)

    @override
    def module_output(self, name: str) -> fx.Node:
        nodes = [
            n for n in self.graph_module.graph.nodes if n.op == "call_module" and n.target == name
        ]
        if len(nodes) != 1:
            raise UnsplittableModelError(
                f"the traced graph calls {name!r} {len(nodes)} times, not once"
            )
        return nodes[0]

    @override
    def arguments(self, inputs: Inputs) -> tuple[Tensor, ...]:
        if isinstance(inputs, ModelInputs) and inputs.kwargs:
            raise UnsplittableModelError("the model is called with keyword arguments")
        return (inputs,) if isinstance(inputs, Tensor) else inputs.args

    @override
    def _layer(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        module = self.graph_module.get_submodule(node.target)
        return module if is_foldable(module) else None

    @override
    def _is_channelwise(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.graph_module.get_submodule(node.target), CHANNELWISE_MODULES)
        if node.op == "call_function":
            return node.target in _CHANNELWISE_FUNCTIONS
        return node.op == "call_method" and node.target in _CHANNELWISE_METHODS

    @override
    def _is_flatten(self, node: fx.Node) -> bool:
        """``flatten(x, 1)`` in any spelling: keeps the batch, merges channels with the rest."""
        if node.op == "call_module":
            module = self.graph_module.get_submodule(node.target)
            return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
        is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"
        )
        return is_flatten and start == 1 and end == -1


class ExportCapture(_Capture):
    """The model captured by ``torch.export`` (non-strict), its batch dimension dynamic.

    Every tensor of the inputs (positional and keyword) is an input of the graph, in the
    order ``torch.utils._pytree`` flattens ``(args, kwargs)``; their first dimension is
    the batch. The export runs on the first batch repeated twice, so that a batch of one
    sample cannot fix the batch size.

    Raises:
        UnsplittableModelError: the inputs hold values other than tensors, or
            ``torch.export`` cannot capture the model with a dynamic batch dimension.
    """

    name = "export"
    rebuilds = True
    reads_attributes = False

    def __init__(self, model: nn.Module, inputs: Inputs) -> None:
        args, kwargs = _args_and_kwargs(inputs)
        leaves = _pytree.tree_leaves((args, kwargs))
        if not all(isinstance(leaf, Tensor) and leaf.ndim > 0 for leaf in leaves):
            raise UnsplittableModelError("the model's inputs hold values other than batch tensors")
        # Exported through a wrapper that takes (args, kwargs) as two arguments: its dynamic
        # shapes can be given positionally, whatever the forward's own signature is
        # (torch.export refuses them for a forward(**inputs)).
        self._root = _Call(model)
        args, kwargs = _args_and_kwargs(inputs.repeat_interleave(2, 0))
        batch = torch.export.Dim("batch")
        dynamic = _pytree.tree_map(lambda _leaf: {0: batch}, (args, kwargs))
        try:
            with (
                warnings.catch_warnings(),
                _quiet(_EXPORT_LOGGERS),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                # torch.nn.utils.prune sets each masked weight as a plain attribute in a
                # forward pre-hook; the graph computes it from <name>_orig and <name>_mask.
                warnings.filterwarnings("ignore", "The tensor attributes .* during export")
                program = torch.export.export(
                    self._root, (args, kwargs), dynamic_shapes=dynamic, strict=False
                )
        except Exception as error:  # export refuses in many ways; none is the user's bug
            raise UnsplittableModelError(
                f"torch.export cannot capture the model with a dynamic batch: {error}"
            ) from error
        graph = program.module().graph
        for node in list(graph.nodes):  # the input guards torch.export adds: not ours
            if node.op == "call_module" and not node.users:
                graph.erase_node(node)
        graph.lint()
        self.graph_module = self.rebuild(graph)

    def rebuild(self, graph: fx.Graph) -> fx.GraphModule:
        """``graph`` as a module reading the live model's tensors by their names."""
        return fx.GraphModule(self._root, graph)

    @override
    def arguments(self, inputs: Inputs) -> tuple[Tensor, ...]:
        return tuple(_pytree.tree_leaves(_args_and_kwargs(inputs)))

    @override
    def module_output(self, name: str) -> fx.Node:
        path = f"{_Call.PREFIX}{name}"
        inside = [n for n in self.graph_module.graph.nodes if path in _module_paths(n)]
        members = set(inside)
        outputs = [n for n in inside if any(user not in members for user in n.users)]
        if len(outputs) != 1:
            raise UnsplittableModelError(
                f"{name!r} has {len(outputs)} outputs in the exported graph, not one (a module "
                "called more than once, or one returning several tensors)"
            )
        return outputs[0]

    @override
    def _layer(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_function" or node.target not in _LAYER_ATEN:
            return None
        path = _innermost_path(node)
        weight = node.args[1] if len(node.args) > 1 else None
        if path is None or not (
            isinstance(weight, fx.Node)
            and weight.op == "get_attr"
            and weight.target == f"{path}.weight"
        ):
            return None
        module = self._root.get_submodule(path)
        return module if is_foldable(module) else None

    @override
    def _is_channelwise(self, node: fx.Node) -> bool:
        return node.op == "call_function" and node.target in _CHANNELWISE_ATEN

    @override
    def _is_flatten(self, node: fx.Node) -> bool:
        if node.op != "call_function" or node.target is not _aten.flatten.using_ints:
            return False
        return tuple(node.args[1:]) in ((1,), (1, -1))


# torch.export logs and prints whole graphs when it gives up; giving up here only means
# the next engine is tried, and the reason travels in the UnsplittableModelError.
_EXPORT_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Only errors from these loggers for the length of the block."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Call(nn.Module):
    """Calls ``model(*args, **kwargs)``: what torch.export captures."""

    #: What the model's module names are prefixed with in the captured graph.
    PREFIX = "model."

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, args: tuple, kwargs: dict) -> object:
        return self.model(*args, **kwargs)


def _args_and_kwargs(inputs: Inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    return tuple(inputs.args), dict(inputs.kwargs)


def _module_paths(node: fx.Node) -> Iterator[str]:
    for path, _type in node.meta.get("nn_module_stack", {}).values():
        yield path


def _innermost_path(node: fx.Node) -> str | None:
    paths = list(_module_paths(node))
    return paths[-1] if paths else None
