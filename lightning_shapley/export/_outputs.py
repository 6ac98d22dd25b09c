"""Comparing what two models return, for the checks of compact and of the exported files.

:func:`~lightning_shapley.export.compaction.compact` checks the compacted copy against the
masked model, :func:`~lightning_shapley.export.to_torchscript` and
:func:`~lightning_shapley.export.to_onnx` check the saved file against the model: all with
the one tolerance below, so a model that passes one check does not fail another by a hair.
"""

from __future__ import annotations

import torch

from lightning_shapley.model_io import output_tensors


def mismatch(expected: object, actual: object) -> str | None:
    """How ``actual`` departs from ``expected`` beyond tolerance, or ``None``.

    The tolerance is 1e-4 relative plus 1e-4 absolute, the latter scaled by the largest
    magnitude of the expected tensor when above 1: float32 rounding grows with the logits.

    Returns:
        A phrase with the model's outputs as its object (``"differs from the model's
        outputs by up to ..."``), ready to follow the name of what was checked.

    Example:
        >>> mismatch(torch.ones(2), torch.ones(2) + 1e-6) is None
        True
        >>> mismatch(torch.ones(2), torch.ones(3))
        'returns shape (3,) where the model has (2,)'
    """
    expected_list, actual_list = output_tensors(expected), output_tensors(actual)
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
