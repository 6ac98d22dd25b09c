"""Deployment: a physically smaller model with the pruned channels removed, and its artifacts.

A masked model (see :mod:`~lightning_shapley.pruning.masking`) still computes every
channel; its pruned channels are merely exactly zero after their last coupled layer.
:func:`compact` removes them: the producers lose those output channels, the BatchNorms
those features, and the consumers the matching input channels (or input features, behind
a ``Flatten``). torch-pruning's dependency graph does the surgery, so residual partners
shrink together.

From the compact model, everything a deployment needs, all for the CPU, one module each:

- :mod:`~lightning_shapley.export.compaction`: :func:`compact`, the torch-pruning surgery and
  the check that the outputs did not change.
- :mod:`~lightning_shapley.export.checkpoints`: :func:`save_compact` /
  :func:`load_compact`, a checkpoint of the compact model that reloads into a fresh
  instance of the model's own, unmodified class.
- :mod:`~lightning_shapley.export.formats`: :func:`quantize` (int8 weights, dynamic for
  Linear layers and static, calibrated, for convolutions), :func:`to_torchscript` and
  :func:`to_onnx` (files that run without the model's Python code, their outputs checked
  against the model's).
- :mod:`~lightning_shapley.export.measure`: :func:`measure_latency`, :func:`file_size`,
  :func:`accuracy`: what the artifacts cost and what they score.
- :mod:`~lightning_shapley.export.artifacts`: :func:`export_artifacts`, all of the above in
  one call, as :class:`Artifact` records; :func:`artifact_metrics`, those records as logger
  metrics; :func:`masked_size_bytes`, the size of the masked model they are compared with.

Two of the torch APIs used here are deprecated in torch 2.13 without a replacement inside
torch itself, and still work: ``torch.ao.quantization`` (its successor is the separate
``torchao`` package) and ``torch.jit`` (TorchScript, which the issue asks for by name).
Their deprecation warnings are let through, not silenced.
"""

from lightning_shapley.export.artifacts import (
    EXPORT_FORMATS,
    Artifact,
    artifact_metrics,
    check_formats,
    export_artifacts,
    masked_size_bytes,
)
from lightning_shapley.export.checkpoints import load_compact, save_compact
from lightning_shapley.export.compaction import compact
from lightning_shapley.export.formats import quantize, to_onnx, to_torchscript
from lightning_shapley.export.measure import accuracy, file_size, measure_latency

__all__ = [
    "EXPORT_FORMATS",
    "Artifact",
    "accuracy",
    "artifact_metrics",
    "check_formats",
    "compact",
    "export_artifacts",
    "file_size",
    "load_compact",
    "masked_size_bytes",
    "measure_latency",
    "quantize",
    "save_compact",
    "to_onnx",
    "to_torchscript",
]
