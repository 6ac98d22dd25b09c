"""Deployment: a physically smaller model with the pruned channels removed, and its artifacts.

A masked model (see ``masking.py``) still computes every channel; its pruned channels are
merely exactly zero after their last coupled layer. :func:`compact` removes them: the
producers lose those output channels, the BatchNorms those features, and the consumers
the matching input channels (or input features, behind a ``Flatten``). torch-pruning's
dependency graph does the surgery, so residual partners shrink together.

From the compact model, everything a deployment needs, all for the CPU:

- :func:`save_compact` / :func:`load_compact`: a checkpoint of the compact model that
  reloads into a fresh instance of the model's own, unmodified class.
- :func:`quantize`: int8 weights, dynamic for Linear layers and static (calibrated) for
  convolutions.
- :func:`to_torchscript` and :func:`to_onnx`: files that run without the model's Python
  code, their outputs checked against the model's.
- :func:`measure_latency`, :func:`file_size`, :func:`accuracy`: what the artifacts cost
  and what they score.
- :func:`export_artifacts`: all of the above in one call, as :class:`Artifact` records.

Two of the torch APIs used here are deprecated in torch 2.13 without a replacement inside
torch itself, and still work: ``torch.ao.quantization`` (its successor is the separate
``torchao`` package) and ``torch.jit`` (TorchScript, which the issue asks for by name).
Their deprecation warnings are let through, not silenced.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_shapley.pruning import masking, units
from lightning_shapley.pruning.units import checked_example_inputs, traceable_copy

#: What :func:`export_artifacts` can write: the compact checkpoint (:func:`save_compact`),
#: its int8 version (:func:`quantize`, saved as TorchScript), TorchScript and ONNX.
EXPORT_FORMATS = ("compact", "int8", "torchscript", "onnx")

# The file each format is written to, inside export_artifacts' directory.
_FILE_NAMES = {
    "compact": "compact.pt",
    "int8": "compact-int8.torchscript.pt",
    "torchscript": "compact.torchscript.pt",
    "onnx": "compact.onnx",
}
# Marks a save_compact file; the number changes if its layout does.
_CHECKPOINT_FORMAT = "lightning_shapley.compact/1"
# The constructor arguments that fix the shapes of each layer kind torch-pruning resizes.
_SHAPE_ATTRIBUTES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (nn.modules.conv._ConvNd, ("in_channels", "out_channels", "groups")),
    (nn.Linear, ("in_features", "out_features")),
    (nn.modules.batchnorm._NormBase, ("num_features",)),  # BatchNorm, InstanceNorm
    (nn.LayerNorm, ("normalized_shape",)),
    (nn.GroupNorm, ("num_channels",)),
    (nn.PReLU, ("num_parameters",)),
    (nn.Embedding, ("num_embeddings", "embedding_dim")),
)
_INSTALL_EXPORT = "pip install 'lightning-shapley[export]'"


def compact(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> nn.Module:
    """A new model without the pruned channels, computing the same outputs as ``model``.

    The model is deep-copied first and left exactly as it was. On the copy, each prunable
    unit (``units.find_units``) reads its pruned channels from the masks
    (``masking.pruned_channels``), every mask is baked in (``masking.make_permanent``), and
    torch-pruning removes the pruned channels from every coupled layer: producers,
    BatchNorms, consumers and residual partners. The copy keeps the model's train/eval
    flags and ``requires_grad`` flags; it holds no pruning masks.

    The outputs are checked on ``example_inputs`` in eval mode: a pruned channel is
    removable only when it feeds zeros to its consumers, which holds after a masked
    BatchNorm followed by ReLU-like activations, but not after, say, a sigmoid
    (``sigmoid(0) = 0.5``).

    Args:
        model: a model masked by ``masking.py`` (a model with nothing pruned comes back as
            an equal copy).
        example_inputs: a batch the model's forward takes, or a tuple of its positional
            arguments. Real data makes the output check meaningful; zeros work too.

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
    args = checked_example_inputs(example_inputs)
    replica = traceable_copy(model)
    # traceable_copy turns requires_grad on for tracing; remember the model's flags by name.
    requires_grad = {
        id(copied): original.requires_grad
        for original, copied in zip(model.parameters(), replica.parameters(), strict=True)
    }
    training = {name: module.training for name, module in replica.named_modules()}

    found = units.find_units(replica, args)
    pruned = {unit.name: masking.pruned_channels(replica, unit) for unit in found}
    masking.make_permanent(replica)
    flags = {name: requires_grad[id(p)] for name, p in replica.named_parameters()}

    replica.eval()
    with torch.no_grad():
        expected = replica(*args)
    graph = _dependency_graph(replica, args, type(model).__name__)
    for unit in found:
        idxs = pruned[unit.name].nonzero().flatten().tolist()
        if not idxs:
            continue
        producer = replica.get_submodule(unit.producers[0])
        pruner = graph.get_pruner_of_module(producer)
        graph.get_pruning_group(producer, pruner.prune_out_channels, idxs=idxs).prune()
    with torch.no_grad():
        actual = replica(*args)
    _check_outputs(expected, actual, type(model).__name__)

    for name, parameter in replica.named_parameters():
        parameter.requires_grad_(flags[name])
    for name, module in replica.named_modules():
        module.train(training[name])
    return replica


