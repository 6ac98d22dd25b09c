"""The sampling core of the estimators: removal walks, their rounds, and a memoized game.

Every sampling estimator walks *removal orders* from the full set, evaluating the
coalitions the weighting gives weight to; :func:`sample_pairs` runs antithetic pairs of
walks in blocks and gathers each player's round estimates in :class:`RoundStatistics`.
:class:`MemoizedValue` evaluates each distinct coalition once and checks the answers.
Nothing here knows of models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

ValueFunction = Callable[[Tensor], Tensor]


class MemoizedValue:
    """Calls the value function once per distinct coalition and checks its answers."""

    def __init__(self, value_fn: ValueFunction, n_players: int) -> None:
        self._value_fn = value_fn
        self._n_players = n_players
        self._cache: dict[bytes, float] = {}

    @property
    def evaluations(self) -> int:
        """Distinct coalitions evaluated so far."""
        return len(self._cache)

    def __call__(self, coalitions: Tensor) -> Tensor:
        """Values (float64 ``[m]``) of boolean ``[m, n]`` coalitions, each evaluated once."""
        coalitions = coalitions.to(torch.bool).reshape(-1, self._n_players)
        keys = [row.tobytes() for row in np.packbits(coalitions.numpy(), axis=1)]
        missing: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            if key not in self._cache and key not in missing:
                missing[key] = row
        if missing:
            asked = coalitions[list(missing.values())]
            answers = _checked_values(self._value_fn(asked), asked)
            self._cache.update(zip(missing, answers.tolist(), strict=True))
        return torch.tensor([self._cache[key] for key in keys], dtype=torch.float64)


def _checked_values(values: Tensor | np.ndarray, coalitions: Tensor) -> Tensor:
    values = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if values.shape != (len(coalitions),):
        raise ValueError(
            f"the value function returned shape {tuple(values.shape)} for {len(coalitions)} "
            f"coalitions; it must return one number per coalition, shape ({len(coalitions)},)"
        )
    bad = ~torch.isfinite(values)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"the value function returned {values[row].item()} for a coalition of "
            f"{int(coalitions[row].sum())} of {coalitions.shape[1]} players; "
            "values must be finite numbers"
        )
    return values


@dataclass
class Walks:
    """Removal orders and the worth of the coalitions visited along them.

    ``orders[k, j]`` is the player removed at step ``j + 1`` of walk ``k``; ``worth[k, t]``
    is the value of the coalition left after ``t`` removals (NaN where not evaluated);
    ``wanted[k, j]`` says whether the removal at step ``j + 1`` counts.
    """

    orders: Tensor
    worth: Tensor
    wanted: Tensor

    @classmethod
    def concatenate(cls, parts: list[Walks]) -> Walks:
        """The walks of all ``parts``, in order."""
        return cls(
            torch.cat([part.orders for part in parts]),
            torch.cat([part.worth for part in parts]),
            torch.cat([part.wanted for part in parts]),
        )

    def subset(self, rows: Tensor) -> Walks:
        """The walks ``rows`` only."""
        return Walks(self.orders[rows], self.worth[rows], self.wanted[rows])

    def coalitions(self, rows: Tensor, steps: Tensor) -> Tensor:
        """Boolean coalitions left in walks ``rows`` after ``steps`` removals."""
        return torch.argsort(self.orders[rows], dim=1) >= steps[:, None]

    def marginals(self, importance: Tensor, worth: Tensor | None = None) -> Tensor:
        """``[p, n]``: ``lambda(s) * (v(S + i) - v(S))`` per walk and player, 0 where not wanted.

        ``worth`` replaces the walks' own coalition values, e.g. by residuals.
        """
        worth = self.worth if worth is None else worth
        step_importance = importance.flip(0)  # step j (1-based) leaves n - j players
        by_step = torch.where(self.wanted, (worth[:, :-1] - worth[:, 1:]) * step_importance, 0.0)
        return torch.zeros_like(by_step).scatter_(1, self.orders, by_step)


def walk(
    value: ValueFunction,
    orders: Tensor,
    importance: Tensor,
    tracked: Tensor,
    truncation: float | None = None,
    block: int = 4,
) -> Walks:
    """Evaluates the coalitions around the wanted removals of each order.

    Args:
        value: the value function (memoized, for the real game).
        orders: ``[p, n]`` permutations; row ``k`` removes ``orders[k, 0]`` first.
        importance: ``[n]`` size importance ``lambda(s)`` (see the weighting module).
        tracked: ``[n]`` players whose contributions are wanted; only the coalitions
            around their removals are evaluated.
        truncation: if set, a walk stops once ``|v(S) - v(empty)|`` is within this fraction
            of ``|v(N) - v(empty)|`` and the smaller coalitions are taken as worth
            ``v(empty)`` (Ghorbani & Zou's truncated Monte Carlo; the contributions still
            sum to ``v(N) - v(empty)``).
        block: with truncation, how many removal steps are evaluated between checks.
    """
    n_orders, n = orders.shape
    walks = Walks(
        orders=orders,
        worth=torch.full((n_orders, n + 1), math.nan, dtype=torch.float64),
        wanted=tracked[orders] & (importance.flip(0) > 0),
    )
    needed = torch.zeros(n_orders, n + 1, dtype=torch.bool)
    needed[:, :-1] |= walks.wanted  # the coalition before each wanted removal
    needed[:, 1:] |= walks.wanted  # and after it
    if truncation is None:
        block = n + 1
    else:
        ends = value(
            torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        )
        empty_worth = ends[1]
        threshold = truncation * (ends[0] - empty_worth).abs()
    active = torch.ones(n_orders, dtype=torch.bool)
    for first in range(0, n + 1, block):
        span = slice(first, min(first + block, n + 1))
        ask = needed[:, span] & active[:, None] & walks.worth[:, span].isnan()
        rows, offsets = ask.nonzero(as_tuple=True)
        if len(rows):
            steps = first + offsets
            walks.worth[rows, steps] = value(walks.coalitions(rows, steps))
        if truncation is None:
            continue
        # Strictly within the tolerance (so 0 never truncates), and never at the full set.
        near = (walks.worth[:, span] - empty_worth).abs() < threshold
        near[:, : max(0, 1 - first)] = False
        stopped = near.any(1) & active
        if stopped.any():
            stop_step = first + near.to(torch.int8).argmax(1)
            beyond = torch.arange(n + 1) > stop_step[:, None]
            walks.worth[stopped[:, None] & beyond] = empty_worth
            active &= ~stopped
        if not active.any():
            break
    return walks


class RoundStatistics:
    """Running mean, variance (Welford's update) and range of each player's round estimates."""

    def __init__(self, n: int) -> None:
        self.count = torch.zeros(n, dtype=torch.float64)
        self.mean = torch.zeros(n, dtype=torch.float64)
        self._squares = torch.zeros(n, dtype=torch.float64)
        self.low = torch.full((n,), math.inf, dtype=torch.float64)
        self.high = torch.full((n,), -math.inf, dtype=torch.float64)

    def add(self, estimates: Tensor, tracked: Tensor) -> None:
        """Adds ``[rounds, n]`` estimates for the ``tracked`` players."""
        for estimate in estimates:
            self.count += tracked
            delta = torch.where(tracked, estimate - self.mean, 0.0)
            self.mean += delta / self.count.clamp(min=1)
            self._squares += delta * torch.where(tracked, estimate - self.mean, 0.0)
            self.low = torch.where(tracked, torch.minimum(self.low, estimate), self.low)
            self.high = torch.where(tracked, torch.maximum(self.high, estimate), self.high)

    @property
    def variance(self) -> Tensor:
        """Unbiased sample variance of the round estimates (NaN below two rounds)."""
        return torch.where(self.count > 1, self._squares / (self.count - 1).clamp(min=1), math.nan)

    @property
    def stderr(self) -> Tensor:
        """The standard error of each player's mean."""
        return (self.variance / self.count.clamp(min=1)).sqrt()


def antithetic_orders(pairs: int, n: int, generator: torch.Generator) -> Tensor:
    """``2 * pairs`` orders: each random permutation followed by its reverse."""
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(pairs)])
    return torch.stack([orders, orders.flip(1)], dim=1).flatten(0, 1)


