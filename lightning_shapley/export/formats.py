"""Files and int8: what a deployment runs without the model's Python code, or faster.

- :func:`quantize`: int8 weights, dynamic for Linear layers and static (calibrated) for
  convolutions, through ``torch.ao.quantization``.
- :func:`to_torchscript` and :func:`to_onnx`: files that run without the model's Python
  code, loaded back (TorchScript) or run in onnxruntime (ONNX) and their outputs checked
  against the model's; a file that fails the check is removed.

Each works on a CPU copy of the model in eval mode with the masks baked in, so quantize or
export what :func:`~lightning_shapley.export.compaction.compact` returns to get a smaller
model too. Two of the torch APIs used here are deprecated in torch 2.13 without a
replacement inside torch itself, and still work: ``torch.ao.quantization`` (its successor
is the separate ``torchao`` package) and ``torch.jit`` (TorchScript, which the issue asks
for by name). Their deprecation warnings are let through, not silenced.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from lightning_shapley.export._outputs import mismatch
from lightning_shapley.pruning import masking
from lightning_shapley.pruning.units import checked_example_inputs

_INSTALL_EXPORT = "pip install 'lightning-shapley[export]'"


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
    :func:`~lightning_shapley.export.compaction.compact` returns to get the speed of both.

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
    problem = mismatch(expected, actual)
    if problem:
        path.unlink(missing_ok=True)
        raise ValueError(f"{what} {problem} on example_inputs; the file was removed")


def _inference_copy(model: nn.Module, caller: str) -> nn.Module:
    """A CPU copy in eval mode, masks baked in, gradients off; ``model`` is not touched."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model is a {type(model).__name__}; {caller} needs an nn.Module")
    try:
        replica = masking.copy_model(model)
    except Exception as error:
        raise ValueError(
            f"{caller} works on a deep copy of {type(model).__name__}, and copying it failed "
            f"({type(error).__name__}: {error})"
        ) from error
    masking.make_permanent(replica)
    return replica.cpu().eval().requires_grad_(False)


def _cpu(args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(arg.detach().cpu() for arg in args)


def _writable(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