def _dependency_graph(
    model: nn.Module, args: tuple[Tensor, ...], model_name: str
) -> tp.DependencyGraph:
    def forward(module: nn.Module, inputs: tuple[Tensor, ...]) -> object:
        return module(*inputs)  # the tuple as given, not split into samples

    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, args, forward_fn=forward, verbose=False
            )
    except Exception as error:
        raise ValueError(
            f"torch-pruning could not trace {model_name} on example_inputs, so its pruned "
            f"channels cannot be removed ({type(error).__name__}: {error})"
        ) from error


def _check_outputs(expected: object, actual: object, model_name: str) -> None:
    expected_list = [t for t in tp.utils.flatten_as_list(expected) if isinstance(t, Tensor)]
    actual_list = [t for t in tp.utils.flatten_as_list(actual) if isinstance(t, Tensor)]
    if len(expected_list) != len(actual_list):
        raise ValueError(
            f"compacting {model_name} changed the number of tensors its forward returns"
        )
    for before, after in zip(expected_list, actual_list, strict=True):
        scale = max(1.0, float(before.detach().abs().max())) if before.numel() else 1.0
        if before.shape != after.shape or not torch.allclose(
            before.float(), after.float(), rtol=1e-4, atol=1e-4 * scale
        ):
            raise ValueError(
                f"removing the pruned channels of {model_name} changed its outputs on "
                "example_inputs: a pruned channel feeds a non-zero value to its consumers "
                "(an activation with f(0) != 0 between the masked layer and its consumer, "
                "or a coupling torch-pruning and find_units see differently)"
            )


# --------------------------------------------------------------------------- checkpoints


