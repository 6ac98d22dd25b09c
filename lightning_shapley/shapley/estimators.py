"""Shapley-value estimators: pure functions of a value function over coalitions.

A *value function* takes a boolean tensor of coalitions, shape ``[m, n]`` (row ``k`` says
which of the ``n`` players are in coalition ``k``), and returns their values, shape
``[m]``. The estimators here know nothing of models: they decide which coalitions to
evaluate and turn the answers into values with standard errors. Each distinct coalition
is evaluated once per call (the estimators memoize), and ``evaluations`` counts them.

Every sampling estimator walks *removal orders*: it starts from the full set and removes
the players one at a time in a random order, so the coalitions near the full set, the ones
pruning visits, are the ones every sample sees. A player's marginal contribution is the
value lost when it is removed, scaled by the weighting's size importance (see
:mod:`lightning_shapley.shapley.weighting`). Samples come in independent *rounds*, an ordering and
its reverse; a value is the mean of its round estimates and its standard error is their
standard deviation over ``sqrt(rounds)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from lightning_shapley.shapley.surrogate import SurrogateGame
from lightning_shapley.shapley.weighting import Weighting, resolve_weighting

ValueFunction = Callable[[Tensor], Tensor]

#: Exact enumeration refuses to evaluate more coalitions than this (20 players, all sizes).
MAX_EXACT_COALITIONS = 2**20


@dataclass(frozen=True)
class ShapleyEstimate:
    """Estimated values of the players of a game.

    Attributes:
        values: float64 ``[n]``, the estimated value of each player.
        stderr: float64 ``[n]``, the standard error of each value (0 when exact; NaN when a
            player was sampled in fewer than two independent rounds).
        evaluations: distinct coalitions evaluated to get these values.
        seconds: wall-clock time spent.
        samples: int64 ``[n]``, the independent rounds (antithetic pairs) behind each
            value; 0 when exact. The adaptive estimator gives unsure players more.
    """

    values: Tensor
    stderr: Tensor
    evaluations: int
    seconds: float
    samples: Tensor


class _MemoizedValue:
    """Calls the value function once per distinct coalition and checks its answers."""

    def __init__(self, value_fn: ValueFunction, n_players: int) -> None:
        self._value_fn = value_fn
        self._n_players = n_players
        self._cache: dict[bytes, float] = {}

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def __call__(self, coalitions: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------- exact


def exact(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
) -> ShapleyEstimate:
    """Exact semivalues by enumerating every coalition the weighting gives weight to.

    The classic Shapley value and Banzhaf need all ``2^n`` coalitions, so they are refused
    beyond about 20 players; a band of depth ``r`` needs only the coalitions within ``r``
    removals of the full set (``n + 1`` of them for ``r = 1``), which stays cheap for large
    layers.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.

    Example:
        >>> est = exact(lambda c: c.float() @ torch.tensor([1.0, 2.0, 3.0]), 3)
        >>> est.values
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    weights = torch.cat(
        [weighting.coalition_weights(n_players), torch.zeros(1, dtype=torch.float64)]
    )
    needed_sizes = {s for s in range(n_players) if weights[s] > 0}
    family = _coalitions_of_sizes(
        n_players, sorted(needed_sizes | {s + 1 for s in needed_sizes}), weighting
    )
    values = value(family)
    sizes = family.sum(1)
    # phi_i = sum over coalitions T of v(T) * (w(|T|-1) if i in T else -w(|T|)); this form
    # needs no lookup of the partner coalition T \ {i}.
    with_i = values * torch.where(sizes > 0, weights[(sizes - 1).clamp(min=0)], 0.0)
    without_i = values * weights[sizes]
    members = family.to(torch.float64)
    phi = members.T @ with_i - (1.0 - members).T @ without_i
    return ShapleyEstimate(
        values=phi,
        stderr=torch.zeros(n_players, dtype=torch.float64),
        evaluations=value.evaluations,
        seconds=time.perf_counter() - start,
        samples=torch.zeros(n_players, dtype=torch.long),
    )


