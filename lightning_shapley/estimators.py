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
:mod:`lightning_shapley.weighting`). Samples come in independent *rounds* (an ordering and
its reverse, or a stratified block of orderings); a value is the mean of its round
estimates and its standard error is their standard deviation over ``sqrt(rounds)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch
from torch import Tensor

from lightning_shapley.weighting import Weighting, resolve_weighting

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
    """

    values: Tensor
    stderr: Tensor
    evaluations: int
    seconds: float


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
    )


def _coalitions_of_sizes(n: int, sizes: list[int], weighting: Weighting) -> Tensor:
    count = sum(math.comb(n, s) for s in sizes)
    if count > MAX_EXACT_COALITIONS:
        raise ValueError(
            f"method='exact' with weighting {weighting} on {n} players needs {count:,} "
            f"coalition evaluations, more than the limit of {MAX_EXACT_COALITIONS:,} (about 20 "
            "players for 'shapley' and 'banzhaf'); use a sampling method such as "
            "'stratified', or a 'band' weighting of small depth"
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


def _walk_removal_orders(
    value: _MemoizedValue,
    orders: Tensor,
    importance: Tensor,
    tracked: Tensor,
    truncation: float | None = None,
    block: int = 4,
) -> Tensor:
    """Weighted marginal contributions along removal orders.

    Args:
        value: the memoized value function.
        orders: ``[p, n]`` permutations; row ``k`` removes ``orders[k, 0]`` first.
        importance: ``[n]`` size importance ``lambda(s)`` (see the weighting module).
        tracked: ``[n]`` players whose contributions are wanted; only the coalitions
            around their removals are evaluated.
        truncation: if set, a walk stops once ``|v(S) - v(empty)|`` is within this fraction
            of ``|v(N) - v(empty)|`` and the smaller coalitions are taken as worth
            ``v(empty)`` (Ghorbani & Zou's truncated Monte Carlo; the contributions still
            sum to ``v(N) - v(empty)``).
        block: with truncation, how many removal steps are evaluated between checks.

    Returns:
        ``[p, n]`` float64: ``lambda(s) * (v(S + i) - v(S))`` for each order and player,
        zero where the player is not tracked or its removal carries no weight.
    """
    n_orders, n = orders.shape
    step_importance = importance.flip(0)  # step j (1-based) leaves n - j players
    wanted = tracked[orders] & (step_importance > 0)  # [p, n] by step
    needed = torch.zeros(n_orders, n + 1, dtype=torch.bool)
    needed[:, :-1] |= wanted  # the coalition before each wanted removal
    needed[:, 1:] |= wanted  # and after it
    position = torch.argsort(orders, dim=1)  # position[k, i]: when player i is removed
    worth = torch.full((n_orders, n + 1), math.nan, dtype=torch.float64)

    active = torch.ones(n_orders, dtype=torch.bool)
    if truncation is not None:
        full_and_empty = value(
            torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        )
        empty_worth = full_and_empty[1]
        threshold = truncation * (full_and_empty[0] - empty_worth).abs()
    for first in range(0, n + 1, block if truncation is not None else n + 1):
        last = min(first + (block if truncation is not None else n + 1), n + 1)
        ask = needed[:, first:last] & active[:, None] & worth[:, first:last].isnan()
        rows, offsets = ask.nonzero(as_tuple=True)
        if len(rows):
            steps = first + offsets
            worth[rows, steps] = value(position[rows] >= steps[:, None])
        if truncation is None:
            continue
        near = (worth[:, first:last] - empty_worth).abs() <= threshold
        stopped = near.any(1) & active
        if stopped.any():
            stop_step = first + near.to(torch.int8).argmax(1)
            beyond = torch.arange(n + 1) > stop_step[:, None]
            worth[stopped[:, None] & beyond] = empty_worth
            active &= ~stopped
        if not active.any():
            break

    by_step = torch.where(wanted, (worth[:, :-1] - worth[:, 1:]) * step_importance, 0.0)
    return torch.zeros(n_orders, n, dtype=torch.float64).scatter_(1, orders, by_step)


class _RoundStatistics:
    """Running mean, variance and range of each player's per-round estimates."""

    def __init__(self, n: int) -> None:
        self.count = torch.zeros(n, dtype=torch.float64)
        self.total = torch.zeros(n, dtype=torch.float64)
        self.total_sq = torch.zeros(n, dtype=torch.float64)
        self.low = torch.full((n,), math.inf, dtype=torch.float64)
        self.high = torch.full((n,), -math.inf, dtype=torch.float64)

    def add(self, estimate: Tensor, tracked: Tensor) -> None:
        self.count += tracked
        self.total += torch.where(tracked, estimate, 0.0)
        self.total_sq += torch.where(tracked, estimate**2, 0.0)
        self.low = torch.where(tracked, torch.minimum(self.low, estimate), self.low)
        self.high = torch.where(tracked, torch.maximum(self.high, estimate), self.high)

    @property
    def mean(self) -> Tensor:
        return self.total / self.count.clamp(min=1)

    @property
    def variance(self) -> Tensor:
        """Unbiased sample variance of the round estimates (NaN below two rounds)."""
        spread = (self.total_sq - self.count * self.mean**2).clamp(min=0)
        return torch.where(self.count > 1, spread / (self.count - 1).clamp(min=1), math.nan)

    @property
    def stderr(self) -> Tensor:
        return (self.variance / self.count.clamp(min=1)).sqrt()