def save_compact(model: nn.Module, path: str | Path) -> Path:
    """Save a compact model so that :func:`load_compact` rebuilds it from its own class.

    The file holds the state dict, the channel counts of every resizable layer (the
    constructor arguments ``in_channels``, ``out_features``, ``num_features``... that
    torch-pruning changed) and the model's class name; no pickled code, so it loads with
    ``torch.load(weights_only=True)``, and is as large as the compact model's tensors.

    Args:
        model: a compact model, as :func:`compact` returns it (a dense model works too).
        path: the file to write; its folder is created.

    Returns:
        The path written.

    Raises:
        ValueError: if ``model`` is not an ``nn.Module`` or still holds pruning masks
            (save what :func:`compact` returns instead).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; save_compact needs an nn.Module")
    masked = [
        f"{name}.{hook._tensor_name}" if name else hook._tensor_name
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]
    if masked:
        raise ValueError(
            f"{type(model).__name__} still holds pruning masks ({', '.join(masked[:3])}"
            f"{', ...' if len(masked) > 3 else ''}), so it has its full size; save what "
            "compact(model, example_inputs) returns"
        )
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "class": _class_name(model),
        "shapes": {
            name: shape
            for name, module in model.named_modules()
            if (shape := _shape_of(module)) is not None
        },
        # clone(): a tensor that views a larger storage would save all of it.
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_compact(path: str | Path, model: nn.Module) -> nn.Module:
    """Reshape a fresh, dense ``model`` to the channel counts saved in ``path`` and load it.

    ``model`` is an instance of the class that was compacted and saved, built as usual
    (``DigitsCNN()``): the class needs no change. Each layer the checkpoint lists gets the
    saved channel counts and empty tensors of the saved shapes, then the state dict is
    loaded strictly. Everything is checked before anything changes, so a ``ValueError``
    leaves ``model`` as it was.

    Args:
        path: a file written by :func:`save_compact`.
        model: a fresh instance of the saved model's class, with its default (or the
            saved model's original) layer sizes.

    Returns:
        ``model`` itself, now compact, with the saved weights; train/eval mode unchanged.

    Raises:
        ValueError: if ``path`` is not such a file, ``model`` is of another class, its
            state dict has other keys, or a tensor's shape differs in a layer that
            ``load_compact`` cannot resize (only Conv, ConvTranspose, Linear, BatchNorm,
            InstanceNorm, LayerNorm, GroupNorm, PReLU and Embedding layers are resized).

    Example:
        >>> import tempfile
        >>> from lightning_shapley.app.models import DigitsCNN
        >>> net, x = DigitsCNN(channels=(4, 4, 8)).eval(), torch.randn(2, 1, 8, 8)
        >>> unit = units.find_units(net, x)[1]
        >>> masking.prune_channels(net, unit, torch.tensor([True, True, False, False]))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_compact(compact(net, x), Path(folder) / "net.pt")
        ...     fresh = load_compact(path, DigitsCNN(channels=(4, 4, 8))).eval()
        >>> fresh.features[3].out_channels, torch.allclose(fresh(x), net(x), atol=1e-6)
        (2, True)
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; load_compact needs an nn.Module")
    payload = _read_checkpoint(path)
    name = _class_name(model)
    if payload["class"] != name:
        raise ValueError(
            f"{path} holds a {payload['class']}, but model is a {name}; give a fresh "
            "instance of the saved class"
        )
    saved: dict[str, Tensor] = payload["state_dict"]
    shapes: dict[str, dict[str, Any]] = payload["shapes"]
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit this {name}: the model has keys the file lacks "
            f"({missing[:5]}) and the file has keys the model lacks ({unexpected[:5]}); "
            "build the model with the arguments the saved one had before compacting"
        )
    modules = dict(model.named_modules())
    for module_name, attributes in shapes.items():
        shape = _shape_of(modules[module_name]) if module_name in modules else None
        if shape is None or shape.keys() != attributes.keys():
            raise ValueError(
                f"{path} lists {module_name!r} as a layer with {sorted(attributes)}, but this "
                f"{name} has no such layer there"
            )
    for key, value in saved.items():
        module_name = key.rpartition(".")[0]
        if own[key].shape != value.shape and module_name not in shapes:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} in {path} but {tuple(own[key].shape)} "
                f"in the model, and {type(modules[module_name]).__name__} layers cannot be "
                "resized by load_compact"
            )

    for module_name, attributes in shapes.items():
        module = modules[module_name]
        for attribute, value in attributes.items():
            setattr(module, attribute, value)
        prefix = f"{module_name}." if module_name else ""
        for store in (module._parameters, module._buffers):
            for tensor_name, tensor in store.items():
                target = saved.get(prefix + tensor_name)
                if tensor is None or target is None or tensor.shape == target.shape:
                    continue
                empty = torch.empty(target.shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                store[tensor_name] = empty
    model.load_state_dict(saved)
    return model


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        # weights_only: the file holds tensors, numbers and strings, and no code runs on load.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(
            f"{path} is not a compact checkpoint written by save_compact "
            f"({type(error).__name__}: {error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a compact checkpoint written by save_compact (no "
            f"{_CHECKPOINT_FORMAT!r} marker); a plain state dict loads with load_state_dict"
        )
    return payload