def pair_means(marginals: Tensor) -> Tensor:
    """``[2 * pairs, n]`` marginals of antithetic orders -> ``[pairs, n]`` round estimates."""
    return marginals.unflatten(0, (-1, 2)).mean(1)


def walk_pairs(
    value: MemoizedValue,
    importance: Tensor,
    blocks: Iterator[int],
    *,
    generator: torch.Generator,
    max_evaluations: int | None,
    tracked_players: Callable[[], Tensor] | None = None,
    truncation: float | None = None,
) -> Iterator[tuple[Walks, Tensor]]:
    """Walks blocks of antithetic pairs until ``blocks`` ends or the budget is spent.

    ``blocks`` yields how many pairs to walk together next (so the value function sees
    many coalitions at once); ``tracked_players`` narrows each block to the players still
    worth sampling and ends the sampling when it returns none. Yields each block's walks
    with the players it tracked.
    """
    n = len(importance)
    for planned in blocks:
        tracked = tracked_players() if tracked_players else torch.ones(n, dtype=torch.bool)
        if not tracked.any():
            return
        pairs = planned
        if max_evaluations is not None:
            remaining = max_evaluations - value.evaluations
            pairs = min(planned, remaining // _pair_cost(importance, tracked))
            if pairs < 1:
                return
        orders = antithetic_orders(pairs, n, generator)
        yield walk(value, orders, importance, tracked, truncation), tracked


def sample_pairs(
    value: MemoizedValue,
    importance: Tensor,
    blocks: Iterator[int],
    *,
    seed: int,
    max_evaluations: int | None,
    tracked_players: Callable[[RoundStatistics], Tensor] | None = None,
    truncation: float | None = None,
) -> RoundStatistics:
    """Statistics of the pair estimates of :func:`walk_pairs` (same arguments)."""
    stats = RoundStatistics(len(importance))
    for walks, tracked in walk_pairs(
        value,
        importance,
        blocks,
        generator=torch.Generator().manual_seed(seed),
        max_evaluations=max_evaluations,
        tracked_players=(lambda: tracked_players(stats)) if tracked_players else None,
        truncation=truncation,
    ):
        stats.add(pair_means(walks.marginals(importance)), tracked)
    return stats


def split_into_blocks(total: int, per_block: int) -> Iterator[int]:
    """Sizes of blocks of at most ``per_block`` that add up to ``total``."""
    done = 0
    while done < total:
        yield min(per_block, total - done)
        done += per_block


def _pair_cost(importance: Tensor, tracked: Tensor) -> int:
    """Most new coalitions one antithetic pair can cost: two around each counted removal."""
    removals = int((importance > 0).sum()) * int(tracked.sum()) / len(tracked)
    return 2 * min(len(tracked) + 1, 2 * math.ceil(removals))


def pairs_for_budget(num_permutations: int | None, max_evaluations: int | None) -> int:
    """Antithetic pairs to plan for; with only an evaluation budget, the budget stops it."""
    if num_permutations is not None:
        return max(1, math.ceil(num_permutations / 2))
    if max_evaluations is None:
        raise ValueError("give num_permutations or max_evaluations (both are None)")
    return max_evaluations


# --------------------------------------------------------------------------- confidence bounds


def _bernstein_radius(stats: RoundStatistics, error_rate: float) -> Tensor:
    """Half-width of the empirical Bernstein interval of each mean."""
    log_term = math.log(3.0 / error_rate)
    spread = stats.high - stats.low
    return (
        2 * stats.variance * log_term / stats.count
    ).sqrt() + 3 * spread * log_term / stats.count


def _normal_radius(stats: RoundStatistics, error_rate: float) -> Tensor:
    """Half-width of the central-limit interval of each mean."""
    z = NormalDist().inv_cdf(1.0 - error_rate / 2)
    return z * stats.stderr


BOUNDS: dict[str, Callable[..., Tensor]] = {
    "bernstein": _bernstein_radius,
    "normal": _normal_radius,
}


def unsure_of_bottom_k(stats: RoundStatistics, k: int, radius: Tensor) -> Tensor:
    """Players whose side of the bottom-k cut the confidence intervals leave open."""
    mean = stats.mean
    bottom = torch.zeros_like(mean, dtype=torch.bool)
    bottom[torch.argsort(mean)[:k]] = True
    highest_bottom = (mean + radius)[bottom].max()
    lowest_rest = (mean - radius)[~bottom].min()
    return (bottom & (mean + radius >= lowest_rest)) | (~bottom & (mean - radius <= highest_bottom))