RoundMaker = Callable[[torch.Generator], Tensor]


def _antithetic_round(n: int) -> RoundMaker:
    def make(generator: torch.Generator) -> Tensor:
        order = torch.randperm(n, generator=generator)
        return torch.stack([order, order.flip(0)])

    return make


def _stratified_round(n: int, shifts: int) -> RoundMaker:
    """``shifts`` orderings that put every player at a different position, and their reverses.

    A Latin-square block: it spreads each player over distinct coalition sizes.
    """

    def make(generator: torch.Generator) -> Tensor:
        players = torch.randperm(n, generator=generator)
        slots = torch.randperm(n, generator=generator)
        shifted = (slots[None, :] + torch.arange(shifts)[:, None]) % n
        orders = players[shifted]
        return torch.cat([orders, orders.flip(1)])

    return make


def _sample_rounds(
    value: _MemoizedValue,
    importance: Tensor,
    make_round: RoundMaker,
    rounds: Iterator[int],
    *,
    seed: int,
    max_evaluations: int | None,
    tracked_players: Callable[[_RoundStatistics], Tensor] | None = None,
    truncation: float | None = None,
) -> _RoundStatistics:
    """Walks blocks of rounds until ``rounds`` is exhausted or the budget is spent.

    ``rounds`` yields how many rounds to walk together next (so the value function sees
    many coalitions at once); ``tracked_players`` narrows each block to the players still
    worth sampling and ends the sampling when it returns no player.
    """
    n = len(importance)
    generator = torch.Generator().manual_seed(seed)
    stats = _RoundStatistics(n)
    for block_rounds in rounds:
        if max_evaluations is not None and value.evaluations >= max_evaluations:
            break
        tracked = tracked_players(stats) if tracked_players else torch.ones(n, dtype=torch.bool)
        if not tracked.any():
            break
        blocks = [make_round(generator) for _ in range(block_rounds)]
        marginals = _walk_removal_orders(value, torch.cat(blocks), importance, tracked, truncation)
        for estimate in marginals.split([len(b) for b in blocks]):
            stats.add(estimate.mean(0), tracked)
    return stats


def _blocks(total_rounds: int, per_block: int) -> Iterator[int]:
    done = 0
    while done < total_rounds:
        yield min(per_block, total_rounds - done)
        done += per_block