def _shape_of(module: nn.Module) -> dict[str, Any] | None:
    """The shape-defining constructor arguments of a layer torch-pruning may resize."""
    for kind, attributes in _SHAPE_ATTRIBUTES:
        if isinstance(module, kind):
            return {attribute: getattr(module, attribute) for attribute in attributes}
    return None


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


# --------------------------------------------------------------------------- int8


def quantize(
    model: nn.Module, calibration_inputs: Sequence[Tensor | Sequence[Tensor]] | None = None
) -> nn.Module:
    """An int8 copy of ``model`` for the CPU; ``model`` itself is left as it was.

    Linear layers are quantized dynamically: int8 weights, activations quantized on the
    fly per batch. With ``calibration_inputs``, every other layer torch supports on the CPU
    (Conv1d/2d/3d with their BatchNorm and ReLU fused in, pooling, adds...) is quantized
    statically too: ``torch.ao.quantization``'s FX graph mode traces the model, observes
    the activation ranges on the calibration batches, and converts, for the quantized
    engine torch runs on (``torch.backends.quantized.engine``: ``x86`` on Intel and AMD).
    Masks are baked into the copy first (``masking.make_permanent``); quantize what
    :func:`compact` returns to get the speed of both.

    ``torch.ao.quantization`` is deprecated in favour of the separate ``torchao`` package
    (torch's warning announces its removal for 2.10), yet still ships and works in 2.13;
    its deprecation warnings are let through.

    Args:
        model: the float model.
        calibration_inputs: batches like those the model will see (a tensor each, or a
            tuple of the forward's tensors), a few hundred samples in all; ``None``
            quantizes the Linear layers alone, which needs neither data nor tracing.

    Returns:
        The quantized copy, in eval mode, on the CPU: an ``nn.Module`` with the original
        structure (dynamic only) or a ``torch.fx.GraphModule`` (static).

    Raises:
        ValueError: if ``model`` is not an ``nn.Module`` or cannot be copied,
            ``calibration_inputs`` is empty or not a sequence of batches, torch has no
            quantized engine on this machine, or ``torch.fx`` cannot trace the model
            (data-dependent control flow): then calibrate nothing and quantize the Linear
            layers alone.
        ImportError: if this torch no longer ships ``torch.ao.quantization``.
    """
    quantization, quantize_fx = _quantization_modules()
    batches = None if calibration_inputs is None else _calibration_batches(calibration_inputs)
    engine = torch.backends.quantized.engine
    if batches is not None and engine not in ("x86", "fbgemm", "onednn", "qnnpack"):
        raise ValueError(
            f"torch's quantized engine is {engine!r} on this machine; static int8 needs x86, "
            f"fbgemm, onednn or qnnpack (available: {torch.backends.quantized.supported_engines})"
        )
    replica = _inference_copy(model, "quantize")
    if batches is None:
        return quantization.quantize_dynamic(replica, {nn.Linear}, dtype=torch.qint8, inplace=True)
    mapping = _qconfig_mapping(quantization, engine)
    try:
        prepared = quantize_fx.prepare_fx(replica, mapping, batches[0])
        with torch.no_grad():
            for args in batches:
                prepared(*args)
        return quantize_fx.convert_fx(prepared)
    except Exception as error:
        raise ValueError(
            f"static int8 quantization of {type(model).__name__} failed: torch.fx must trace "
            f"its forward ({type(error).__name__}: {error}); quantize(model) without "
            "calibration_inputs quantizes its Linear layers alone, with no tracing"
        ) from error


