"""Coalition curves: the value of random coalitions of a unit's channels, by coalition size.

A curve shows how the model's value grows as channels join: flat where channels are
redundant, steep where each one counts. :func:`coalition_values_by_size` measures one
on a :class:`~lightning_shapley.shapley.game.ChannelGame`;
:func:`~lightning_shapley.reporting.figures.coalition_size_figure` draws them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_shapley.checks import is_int
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.values import Batch, ValueFunction, ValueSetting

#: Most coalition sizes on a coalition curve's grid (all sizes for small units).
MAX_SIZES = 17


@dataclass(frozen=True)
class CoalitionCurve:
    """Values of random coalitions of a layer's channels, by coalition size.

    Attributes:
        n_players: the channels in play (all of the layer's, on a dense model).
        sizes: the coalition sizes, ascending, from 0 to ``n_players``.
        values: float64 ``[len(sizes), samples]``; sample ``j`` of every size comes from
            one random ordering of the channels (its first ``k``), so each column is the
            path of one permutation from the empty coalition to the full one.
    """

    n_players: int
    sizes: tuple[int, ...]
    values: Tensor

    @property
    def mean(self) -> Tensor:
        """The mean value at each size."""
        return self.values.mean(1)

    @property
    def std(self) -> Tensor:
        """The standard deviation over the samples at each size (0 with one sample)."""
        return self.values.std(1, correction=0)


def coalition_values_by_size(
    model: nn.Module,
    layer: str | Sequence[str],
    batches: Sequence[Batch],
    value: ValueSetting | ValueFunction = "loss",
    sizes: Sequence[int] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> CoalitionCurve:
    """The values of random coalitions of a layer's channels, for a grid of sizes.

    Sample ``j`` draws one random ordering of the channels and takes its first ``k``
    channels for every size ``k``, so the coalitions of one sample are nested. All are
    evaluated in one call of a :class:`~lightning_shapley.shapley.game.ChannelGame`.

    Args:
        model: the model; it is left as found.
        layer: the module whose output channels are the players, or the names of all the
            modules producing and normalizing them (a unit's producers and BatchNorms).
        batches: the scoring batches, ``(inputs, targets)`` pairs.
        value: the coalition value, a setting or a resolved
            :class:`~lightning_shapley.shapley.values.ValueFunction`, as
            :class:`~lightning_shapley.shapley.game.ChannelGame` takes it.
        sizes: coalition sizes to evaluate; ``None`` for an even grid of at most
            :data:`MAX_SIZES` sizes from 0 to the number of players, both included.
        samples: random coalitions per size.
        seed: seed of the random orderings.

    Returns:
        The values, as a :class:`CoalitionCurve`.

    Raises:
        ValueError: ``samples`` is not a positive integer, or a size lies outside
            0 to the number of players.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> curve = coalition_values_by_size(net, "0", data, samples=4)
        >>> curve.sizes, tuple(curve.values.shape)
        ((0, 1, 2, 3, 4, 5, 6), (7, 4))
    """
    if not is_int(samples) or samples < 1:
        raise ValueError(f"samples={samples!r} is not allowed; it must be a positive integer")
    game = ChannelGame(model, layer, batches, value=value)
    n = game.n_players
    if sizes is None:
        grid = torch.linspace(0, n, min(n + 1, MAX_SIZES), dtype=torch.float64)
        sizes = sorted({int(k) for k in grid.round().tolist()})
    else:
        sizes = sorted({int(k) for k in sizes})
        if sizes[0] < 0 or sizes[-1] > n:
            raise ValueError(f"sizes={sizes} must lie between 0 and the {n} players")
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(samples)])
    # rank[j, c]: where channel c comes in ordering j; it is in the size-k coalition if < k.
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(samples, n))
    size_column = torch.tensor(sizes).view(-1, 1, 1)
    coalitions = rank.unsqueeze(0) < size_column  # [len(sizes), samples, n]
    values = game(coalitions.reshape(-1, n)).reshape(len(sizes), samples)
    return CoalitionCurve(n, tuple(sizes), values)
