"""Every deployment file of a masked model in one call, and the numbers to log about them.

:func:`export_artifacts` compacts a masked model once and writes it in each format asked
for (:data:`EXPORT_FORMATS`), each file an :class:`Artifact` with its size, latency and
accuracy; :func:`artifact_metrics` turns those into the metrics a logger takes, and
:func:`masked_size_bytes` weighs the masked model they are compared with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_shapley.export.checkpoints import save_compact
from lightning_shapley.export.compaction import compact
from lightning_shapley.export.formats import (
    _cpu,
    _OnnxRunner,
    _quantization_modules,
    _require_onnx,
    quantize,
    to_onnx,
    to_torchscript,
)
from lightning_shapley.export.measure import _checked_batches, accuracy, file_size, measure_latency
from lightning_shapley.pruning.units import checked_example_inputs

#: What :func:`export_artifacts` can write: the compact checkpoint
#: (:func:`~lightning_shapley.export.checkpoints.save_compact`), its int8 version
#: (:func:`~lightning_shapley.export.formats.quantize`, saved as TorchScript), TorchScript
#: and ONNX.
EXPORT_FORMATS = ("compact", "int8", "torchscript", "onnx")

# The file each format is written to, inside export_artifacts' directory.
_FILE_NAMES = {
    "compact": "compact.pt",
    "int8": "compact-int8.torchscript.pt",
    "torchscript": "compact.torchscript.pt",
    "onnx": "compact.onnx",
}


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
        accuracy: top-1 accuracy on ``batches`` (see
            :func:`~lightning_shapley.export.measure.accuracy`); ``None`` without them.
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

    The model is compacted once (:func:`~lightning_shapley.export.compaction.compact`, which
    checks the outputs against the masked model's); every format starts from that compact
    copy, on the CPU:

    - ``"compact"``: ``compact.pt``, the checkpoint of
      :func:`~lightning_shapley.export.checkpoints.save_compact`.
    - ``"int8"``: ``compact-int8.torchscript.pt``,
      :func:`~lightning_shapley.export.formats.quantize` of the compact model (calibrated
      on the inputs of ``batches`` when given, else Linear layers only), saved as
      TorchScript: torch's int8 modules load from no other file format.
    - ``"torchscript"``: ``compact.torchscript.pt``
      (:func:`~lightning_shapley.export.formats.to_torchscript`).
    - ``"onnx"``: ``compact.onnx`` (:func:`~lightning_shapley.export.formats.to_onnx`,
      checked in onnxruntime).

    Each artifact's latency is measured on ``example_inputs``, and its accuracy on
    ``batches`` when given: comparing the ``compact`` and ``int8`` rows reports what
    quantization costs. ``model`` itself is never modified. The arguments are checked
    before anything is written.

    Args:
        model: a model masked by :mod:`~lightning_shapley.pruning.masking` (or not pruned
            at all).
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
            or a step fails (see the functions named above).
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


def artifact_metrics(artifacts: Iterable[Artifact]) -> dict[str, float]:
    """The numbers of each artifact as logger metrics, ``export/<format>/<number>``.

    Args:
        artifacts: what :func:`export_artifacts` returned.

    Returns:
        ``size_bytes``, ``latency_ms``, ``parameters`` and ``accuracy`` of each artifact,
        as floats; an accuracy of ``None`` (no ``batches`` given) is left out.

    Example:
        >>> artifact = Artifact("onnx", Path("compact.onnx"), 1200, 5000, 0.25)
        >>> artifact_metrics([artifact])  # doctest: +NORMALIZE_WHITESPACE
        {'export/onnx/size_bytes': 5000.0, 'export/onnx/latency_ms': 0.25,
         'export/onnx/parameters': 1200.0}
    """
    metrics = {}
    for artifact in artifacts:
        numbers = {
            "size_bytes": artifact.size_bytes,
            "latency_ms": artifact.latency_ms,
            "parameters": artifact.parameters,
            "accuracy": artifact.accuracy,
        }
        metrics |= {
            f"export/{artifact.format}/{key}": float(number)
            for key, number in numbers.items()
            if number is not None
        }
    return metrics


def masked_size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict tensors, leaving out the ``*_mask`` buffers.

    What a masked model weighs with the dense shapes, to set beside the artifacts' sizes:
    its masked parameters count once (as ``<p>_orig``), their masks not at all.

    Example:
        >>> from torch.nn.utils import prune
        >>> net = nn.Linear(4, 2)  # 8 weights and 2 biases, float32
        >>> masked_size_bytes(net)
        40
        >>> _ = prune.random_unstructured(net, "weight", amount=0.5)
        >>> masked_size_bytes(net), sorted(net.state_dict())
        (40, ['bias', 'weight_mask', 'weight_orig'])
    """
    return sum(
        tensor.numel() * tensor.element_size()
        for name, tensor in model.state_dict().items()
        if not name.endswith("_mask")
    )