def _quantization_modules() -> tuple[Any, Any]:
    try:
        from torch.ao import quantization
        from torch.ao.quantization import quantize_fx
    except ImportError as error:  # announced for removal; still in torch 2.13
        raise ImportError(
            f"this torch ({torch.__version__}) no longer ships torch.ao.quantization, which "
            "quantize uses; install a torch that has it (2.13 does)"
        ) from error
    return quantization, quantize_fx


def _qconfig_mapping(quantization: Any, engine: str) -> Any:
    """The default static int8 settings of torch for ``engine``, Linear layers dynamic."""
    mapping = quantization.get_default_qconfig_mapping(engine)
    # x86 and fbgemm ask for 7-bit activations (reduce_range=True: the int16 accumulation of
    # CPUs without VNNI would overflow with 8). Stating the same range as quant_min/quant_max
    # keeps the numbers and avoids the warning reduce_range raises once per observer.
    mapping.set_global(_seven_bit(quantization, mapping.global_qconfig))
    for kind, qconfig in list(mapping.object_type_qconfigs.items()):
        mapping.set_object_type(kind, _seven_bit(quantization, qconfig))
    for kind in (nn.Linear, nn.functional.linear):
        mapping.set_object_type(kind, quantization.default_dynamic_qconfig)
    return mapping


def _seven_bit(quantization: Any, qconfig: Any) -> Any:
    # An observer's with_args(...) wraps a functools.partial, kept as ``.p``.
    partial = getattr(getattr(qconfig, "activation", None), "p", None)
    keywords = dict(getattr(partial, "keywords", None) or {})
    if not keywords.pop("reduce_range", False):
        return qconfig
    activation = partial.func.with_args(**keywords, quant_min=0, quant_max=127)
    return quantization.QConfig(activation=activation, weight=qconfig.weight)


def _calibration_batches(
    calibration_inputs: Sequence[Tensor | Sequence[Tensor]],
) -> list[tuple[Tensor, ...]]:
    if isinstance(calibration_inputs, Tensor) or not isinstance(calibration_inputs, list | tuple):
        raise ValueError(
            f"calibration_inputs is a {type(calibration_inputs).__name__}; give a list of "
            "batches (each a Tensor, or a tuple of the forward's Tensors), e.g. [x]"
        )
    if not calibration_inputs:
        raise ValueError(
            "calibration_inputs is empty; give at least one batch, or None to quantize the "
            "Linear layers alone"
        )
    return [_cpu(checked_example_inputs(batch)) for batch in calibration_inputs]


# --------------------------------------------------------------------------- files


def to_torchscript(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor], path: str | Path
) -> Path:
    """Trace a copy of ``model`` in eval mode on the CPU and save it as TorchScript.

    The file loads with ``torch.jit.load`` alone, without the model's Python code; it is
    loaded back and its outputs on ``example_inputs`` checked against the model's. Tracing
    records the operations run on ``example_inputs``: control flow that depends on the
    data is frozen (torch warns), while the batch size stays free for convolutional and
    linear models. ``torch.jit`` is deprecated in torch 2.13 yet works; its warnings are
    let through. Quantized models (:func:`quantize`) trace too.

    Args:
        model: the model (masks are baked into the copy).
        example_inputs: a batch the forward takes, or a tuple of its tensors.
        path: the file to write; its folder is created.

    Returns:
        The path written.

    Raises:
        ValueError: if the model cannot be traced, or the saved file's outputs differ from
            the model's (the file is removed then).
    """
    args = _cpu(checked_example_inputs(example_inputs))
    replica = _inference_copy(model, "to_torchscript")
    if isinstance(replica, lightning.LightningModule):
        # What LightningModule.to_torchscript does: tracing reads every attribute, and the
        # ``trainer`` property raises on a copy no longer attached to a Trainer.
        replica._jit_is_scripting = True
    path = _writable(path)
    with torch.no_grad():
        expected = replica(*args)
        try:
            traced = torch.jit.trace(replica, args)
        except Exception as error:
            raise ValueError(
                f"torch.jit.trace could not trace {type(model).__name__} on example_inputs "
                f"({type(error).__name__}: {error})"
            ) from error
    torch.jit.save(traced, str(path))
    loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        actual = loaded(*args)
    _check_close(expected, actual, f"the TorchScript file {path}", path)
    return path