def _coalitions_of_sizes(n: int, sizes: list[int], weighting: Weighting) -> Tensor:
    count = sum(math.comb(n, s) for s in sizes)
    if count > MAX_EXACT_COALITIONS:
        raise ValueError(
            f"method='exact' with weighting {weighting} on {n} players needs {count:,} "
            f"coalition evaluations, more than the limit of {MAX_EXACT_COALITIONS:,} (about 20 "
            "players for 'shapley' and 'banzhaf'); use a sampling method such as "
            "'surrogate', or a 'band' weighting of small depth"
        )
    if len(sizes) == n + 1:
        codes = torch.arange(2**n).unsqueeze(1)
        return (codes >> torch.arange(n)) & 1 == 1
    rows = []
    for size in sizes:
        # Enumerate whichever side is smaller: the members, or the players left out.
        small = min(size, n - size)
        for chosen in combinations(range(n), small):
            row = torch.full((n,), size > small, dtype=torch.bool)
            row[list(chosen)] = size == small
            rows.append(row)
    return torch.stack(rows)


# --------------------------------------------------------------------------- sampling core


@dataclass
class _Walks:
    """Removal orders and the worth of the coalitions visited along them.

    ``orders[k, j]`` is the player removed at step ``j + 1`` of walk ``k``; ``worth[k, t]``
    is the value of the coalition left after ``t`` removals (NaN where not evaluated);
    ``wanted[k, j]`` says whether the removal at step ``j + 1`` counts.
    """

    orders: Tensor
    worth: Tensor
    wanted: Tensor

    @classmethod
    def concatenate(cls, parts: list[_Walks]) -> _Walks:
        return cls(
            torch.cat([part.orders for part in parts]),
            torch.cat([part.worth for part in parts]),
            torch.cat([part.wanted for part in parts]),
        )

    def subset(self, rows: Tensor) -> _Walks:
        return _Walks(self.orders[rows], self.worth[rows], self.wanted[rows])

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


