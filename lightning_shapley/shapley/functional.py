"""``shapley_values``: the values of one layer's (or one unit's) channels, no trainer needed."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_shapley.shapley.estimators import ShapleyEstimate
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.registry import Estimator, resolve_estimator
from lightning_shapley.shapley.values import Batch, ValueSetting
from lightning_shapley.shapley.weighting import Weighting, resolve_weighting


def shapley_values(
    model: nn.Module,
    layer: str | Sequence[str],
    batches: Sequence[Batch],
    *,
    value: ValueSetting = "loss",
    weighting: str | Weighting = "shapley",
    depth: int | None = None,
    method: str = "surrogate",
    channel_dim: int = 1,
    pruned: Tensor | None = None,
    engine: str = "auto",
    **estimator_options: object,
) -> ShapleyEstimate:
    """Estimate the value of each output channel of ``layer`` on the scoring ``batches``.

    Every setting is checked before the model runs.

    Args:
        model: the model; it is left exactly as found.
        layer: qualified name of the module whose output channels are valued, or the
            names of several modules whose outputs are one and the same set of channels
            (a unit's producers and BatchNorms): each channel is zeroed at all of them.
        batches: list of ``(inputs, targets)`` scoring batches.
        value: ``"loss"``, ``"accuracy"``, a torchmetrics ``Metric`` or ``fn(logits, targets)``.
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS`
            (``"shapley"`` is the classic value) or a :class:`Weighting`.
        depth: the band's depth ``r``, with ``weighting="band"``.
        method: a name of :data:`~lightning_shapley.shapley.registry.ESTIMATORS`.
        channel_dim: the channel dimension of the layers' outputs.
        pruned: boolean ``[C]`` of channels already pruned (kept out of every coalition).
        engine: how coalitions are evaluated, see
            :class:`~lightning_shapley.shapley.game.ChannelGame`.
        **estimator_options: passed to the estimator, e.g. ``num_permutations``,
            ``max_evaluations``, ``seed``, ``truncation``, ``bottom_k``, ``tolerance``.

    Returns:
        The estimate over all ``C`` channels of the layer; channels already pruned have
        value and standard error NaN and no samples.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> est = shapley_values(model, "0", batches, method="exact")
        >>> est.values.shape, est.evaluations
        (torch.Size([6]), 64)
    """
    estimator = resolve_estimator(method, estimator_options)
    weighting = resolve_weighting(weighting, depth)
    game = ChannelGame(
        model, layer, batches, value=value, channel_dim=channel_dim, pruned=pruned, engine=engine
    )
    return estimate_channels(game, weighting, estimator)


def estimate_channels(
    game: ChannelGame, weighting: Weighting, estimator: Estimator
) -> ShapleyEstimate:
    """The estimate of a game's players, spread over all the layer's channels.

    Channels that are not players (already pruned) get value and standard error NaN and
    no samples.
    """
    estimate = estimator(game, game.n_players, weighting)
    values = torch.full((game.n_channels,), math.nan, dtype=torch.float64)
    stderr = values.clone()
    samples = torch.zeros(game.n_channels, dtype=torch.long)
    values[game.players] = estimate.values
    stderr[game.players] = estimate.stderr
    samples[game.players] = estimate.samples
    return ShapleyEstimate(values, stderr, estimate.evaluations, estimate.seconds, samples)