def to_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | Path,
    check: bool = True,
) -> Path:
    """Export a copy of ``model`` in eval mode on the CPU to one ONNX file.

    torch's ``torch.export``-based exporter (``dynamo=True``, which needs ``onnx`` and
    ``onnxscript``) writes the graph and its weights into a single file. The batch
    dimension of every input is dynamic where the model allows it (``Dim.AUTO``: fixed
    only when the forward's code needs a fixed size). Float models only: torch's exporter
    does not take ``torch.ao`` quantized models.

    Args:
        model: the model (masks are baked into the copy).
        example_inputs: a batch the forward takes, or a tuple of its tensors.
        path: the file to write; its folder is created.
        check: run the file in onnxruntime on ``example_inputs`` and compare its outputs
            with the model's (relative and absolute tolerance 1e-4, the latter scaled by
            the largest output magnitude when above 1).

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: if ``onnx``, ``onnxscript`` or (with ``check``)
            ``onnxruntime`` is missing: ``pip install 'lightning-shapley[export]'``.
        ValueError: if the export fails, or onnxruntime's outputs are not within tolerance:
            the message gives the largest difference, and the file is removed.
    """
    _require_onnx("to_onnx", check)
    args = _cpu(checked_example_inputs(example_inputs))
    replica = _inference_copy(model, "to_onnx")
    path = _writable(path)
    dynamic = tuple({0: torch.export.Dim.AUTO} if arg.ndim else None for arg in args)
    try:
        torch.onnx.export(
            replica,
            args,
            str(path),
            dynamo=True,
            external_data=False,  # one self-contained file
            dynamic_shapes=dynamic,
            verbose=False,
        )
    except Exception as error:
        raise ValueError(
            f"torch.onnx.export could not export {type(model).__name__} "
            f"({type(error).__name__}: {error})"
        ) from error
    if check:
        with torch.no_grad():
            expected = replica(*args)
        _check_close(expected, _OnnxRunner(path)(*args), f"onnxruntime on {path}", path)
    return path


