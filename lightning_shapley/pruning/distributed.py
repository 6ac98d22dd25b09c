"""A pruning step under DDP: the reductions that make every process prune the same channels.

Every process scores on its own share of the scoring batches, with the same random
permutations. The scores and measurements are averaged over the processes, weighted by
their samples; the plan is rank zero's, broadcast; the re-estimated BatchNorm statistics
are averaged. With one process every function here returns its input unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from lightning_shapley.pruning.recalibration import statistic_buffers
from lightning_shapley.pruning.scorers import ChannelScores
from lightning_shapley.shapley.values import Batch, Evaluation, ValueFunction, evaluate


def is_sharded(loader: Iterable[Any]) -> bool:
    """Whether a loader gives each process its own part of the data already."""
    return isinstance(getattr(loader, "sampler", None), DistributedSampler)


def shard(batches: list[Batch], shards: int, rank: int) -> list[Batch]:
    """This process's share: every ``shards``-th batch, the same number on every process."""
    if shards == 1:
        return batches
    per_process = len(batches) // shards
    if per_process == 0:
        rank_zero_warn(
            f"the scoring loader gave {len(batches)} batches for {shards} processes; every "
            "process scores on all of them (give the loader more batches to share them out)"
        )
        return batches
    return batches[rank::shards][:per_process]


def samples(batches: list[Batch]) -> int:
    """The number of scoring samples in ``batches``."""
    return sum(len(targets) for _, targets in batches)


def sum_over_ranks(trainer: lightning.Trainer, tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes, on the CPU (itself with one process)."""
    if trainer.world_size == 1:
        return tensor
    device = trainer.strategy.root_device
    return trainer.strategy.reduce(tensor.to(device), reduce_op="sum").cpu()


def weighted_mean_over_ranks(trainer: lightning.Trainer, local: Tensor, weight: int) -> Tensor:
    """The mean of ``local`` over the processes, each weighted by ``weight``."""
    if trainer.world_size == 1:
        return local
    weighted = torch.cat([local * weight, torch.tensor([weight], dtype=local.dtype)])
    totals = sum_over_ranks(trainer, weighted)
    return totals[:-1] / totals[-1]


def max_over_ranks(trainer: lightning.Trainer, number: float) -> float:
    """The largest ``number`` of any process."""
    if trainer.world_size == 1:
        return number
    tensor = torch.tensor(number, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="max"))


def evaluate_over_ranks(
    trainer: lightning.Trainer, model: nn.Module, batches: list[Batch], value: ValueFunction
) -> Evaluation:
    """:func:`~lightning_shapley.shapley.values.evaluate` on the batches of all processes.

    A weighted mean over the processes: the same numbers, so the same decisions, on each.
    """
    measured = evaluate(model, batches, value)
    local = torch.tensor([measured.value, measured.accuracy, measured.loss], dtype=torch.float64)
    value_, accuracy, loss = weighted_mean_over_ranks(trainer, local, samples(batches)).tolist()
    return Evaluation(value_, accuracy, loss)


def mean_scores_over_ranks(
    trainer: lightning.Trainer, scores: dict[str, ChannelScores], weight: int
) -> dict[str, ChannelScores]:
    """Each channel's score averaged over the processes, weighted by their scoring samples.

    The processes score the same channels with the same permutations on different batches,
    so their sampling errors are nearly perfectly correlated: the standard error of the
    mean is taken as the weighted mean of the standard errors, the bound for fully
    correlated errors. (``sqrt(sum of variances) / world_size`` assumes independent errors;
    on the digits CNN, with two halves of the scoring data and shared seeds, it understated
    the spread of the mean over 20 seeds by a factor of about 1.45, while the mean of the
    standard errors matched it within 6%.) Pruned channels, NaN on every process, stay
    NaN and add nothing to the others; evaluations add up.
    """
    if trainer.world_size == 1:
        return scores
    names = list(scores)
    values = torch.cat([scores[name].values for name in names])
    stderr = torch.cat([scores[name].stderr for name in names])
    in_play = ~values.isnan()
    local = torch.stack(
        [in_play.double(), torch.where(in_play, values, 0.0), torch.where(in_play, stderr, 0.0)]
    )
    weights, value_sums, stderr_sums = sum_over_ranks(trainer, local * weight)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    mean_values = torch.where(weights > 0, value_sums / weights, nan)
    mean_stderr = torch.where(weights > 0, stderr_sums / weights, nan)
    evaluations = torch.tensor([scores[name].evaluations for name in names])
    evaluations = sum_over_ranks(trainer, evaluations).tolist()
    sizes = [len(scores[name].values) for name in names]
    return {
        name: ChannelScores(v, e, n, scores[name].seconds)
        for name, v, e, n in zip(
            names, mean_values.split(sizes), mean_stderr.split(sizes), evaluations, strict=True
        )
    }


def mean_statistics_over_ranks(trainer: lightning.Trainer, model: nn.Module) -> None:
    """Averages the re-estimated BatchNorm statistics over the processes, so they agree."""
    if trainer.world_size == 1:
        return
    for buffer in statistic_buffers(model):
        buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))


def from_rank_zero(trainer: lightning.Trainer, plan: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rank zero's plan, on every process."""
    if trainer.world_size == 1:
        return plan
    agreed = trainer.strategy.broadcast({name: p.tolist() for name, p in plan.items()}, src=0)
    return {name: torch.tensor(agreed[name], dtype=torch.bool) for name in plan}
