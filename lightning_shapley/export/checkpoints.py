"""Checkpoints of a compact model that reload into its own, unmodified class.

:func:`~lightning_shapley.export.compaction.compact` changes the channel counts of a model's
layers, so its state dict no longer fits a fresh instance of the class. :func:`save_compact`
writes the state dict together with each resizable layer's channel counts;
:func:`load_compact` resizes a fresh instance to them and loads the weights. The file holds
tensors, numbers and strings only: no pickled code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_shapley.checks import is_int
from lightning_shapley.layers import LAYER_KINDS

# Marks a save_compact file; the number changes if its layout does (2: tensor digests).
_CHECKPOINT_FORMAT = "lightning_shapley.compact/2"
# The constructor arguments that fix the shapes of each layer kind torch-pruning resizes:
# the layer-kind table's, then those torch-pruning resizes outside any unit of ours.
_SHAPE_ATTRIBUTES: tuple[tuple[tuple[type[nn.Module], ...], tuple[str, ...]], ...] = (
    *((kind.types, kind.shape_attributes) for kind in LAYER_KINDS),
    ((nn.modules.conv._ConvNd,), ("in_channels", "out_channels", "groups")),  # transposed
    ((nn.modules.batchnorm._NormBase,), ("num_features",)),  # InstanceNorm
    ((nn.LayerNorm,), ("normalized_shape",)),
    ((nn.GroupNorm,), ("num_channels",)),
    ((nn.PReLU,), ("num_parameters",)),
    ((nn.Embedding,), ("num_embeddings", "embedding_dim")),
)


def save_compact(model: nn.Module, path: str | Path) -> Path:
    """Save a compact model so that :func:`load_compact` rebuilds it from its own class.

    The file holds the state dict, the channel counts of every resizable layer (the
    constructor arguments ``in_channels``, ``out_features``, ``num_features``... that
    torch-pruning changed), the model's class name and a SHA-256 digest of every tensor;
    no pickled code, so it loads with ``torch.load(weights_only=True)``, and is as large
    as the compact model's tensors.

    Args:
        model: a compact model, as :func:`~lightning_shapley.export.compaction.compact`
            returns it (a dense model works too).
        path: the file to write; its folder is created.

    Returns:
        The path written.

    Raises:
        ValueError: if ``model`` is not an ``nn.Module`` or still holds pruning masks
            (save what :func:`~lightning_shapley.export.compaction.compact` returns instead).
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
    # The digests let load_compact tell a damaged file from a good one.
    payload["digests"] = {key: _digest(value) for key, value in payload["state_dict"].items()}
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
        ValueError: if ``path`` is not such a file or is damaged (a tensor that does not
            match its digest, a shape field that is not a channel count), ``model`` is of
            another class, its
            state dict has other keys, or a tensor's shape differs in a layer that
            ``load_compact`` cannot resize (only Conv, ConvTranspose, Linear, BatchNorm,
            InstanceNorm, LayerNorm, GroupNorm, PReLU and Embedding layers are resized).

    Example:
        >>> import tempfile
        >>> from lightning_shapley.app.models import DigitsCNN
        >>> from lightning_shapley.export import compact
        >>> from lightning_shapley.pruning import masking, units
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
    _check_integrity(path, saved, shapes, payload["digests"])
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


def _digest(tensor: Tensor) -> str:
    """The SHA-256 of a tensor's dtype, shape and bytes."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    header = f"{tensor.dtype}{tuple(tensor.shape)}".encode()
    return hashlib.sha256(header + data).hexdigest()


def _check_integrity(
    path: str | Path,
    saved: dict[str, Tensor],
    shapes: dict[str, dict[str, Any]],
    digests: object,
) -> None:
    """Raises a ``ValueError`` if a tensor or a shape field is not what save_compact wrote."""
    damaged = f"{path} is damaged"
    if not isinstance(digests, dict) or digests.keys() != saved.keys():
        raise ValueError(f"{damaged}: its digests do not list exactly its tensors")
    for key, tensor in saved.items():
        if not isinstance(tensor, Tensor) or digests[key] != _digest(tensor):
            raise ValueError(
                f"{damaged}: the tensor {key!r} does not match its digest (the file changed "
                "after save_compact wrote it)"
            )
    if not isinstance(shapes, dict) or not all(isinstance(a, dict) for a in shapes.values()):
        raise ValueError(f"{damaged}: its shape fields are not a table of layers")
    for module_name, attributes in shapes.items():
        for attribute, value in attributes.items():
            counts = value if isinstance(value, list | tuple) else (value,)
            if not counts or not all(is_int(count) and count >= 1 for count in counts):
                raise ValueError(
                    f"{damaged}: {module_name}.{attribute}={value!r} is not a channel count "
                    "(a positive integer)"
                )


def _shape_of(module: nn.Module) -> dict[str, Any] | None:
    """The shape-defining constructor arguments of a layer torch-pruning may resize."""
    for kind, attributes in _SHAPE_ATTRIBUTES:
        if isinstance(module, kind):
            return {attribute: getattr(module, attribute) for attribute in attributes}
    return None


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"