class _OnnxRunner:
    """An ONNX file in onnxruntime on the CPU, called like a module: tensors in and out."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [node.name for node in self.session.get_inputs()]

    def __call__(self, *args: Tensor) -> Tensor | tuple[Tensor, ...]:
        # The exporter keeps the forward's tensor arguments in order; one the graph does not
        # read may be dropped from the end, hence no strict zip.
        feeds = {
            name: arg.detach().cpu().numpy() for name, arg in zip(self.names, args, strict=False)
        }
        outputs = tuple(torch.from_numpy(out) for out in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs


def _require_onnx(caller: str, runtime: bool) -> None:
    needed = ("onnx", "onnxscript", *(("onnxruntime",) if runtime else ()))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"{caller} needs {', '.join(missing)}, which are not installed: {_INSTALL_EXPORT}"
        )


def _check_close(expected: object, actual: object, what: str, path: Path) -> None:
    """Raise if ``actual`` is not ``expected`` within tolerance, removing ``path`` first."""
    problem = _mismatch(expected, actual)
    if problem:
        path.unlink(missing_ok=True)
        raise ValueError(f"{what} {problem} on example_inputs; the file was removed")


def _mismatch(expected: object, actual: object) -> str | None:
    """How ``actual`` departs from ``expected`` beyond tolerance, or ``None``."""
    expected_list = [t for t in tp.utils.flatten_as_list(expected) if isinstance(t, Tensor)]
    actual_list = [t for t in tp.utils.flatten_as_list(actual) if isinstance(t, Tensor)]
    if len(expected_list) != len(actual_list):
        return f"returns {len(actual_list)} tensors where the model returns {len(expected_list)}"
    for before, after in zip(expected_list, actual_list, strict=True):
        if before.shape != after.shape:
            return f"returns shape {tuple(after.shape)} where the model has {tuple(before.shape)}"
        before, after = before.detach().float(), after.detach().float()
        scale = max(1.0, float(before.abs().max())) if before.numel() else 1.0
        if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * scale):
            difference = float((before - after).abs().max())
            return (
                f"differs from the model's outputs by up to {difference:.3g} (tolerance: "
                f"1e-4 relative plus {1e-4 * scale:.3g} absolute)"
            )
    return None


def file_size(path: str | Path) -> int:
    """Size of the file at ``path`` in bytes."""
    return Path(path).stat().st_size


def _writable(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- measurements


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
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
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
            logits = next(t for t in tp.utils.flatten_as_list(out) if isinstance(t, Tensor))
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


def _check_count(name: str, value: object, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name}={value!r} must be an integer of at least {least}")


# --------------------------------------------------------------------------- all at once


@dataclass(frozen=True)
class Artifact:
    """One file :func:`export_artifacts` wrote, with what it costs and scores.

    Attributes:
        format: one of :data:`EXPORT_FORMATS`.
        path: the file.
        parameters: weights and biases of the compact model; the int8 model holds as many,
            most of them one byte instead of four.
        size_bytes: the file's size.
        latency_ms: median milliseconds per forward on ``example_inputs`` on the CPU: the
            model in Python for ``compact`` and ``int8``, the module loaded from the file for
            ``torchscript``, onnxruntime for ``onnx``.
        accuracy: top-1 accuracy on ``batches`` (see :func:`accuracy`); ``None`` without
            them.
    """

    format: str
    path: Path
    parameters: int
    size_bytes: int
    latency_ms: float
    accuracy: float | None = None


def export_artifacts(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    directory: str | Path,
    formats: Sequence[str] = ("compact",),
    batches: Sequence[tuple[Tensor | Sequence[Tensor], Tensor]] | None = None,
) -> list[Artifact]:
    """Compact a masked model and write it in each of ``formats`` into ``directory``.

    The model is compacted once (:func:`compact`, which checks the outputs against the
    masked model's); every format starts from that compact copy, on the CPU:

    - ``"compact"``: ``compact.pt``, the checkpoint of :func:`save_compact`.
    - ``"int8"``: ``compact-int8.torchscript.pt``, :func:`quantize` of the compact model
      (calibrated on the inputs of ``batches`` when given, else Linear layers only),
      saved as TorchScript: torch's int8 modules load from no other file format.
    - ``"torchscript"``: ``compact.torchscript.pt`` (:func:`to_torchscript`).
    - ``"onnx"``: ``compact.onnx`` (:func:`to_onnx`, checked in onnxruntime).

    Each artifact's latency is measured on ``example_inputs``, and its accuracy on
    ``batches`` when given: comparing the ``compact`` and ``int8`` rows reports what
    quantization costs. ``model`` itself is never modified. The arguments are checked
    before anything is written.

    Args:
        model: a model masked by ``masking.py`` (or not pruned at all).
        example_inputs: a batch the forward takes, or a tuple of its tensors; real data
            makes compact's output check meaningful.
        directory: where the files go; created if missing, files of the same names
            overwritten.
        formats: some of :data:`EXPORT_FORMATS`, written in this order.
        batches: ``(inputs, targets)`` pairs of held-out data, for accuracy and int8
            calibration.

    Returns:
        One :class:`Artifact` per format, in the order of ``formats``.

    Raises:
        ValueError: an unknown format or malformed arguments (before anything is written),
            or a step fails (see :func:`compact`, :func:`quantize`, :func:`to_torchscript`
            and :func:`to_onnx`).
        ModuleNotFoundError: ``"onnx"`` asked for without the packages it needs.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; export_artifacts needs an nn.Module")
    chosen = check_formats(formats)
    pairs = None if batches is None else _checked_batches(batches)
    args = checked_example_inputs(example_inputs)
    if "onnx" in chosen:
        _require_onnx("export_artifacts(formats=['onnx'])", runtime=True)
    if "int8" in chosen:
        _quantization_modules()

    # compact() works on a copy on the model's device; everything after it on the CPU.
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
    small = compact(model, tuple(arg.to(device) for arg in args)).cpu().eval()
    cpu_args = _cpu(args)
    cpu_pairs = None if pairs is None else [(_cpu(x), y.cpu()) for x, y in pairs]
    parameters = sum(p.numel() for p in small.parameters())
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    artifacts = []
    for name in chosen:
        path = directory / _FILE_NAMES[name]
        runner: Callable[..., object]
        if name == "compact":
            runner = small
            save_compact(small, path)
        elif name == "int8":
            calibration = None if cpu_pairs is None else [x for x, _ in cpu_pairs]
            runner = quantize(small, calibration)
            to_torchscript(runner, cpu_args, path)
        elif name == "torchscript":
            to_torchscript(small, cpu_args, path)
            runner = torch.jit.load(str(path), map_location="cpu")
        else:
            to_onnx(small, cpu_args, path, check=True)
            runner = _OnnxRunner(path)
        artifacts.append(
            Artifact(
                format=name,
                path=path,
                parameters=parameters,
                size_bytes=file_size(path),
                latency_ms=1e3 * measure_latency(runner, cpu_args),
                accuracy=None if cpu_pairs is None else accuracy(runner, cpu_pairs),
            )
        )
    return artifacts


def check_formats(formats: object, setting: str = "formats") -> tuple[str, ...]:
    """The export formats asked for, checked: a non-empty sequence of :data:`EXPORT_FORMATS`.

    Raises:
        ValueError: naming ``setting``, the bad value and the allowed formats.
    """
    allowed = ", ".join(repr(name) for name in EXPORT_FORMATS)
    if isinstance(formats, str) or not isinstance(formats, Iterable):
        raise ValueError(
            f"{setting}={formats!r} is not a sequence of formats; give a list such as "
            f"[{formats!r}], of {allowed}"
        )
    chosen = list(formats)
    bad = [name for name in chosen if name not in EXPORT_FORMATS]
    if bad:
        raise ValueError(
            f"{setting}: {', '.join(repr(name) for name in bad)} "
            f"{'is not an export format' if len(bad) == 1 else 'are not export formats'}; "
            f"allowed: {allowed}"
        )
    if not chosen:
        raise ValueError(f"{setting} is empty; choose at least one of {allowed}")
    return tuple(dict.fromkeys(chosen))


# --------------------------------------------------------------------------- copies


def _inference_copy(model: nn.Module, caller: str) -> nn.Module:
    """A CPU copy in eval mode, masks baked in, gradients off; ``model`` is not touched."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; {caller} needs an nn.Module")
    # torch.nn.utils.prune keeps each masked weight as a plain attribute computed from
    # parameters; after a forward with gradients it is a non-leaf tensor, which deepcopy
    # refuses. The copy gets a detached clone (make_permanent recomputes it anyway).
    memo = {
        id(value): value.detach().clone()
        for module in model.modules()
        for value in (*vars(module).values(), *module._buffers.values())
        if isinstance(value, Tensor) and value.grad_fn is not None
    }
    try:
        replica = copy.deepcopy(model, memo)
    except Exception as error:
        raise ValueError(
            f"{caller} works on a deep copy of {type(model).__name__}, and copying it failed "
            f"({type(error).__name__}: {error})"
        ) from error
    masking.make_permanent(replica)
    return replica.cpu().eval().requires_grad_(False)


def _cpu(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(arg.detach().cpu() for arg in args)
