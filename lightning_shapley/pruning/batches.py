"""The data a pruning step runs on: scoring batches and training inputs, from loaders.

A loader's batch is whatever the user's ``LightningModule`` takes; ``batch_transform``
turns it into ``(inputs, targets)`` (by default :func:`inputs_and_targets`). The inputs
are what the model's forward is called with: a tensor, or positional and keyword
arguments (see :func:`~lightning_shapley.model_io.as_model_inputs`). A batch that cannot
be read so is refused with the index of the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import lightning
import torch
from torch import Tensor

from lightning_shapley.model_io import Inputs, as_model_inputs
from lightning_shapley.pruning.distributed import is_sharded, shard
from lightning_shapley.shapley.values import Batch

#: Turns a loader's batch into ``(inputs, targets)``.
BatchTransform = Callable[[Any], tuple[Any, Tensor]]


#: The keys a mapping batch may hold its targets under, in the order they are looked for.
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def inputs_and_targets(batch: Any) -> tuple[Any, Tensor]:
    """The default ``batch_transform``.

    A mapping (a Hugging Face batch) gives its targets under the first of
    :data:`TARGET_KEYS` it has, and every other entry as a keyword argument of the
    model's forward; any other batch gives ``(batch[0], batch[1])``.

    Example:
        >>> batch = {"input_ids": torch.ones(2, 5), "labels": torch.tensor([0, 1])}
        >>> inputs, targets = inputs_and_targets(batch)
        >>> sorted(inputs), targets.tolist()
        (['input_ids'], [0, 1])
    """
    if isinstance(batch, Mapping):
        key = next((key for key in TARGET_KEYS if key in batch), None)
        if key is None:
            raise KeyError(f"the batch is a mapping with no targets under any of {TARGET_KEYS}")
        return {name: value for name, value in batch.items() if name != key}, batch[key]
    return batch[0], batch[1]


def loader_given_to_fit(trainer: lightning.Trainer, name: str) -> Iterable[Any]:
    """The ``name`` (``"val"`` or ``"train"``) loader that fit was given, else the training one.

    Lightning keeps what ``fit`` was given (loaders, a datamodule, or the module's own
    ``*_dataloader`` methods) as a source per loop. A loader asked for here, not through
    the trainer, has no distributed sampler and gives every process the same batches to
    share out. Of several loaders, the first.

    Raises:
        ValueError: fit was given neither.
    """
    # At setup the trainer has built no loader yet, and Lightning offers no public view
    # of what fit was given; the loops' data sources (Lightning 2.x) are that view.
    sources = {
        "val": trainer.fit_loop.epoch_loop.val_loop._data_source,
        "train": trainer.fit_loop._data_source,
    }
    for source in (sources[name], sources["train"]):
        loader = source.dataloader() if source.is_defined() else None
        if isinstance(loader, Mapping) and loader:
            loader = next(iter(loader.values()))
        if isinstance(loader, list | tuple) and loader:
            loader = loader[0]
        if loader is not None:
            return loader
    raise ValueError(
        f"score_dataloader is None and fit was given no {name} or training loader to score "
        "on; pass score_dataloader="
    )


def scoring_batches(
    loader: Iterable[Any], transform: BatchTransform, count: int, world_size: int, rank: int
) -> list[Batch]:
    """This process's ``count`` scoring batches, unpacked and checked.

    A loader without a distributed sampler gives every process the same batches, so
    ``count * world_size`` are taken and shared out (:func:`~.distributed.shard`).

    Raises:
        ValueError: a batch ``transform`` cannot unpack into two tensors, or no batch.
    """
    shards = 1 if is_sharded(loader) else world_size
    batches = []
    for index, batch in enumerate(islice(loader, count * shards)):
        try:
            inputs, targets = transform(batch)
            inputs = as_model_inputs(inputs)
        except (TypeError, IndexError, KeyError, ValueError) as error:
            raise ValueError(
                f"scoring batch {index} (a {type(batch).__name__}) cannot be unpacked into "
                f"(inputs, targets): {error}; pass batch_transform= to say how"
            ) from error
        if not isinstance(targets, Tensor):
            raise ValueError(
                f"scoring batch {index} unpacked into targets of type "
                f"{type(targets).__name__}; targets must be a tensor"
            )
        batches.append((inputs, targets))
    if not batches:
        raise ValueError("the scoring loader gave no batches; it must give at least one")
    return shard(batches, shards, rank)


def recalibration_inputs(
    loader: Iterable[Any] | None, transform: BatchTransform, count: int, device: torch.device
) -> list[Inputs]:
    """The inputs of the first ``count`` training batches, on ``device``.

    Raises:
        ValueError: there is no training loader to take them from.
    """
    if loader is None:
        raise ValueError(
            f"recalibrate={count} needs the trainer's training loader, and it has none; "
            "pass recalibrate=0 to keep the BatchNorm statistics as they are"
        )
    return [as_model_inputs(transform(batch)[0]).to(device) for batch in islice(loader, count)]


def to_device(batches: list[Batch], device: torch.device) -> list[Batch]:
    """``batches`` moved to ``device``."""
    return [(x.to(device), y.to(device)) for x, y in batches]