def _orders_for_budget(
    num_permutations: int | None, max_evaluations: int | None, importance: Tensor
) -> int:
    """How many orderings to plan for: as asked, or as many as the evaluation budget buys."""
    if num_permutations is not None:
        return num_permutations
    if max_evaluations is None:
        raise ValueError("give num_permutations or max_evaluations (both are None)")
    cost = max(1, int((importance > 0).sum()))  # new coalitions per ordering
    return max(2, max_evaluations // cost)


def _estimate(stats: _RoundStatistics, value: _MemoizedValue, start: float) -> ShapleyEstimate:
    return ShapleyEstimate(
        values=stats.mean,
        stderr=stats.stderr,
        evaluations=value.evaluations,
        seconds=time.perf_counter() - start,
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

    Each ordering yields one marginal contribution per player (Castro et al. 2009); the
    reverse ordering puts every player in the complementary position, which cancels much
    of the variance that comes from coalition size. With a band of depth ``r`` only the
    first ``r`` removals of each ordering are evaluated, ``r`` evaluations per ordering.

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
    pairs = math.ceil(_orders_for_budget(num_permutations, max_evaluations, importance) / 2)
    stats = _sample_rounds(
        value,
        importance,
        _antithetic_round(n_players),
        _blocks(pairs, per_block=8),
        seed=seed,
        max_evaluations=max_evaluations,
    )
    return _estimate(stats, value, start)


def stratified(
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting = "shapley",
    *,
    depth: int | None = None,
    num_permutations: int | None = 64,
    max_evaluations: int | None = None,
    rounds: int = 8,
    seed: int = 0,
) -> ShapleyEstimate:
    """Orderings stratified by position: antithetic pairs from Latin-square blocks.

    Within a round, the orderings are cyclic shifts of one random ordering over randomly
    permuted positions, so every player is removed at a different step in each of them
    (a uniformly random set of distinct coalition sizes), and each ordering comes with its
    reverse. Every ordering is still uniformly random, so the estimate is unbiased, but a
    player no longer sees the same coalition size twice by chance within a round, which is
    where most of the variance of plain permutation sampling comes from.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        num_permutations: orderings to sample, split into ``rounds`` equal rounds (at most
            this many are used); ``None`` to let ``max_evaluations`` decide.
        max_evaluations: stop once this many coalitions were evaluated.
        rounds: independent rounds the orderings are split into (at least 2); their spread
            gives the standard errors, so more rounds give steadier error bars and fewer
            give stronger stratification.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    _check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    _check_budget(num_permutations=num_permutations, max_evaluations=max_evaluations)
    if not isinstance(rounds, int) or rounds < 2:
        raise ValueError(f"rounds={rounds!r} is not allowed; it must be an integer of at least 2")
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    orders = _orders_for_budget(num_permutations, max_evaluations, importance)
    # A round holds at most n shifts (each player once at every position) and their
    # reverses; whatever the split, the rounds use up the budget.
    shifts = min(n_players, max(1, orders // (2 * rounds)))
    n_rounds = orders // (2 * shifts)
    if n_rounds < 2:
        raise ValueError(
            f"num_permutations={orders} is too few for method='stratified'; it needs at least "
            "4 (two rounds of an ordering and its reverse) to give a standard error"
        )
    stats = _sample_rounds(
        value,
        importance,
        _stratified_round(n_players, shifts),
        _blocks(n_rounds, per_block=max(1, 16 // shifts)),
        seed=seed,
        max_evaluations=max_evaluations,
    )
    return _estimate(stats, value, start)


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
    if not 0.0 <= truncation < 1.0:
        raise ValueError(f"truncation={truncation!r} is not allowed; it must lie in [0, 1)")
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    pairs = math.ceil(_orders_for_budget(num_permutations, max_evaluations, importance) / 2)
    stats = _sample_rounds(
        value,
        importance,
        _antithetic_round(n_players),
        _blocks(pairs, per_block=8),
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
    num_permutations: int | None = 2048,
    max_evaluations: int | None = None,
    min_rounds: int = 4,
    seed: int = 0,
) -> ShapleyEstimate:
    """Antithetic pairs until the answer needed is certain, sampling only the unsure players.

    Stops when the first of these holds: the ``bottom_k`` lowest players are separated from
    the rest by empirical Bernstein confidence bounds (Maurer & Pontil, 2009; the bandit of
    Neuron Shapley, Ghorbani & Zou 2020); every standard error is below ``tolerance``; the
    budget is spent. After ``min_rounds`` rounds, each new ordering is evaluated only
    around the removals of the players still unsure, so settled players cost nothing.

    Args:
        value_fn: maps a boolean ``[m, n]`` coalition tensor to ``[m]`` values.
        n_players: number of players ``n``.
        weighting: ``"shapley"``, ``"banzhaf"``, ``"band"`` or a :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        bottom_k: stop once the set of the ``bottom_k`` lowest players is certain.
        tolerance: stop once every standard error is below this.
        confidence: joint confidence of the bounds, in ``(0, 1)``.
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
    if bottom_k is not None and not 1 <= bottom_k < n_players:
        raise ValueError(f"bottom_k={bottom_k!r} is not allowed; it must lie in [1, {n_players})")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance={tolerance!r} is not allowed; it must be positive")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} is not allowed; it must lie in (0, 1)")
    if not isinstance(min_rounds, int) or min_rounds < 2:
        raise ValueError(f"min_rounds={min_rounds!r} is not allowed; it must be an integer >= 2")
    start = time.perf_counter()
    value = _MemoizedValue(value_fn, n_players)
    importance = weighting.size_importance(n_players)
    pairs = math.ceil(_orders_for_budget(num_permutations, max_evaluations, importance) / 2)
    log_term = math.log(3.0 * n_players / (1.0 - confidence))

    def unsure(stats: _RoundStatistics) -> Tensor:
        if stats.count.min() < min_rounds:
            return stats.count < min_rounds
        keep = torch.zeros(n_players, dtype=torch.bool)
        if tolerance is not None:
            keep |= stats.stderr >= tolerance
        if bottom_k is not None:
            keep |= _unsure_of_bottom_k(stats, bottom_k, log_term)
        return keep

    def block_sizes() -> Iterator[int]:
        yield min(min_rounds, pairs)
        yield from _blocks(pairs - min_rounds, per_block=4)

    stats = _sample_rounds(
        value,
        importance,
        _antithetic_round(n_players),
        block_sizes(),
        seed=seed,
        max_evaluations=max_evaluations,
        tracked_players=unsure,
    )
    return _estimate(stats, value, start)


def _unsure_of_bottom_k(stats: _RoundStatistics, k: int, log_term: float) -> Tensor:
    """Players whose side of the bottom-k cut the empirical Bernstein bounds leave open."""
    count = stats.count
    radius = (2 * stats.variance * log_term / count).sqrt() + 3 * (
        stats.high - stats.low
    ) * log_term / count
    mean = stats.mean
    bottom = torch.zeros_like(count, dtype=torch.bool)
    bottom[torch.argsort(mean)[:k]] = True
    highest_bottom = (mean + radius)[bottom].max()
    lowest_rest = (mean - radius)[~bottom].min()
    return (bottom & (mean + radius >= lowest_rest)) | (~bottom & (mean - radius <= highest_bottom))


# --------------------------------------------------------------------------- checks


def _check_players(n_players: int) -> None:
    if not isinstance(n_players, int) or isinstance(n_players, bool) or n_players < 1:
        raise ValueError(f"n_players={n_players!r} is not allowed; it must be a positive integer")


def _check_budget(**budgets: int | None) -> None:
    for name, budget in budgets.items():
        if budget is not None and (
            not isinstance(budget, int) or isinstance(budget, bool) or budget < 1
        ):
            raise ValueError(
                f"{name}={budget!r} is not allowed; it must be a positive integer or None"
            )