def _walk(
    value: ValueFunction,
    orders: Tensor,
    importance: Tensor,
    tracked: Tensor,
    truncation: float | None = None,
    block: int = 4,
) -> _Walks:
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
    walks = _Walks(
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


class _RoundStatistics:
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
        return (self.variance / self.count.clamp(min=1)).sqrt()


def _antithetic_orders(pairs: int, n: int, generator: torch.Generator) -> Tensor:
    """``2 * pairs`` orders: each random permutation followed by its reverse."""
    orders = torch.stack([torch.randperm(n, generator=generator) for _ in range(pairs)])
    return torch.stack([orders, orders.flip(1)], dim=1).flatten(0, 1)


def _pair_means(marginals: Tensor) -> Tensor:
    """``[2 * pairs, n]`` marginals of antithetic orders -> ``[pairs, n]`` round estimates."""
    return marginals.unflatten(0, (-1, 2)).mean(1)


def _walk_pairs(
    value: _MemoizedValue,
    importance: Tensor,
    blocks: Iterator[int],
    *,
    generator: torch.Generator,
    max_evaluations: int | None,
    tracked_players: Callable[[], Tensor] | None = None,
    truncation: float | None = None,
) -> Iterator[tuple[_Walks, Tensor]]:
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
        orders = _antithetic_orders(pairs, n, generator)
        yield _walk(value, orders, importance, tracked, truncation), tracked


def _sample_pairs(
    value: _MemoizedValue,
    importance: Tensor,
    blocks: Iterator[int],
    *,
    seed: int,
    max_evaluations: int | None,
    tracked_players: Callable[[_RoundStatistics], Tensor] | None = None,
    truncation: float | None = None,
) -> _RoundStatistics:
    """Statistics of the pair estimates of :func:`_walk_pairs` (same arguments)."""
    stats = _RoundStatistics(len(importance))
    for walks, tracked in _walk_pairs(
        value,
        importance,
        blocks,
        generator=torch.Generator().manual_seed(seed),
        max_evaluations=max_evaluations,
        tracked_players=(lambda: tracked_players(stats)) if tracked_players else None,
        truncation=truncation,
    ):
        stats.add(_pair_means(walks.marginals(importance)), tracked)
    return stats


def _blocks(total: int, per_block: int) -> Iterator[int]:
    done = 0
    while done < total:
        yield min(per_block, total - done)
        done += per_block


def _pair_cost(importance: Tensor, tracked: Tensor) -> int:
    """Most new coalitions one antithetic pair can cost: two around each counted removal."""
    removals = int((importance > 0).sum()) * int(tracked.sum()) / len(tracked)
    return 2 * min(len(tracked) + 1, 2 * math.ceil(removals))


def _pairs_for_budget(num_permutations: int | None, max_evaluations: int | None) -> int:
    """Antithetic pairs to plan for; with only an evaluation budget, the budget stops it."""
    if num_permutations is not None:
        return max(1, math.ceil(num_permutations / 2))
    if max_evaluations is None:
        raise ValueError("give num_permutations or max_evaluations (both are None)")
    return max_evaluations


def _estimate(stats: _RoundStatistics, value: _MemoizedValue, start: float) -> ShapleyEstimate:
    return ShapleyEstimate(
        values=stats.mean,
        stderr=stats.stderr,
        evaluations=value.evaluations,
        seconds=time.perf_counter() - start,
        samples=stats.count.long(),
    )


# --------------------------------------------------------------------------- public estimators


def permutation(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
    num_permutations: int | None = 64,
    max_evaluations: int | None = None,
    seed: int = 0,
) -> ShapleyEstimate:
    """Monte Carlo over random orderings, each paired with its reverse (antithetic pairs).

    Each ordering yields one marginal contribution per player (Castro et al. 2009). The
    reverse ordering gives every player the complementary predecessors, which cancels all
    pairwise interactions between players exactly (a game with at most pairwise terms is
    valued without error by a single pair). With a band of depth ``r`` only the first
    ``r`` removals of each ordering are evaluated: ``r`` evaluations per ordering.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        num_permutations: orderings to sample (rounded up to an even number); ``None`` to
            let ``max_evaluations`` decide.
        max_evaluations: stop once this many coalitions were evaluated.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    _check_budget(num_permutations=num_permutations, max_evaluations=max_evaluations)
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    pairs = _pairs_for_budget(num_permutations, max_evaluations)
    stats = _sample_pairs(
        value, importance, _blocks(pairs, 8), seed=seed, max_evaluations=max_evaluations
    )
    return _estimate(stats, value, start)


def surrogate(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
    num_permutations: int | None = 64,
    max_evaluations: int | None = None,
    surrogate_permutations: int = 2000,
    seed: int = 0,
) -> ShapleyEstimate:
    """Antithetic permutation sampling with a learned surrogate game as control variate.

    Antithetic pairs already remove the pairwise interactions; what is left comes from
    higher-order ones. A small neural network fitted to the coalition values of half of
    the pairs captures much of that: its own values are cheap to estimate with many
    orderings, and only the residual ``v - f`` is estimated from the other half's
    evaluations (regression-adjusted Monte Carlo with cross-fitting, as in Witter et al.,
    2025). The halves then swap roles. The estimate stays unbiased whatever the fit, the
    standard errors come from the residuals, and the evaluations are those of
    :func:`permutation` with the same budget.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        num_permutations: orderings of the real game (at least 8); ``None`` to let
            ``max_evaluations`` decide.
        max_evaluations: plan the orderings for about this many evaluations.
        surrogate_permutations: orderings over which the surrogate's values are averaged.
        seed: seed of the orderings and of the surrogate; the same seed gives the same
            estimate.
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    _check_budget(
        num_permutations=num_permutations,
        max_evaluations=max_evaluations,
        surrogate_permutations=surrogate_permutations,
    )
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    generator = torch.Generator().manual_seed(seed)
    blocks = _walk_pairs(
        value,
        importance,
        _blocks(_pairs_for_budget(num_permutations, max_evaluations), 8),
        generator=generator,
        max_evaluations=max_evaluations,
    )
    parts = [walks for walks, _ in blocks]
    pairs = sum(len(walks.orders) for walks in parts) // 2
    if pairs < 4:
        raise ValueError(
            f"method='surrogate' needs at least 8 orderings (4 antithetic pairs, two per "
            f"half) but the budget gives {2 * pairs}; raise num_permutations or max_evaluations"
        )
    walks = _Walks.concatenate(parts)
    everyone = torch.ones(n_players, dtype=torch.bool)
    half = (torch.arange(2 * pairs) // 2) % 2  # whole pairs go to one half
    estimates, variances = [], []
    for held_out in (0, 1):
        fit_rows, rows = half != held_out, half == held_out
        fitted = SurrogateGame.fit(*_evaluated(walks, fit_rows), seed=seed + held_out)
        reference = _walk(
            fitted,
            _antithetic_orders(math.ceil(surrogate_permutations / 2), n_players, generator),
            importance,
            everyone,
        )
        surrogate_rounds = _pair_means(reference.marginals(importance))
        held = walks.subset(rows)
        residual_worth = held.worth.clone()
        known = ~held.worth.isnan()
        residual_worth[known] -= fitted(held.coalitions(*known.nonzero(as_tuple=True)))
        residual_rounds = _pair_means(held.marginals(importance, residual_worth))
        estimates.append(surrogate_rounds.mean(0) + residual_rounds.mean(0))
        variances.append(
            surrogate_rounds.var(0) / len(surrogate_rounds)
            + residual_rounds.var(0) / len(residual_rounds)
        )
    return ShapleyEstimate(
        values=(estimates[0] + estimates[1]) / 2,
        stderr=((variances[0] + variances[1]) / 4).sqrt(),
        evaluations=value.evaluations,
        seconds=time.perf_counter() - start,
        samples=torch.full((n_players,), pairs, dtype=torch.long),
    )


def _evaluated(walks: _Walks, rows: Tensor) -> tuple[Tensor, Tensor]:
    """The coalitions evaluated along the walks in ``rows``, with their values."""
    worth = walks.worth[rows]
    walk_rows, steps = (~worth.isnan()).nonzero(as_tuple=True)
    return walks.coalitions(rows.nonzero().flatten()[walk_rows], steps), worth[walk_rows, steps]


def truncated_monte_carlo(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
    truncation: float = 0.02,
    num_permutations: int | None = 64,
    max_evaluations: int | None = None,
    seed: int = 0,
) -> ShapleyEstimate:
    """Antithetic permutation sampling with the truncation rule of Neuron/Data Shapley.

    Each removal order stops being evaluated once the coalition left is worth about as
    little as the empty one (within ``truncation`` of ``|v(N) - v(empty)|``): removing more
    players changes nothing, so the rest of the walk is taken as worth ``v(empty)``
    (Ghorbani & Zou, 2019 and 2020). This trades a small bias for fewer evaluations.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        truncation: the tolerance, a fraction of ``|v(N) - v(empty)|`` in ``[0, 1)``.
        num_permutations: orderings to sample; ``None`` to let ``max_evaluations`` decide.
        max_evaluations: stop once this many coalitions were evaluated.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    _check_budget(num_permutations=num_permutations, max_evaluations=max_evaluations)
    if not (_is_number(truncation) and 0.0 <= truncation < 1.0):
        raise ValueError(f"truncation={truncation!r} is not allowed; it must lie in [0, 1)")
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    pairs = _pairs_for_budget(num_permutations, max_evaluations)
    stats = _sample_pairs(
        value,
        importance,
        _blocks(pairs, 8),
        seed=seed,
        max_evaluations=max_evaluations,
        truncation=truncation,
    )
    return _estimate(stats, value, start)


def adaptive(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
    bottom_k: int | None = None,
    tolerance: float | None = None,
    confidence: float = 0.95,
    bound: str = "bernstein",
    num_permutations: int | None = 2048,
    max_evaluations: int | None = None,
    min_rounds: int = 8,
    seed: int = 0,
) -> ShapleyEstimate:
    """Antithetic pairs until the answer needed is certain, sampling only the unsure players.

    Stops when the first of these holds: the ``bottom_k`` lowest players are separated from
    the rest by confidence bounds; every standard error is below ``tolerance``; the budget
    is spent. After ``min_rounds`` rounds, each new ordering is evaluated only
    around the removals of the players still unsure, so settled players cost nothing.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        bottom_k: stop once the set of the ``bottom_k`` lowest players is certain.
        tolerance: stop once every standard error is below this.
        confidence: joint confidence of the bounds, in ``(0, 1)``.
        bound: ``"bernstein"``, the empirical Bernstein bound (Maurer & Pontil, 2009), as
            in the bandit of Neuron Shapley (Ghorbani & Zou, 2020): it holds for any
            bounded contributions but its range term makes it slow to separate close
            players; ``"normal"``, the central-limit interval ``z * stderr`` with a
            Bonferroni ``z``: much tighter, valid once the rounds are many.
        num_permutations: at most this many orderings.
        max_evaluations: at most about this many coalition evaluations.
        min_rounds: antithetic pairs every player gets before any stop is considered.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    _check_budget(num_permutations=num_permutations, max_evaluations=max_evaluations)
    if bottom_k is None and tolerance is None:
        raise ValueError("method='adaptive' needs a stop rule: set bottom_k, tolerance or both")
    if bottom_k is not None and not (_is_integer(bottom_k) and 1 <= bottom_k < n_players):
        raise ValueError(f"bottom_k={bottom_k!r} is not allowed; it must lie in [1, {n_players})")
    if tolerance is not None and not (_is_number(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r} is not allowed; it must be positive")
    if not (_is_number(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence={confidence!r} is not allowed; it must lie in (0, 1)")
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is not known; use one of {tuple(BOUNDS)}")
    if not (_is_integer(min_rounds) and min_rounds >= 2):
        raise ValueError(f"min_rounds={min_rounds!r} is not allowed; it must be an integer >= 2")
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    pairs = _pairs_for_budget(num_permutations, max_evaluations)
    radius = partial(BOUNDS[bound], error_rate=(1.0 - confidence) / n_players)

    def unsure(stats: _RoundStatistics) -> Tensor:
        if stats.count.min() < min_rounds:
            return stats.count < min_rounds
        open_rules = []
        if tolerance is not None:
            open_rules.append(stats.stderr >= tolerance)
        if bottom_k is not None:
            open_rules.append(_unsure_of_bottom_k(stats, bottom_k, radius(stats)))
        if not all(rule.any() for rule in open_rules):
            return torch.zeros(n_players, dtype=torch.bool)  # the first rule met stops
        return torch.stack(open_rules).any(0)

    def block_sizes() -> Iterator[int]:
        yield min(min_rounds, pairs)
        yield from _blocks(pairs - min_rounds, per_block=4)

    stats = _sample_pairs(
        value,
        importance,
        block_sizes(),
        seed=seed,
        max_evaluations=max_evaluations,
        tracked_players=unsure,
    )
    return _estimate(stats, value, start)


def _bernstein_radius(stats: _RoundStatistics, error_rate: float) -> Tensor:
    """Half-width of the empirical Bernstein interval of each mean."""
    log_term = math.log(3.0 / error_rate)
    spread = stats.high - stats.low
    return (
        2 * stats.variance * log_term / stats.count
    ).sqrt() + 3 * spread * log_term / stats.count


def _normal_radius(stats: _RoundStatistics, error_rate: float) -> Tensor:
    """Half-width of the central-limit interval of each mean."""
    z = NormalDist().inv_cdf(1.0 - error_rate / 2)
    return z * stats.stderr


BOUNDS: dict[str, Callable[..., Tensor]] = {
    "bernstein": _bernstein_radius,
    "normal": _normal_radius,
}


def _unsure_of_bottom_k(stats: _RoundStatistics, k: int, radius: Tensor) -> Tensor:
    """Players whose side of the bottom-k cut the confidence intervals leave open."""
    mean = stats.mean
    bottom = torch.zeros_like(mean, dtype=torch.bool)
    bottom[torch.argsort(mean)[:k]] = True
    highest_bottom = (mean + radius)[bottom].max()
    lowest_rest = (mean - radius)[~bottom].min()
    return (bottom & (mean + radius >= lowest_rest)) | (~bottom & (mean - radius <= highest_bottom))


# --------------------------------------------------------------------------- checks


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_players(n_players: int) -> None:
    if not _is_integer(n_players) or n_players < 1:
        raise ValueError(f"n_players={n_players!r} is not allowed; it must be a positive integer")


def _check_budget(**budgets: int | None) -> None:
    for name, budget in budgets.items():
        if budget is not None and not (_is_integer(budget) and budget >= 1):
            raise ValueError(
                f"{name}={budget!r} is not allowed; it must be a positive integer or None"
            )
