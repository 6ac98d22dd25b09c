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

import torch
from torch import Tensor

from lightning_shapley.shapley.options import check_options, check_players
from lightning_shapley.shapley.sampling import (
    BOUNDS,
    MemoizedValue,
    RoundStatistics,
    Walks,
    antithetic_orders,
    pair_means,
    pairs_for_budget,
    sample_pairs,
    split_into_blocks,
    unsure_of_bottom_k,
    walk,
    walk_pairs,
)
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
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS` or a
            :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.

    Example:
        >>> est = exact(lambda c: c.float() @ torch.tensor([1.0, 2.0, 3.0]), 3)
        >>> est.values
        tensor([1., 2., 3.], dtype=torch.float64)
    """
    check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    start = time.perf_counter()
    value = MemoizedValue(value_fn, n_players)
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


def _estimate(stats: RoundStatistics, value: MemoizedValue, start: float) -> ShapleyEstimate:
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
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS` or a
            :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        num_permutations: orderings to sample (rounded up to an even number); ``None`` to
            let ``max_evaluations`` decide.
        max_evaluations: stop once this many coalitions were evaluated.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    value, importance, start = _begin(
        "permutation",
        value_fn,
        n_players,
        weighting,
        depth,
        num_permutations=num_permutations,
        max_evaluations=max_evaluations,
        seed=seed,
    )
    pairs = pairs_for_budget(num_permutations, max_evaluations)
    stats = sample_pairs(
        value, importance, split_into_blocks(pairs, 8), seed=seed, max_evaluations=max_evaluations
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
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS` or a
            :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        num_permutations: orderings of the real game (at least 8); ``None`` to let
            ``max_evaluations`` decide.
        max_evaluations: plan the orderings for about this many evaluations.
        surrogate_permutations: orderings over which the surrogate's values are averaged.
        seed: seed of the orderings and of the surrogate; the same seed gives the same
            estimate.
    """
    value, importance, start = _begin(
        "surrogate",
        value_fn,
        n_players,
        weighting,
        depth,
        num_permutations=num_permutations,
        max_evaluations=max_evaluations,
        surrogate_permutations=surrogate_permutations,
        seed=seed,
    )
    generator = torch.Generator().manual_seed(seed)
    blocks = walk_pairs(
        value,
        importance,
        split_into_blocks(pairs_for_budget(num_permutations, max_evaluations), 8),
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
    walks = Walks.concatenate(parts)
    everyone = torch.ones(n_players, dtype=torch.bool)
    half = (torch.arange(2 * pairs) // 2) % 2  # whole pairs go to one half
    estimates, variances = [], []
    for held_out in (0, 1):
        fit_rows, rows = half != held_out, half == held_out
        fitted = SurrogateGame.fit(*_evaluated(walks, fit_rows), seed=seed + held_out)
        reference = walk(
            fitted,
            antithetic_orders(math.ceil(surrogate_permutations / 2), n_players, generator),
            importance,
            everyone,
        )
        surrogate_rounds = pair_means(reference.marginals(importance))
        held = walks.subset(rows)
        residual_worth = held.worth.clone()
        known = ~held.worth.isnan()
        residual_worth[known] -= fitted(held.coalitions(*known.nonzero(as_tuple=True)))
        residual_rounds = pair_means(held.marginals(importance, residual_worth))
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


def _evaluated(walks: Walks, rows: Tensor) -> tuple[Tensor, Tensor]:
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
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS` or a
            :class:`Weighting`.
        depth: the band's depth, with ``weighting="band"``.
        truncation: the tolerance, a fraction of ``|v(N) - v(empty)|`` in ``[0, 1)``.
        num_permutations: orderings to sample; ``None`` to let ``max_evaluations`` decide.
        max_evaluations: stop once this many coalitions were evaluated.
        seed: seed of the orderings; the same seed gives the same estimate.
    """
    value, importance, start = _begin(
        "tmc",
        value_fn,
        n_players,
        weighting,
        depth,
        truncation=truncation,
        num_permutations=num_permutations,
        max_evaluations=max_evaluations,
        seed=seed,
    )
    pairs = pairs_for_budget(num_permutations, max_evaluations)
    stats = sample_pairs(
        value,
        importance,
        split_into_blocks(pairs, 8),
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
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS` or a
            :class:`Weighting`.
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
    value, importance, start = _begin(
        "adaptive",
        value_fn,
        n_players,
        weighting,
        depth,
        bottom_k=bottom_k,
        tolerance=tolerance,
        confidence=confidence,
        bound=bound,
        num_permutations=num_permutations,
        max_evaluations=max_evaluations,
        min_rounds=min_rounds,
        seed=seed,
    )
    if bottom_k is not None and bottom_k >= n_players:
        raise ValueError(f"bottom_k={bottom_k!r} is not allowed; it must lie in [1, {n_players})")
    pairs = pairs_for_budget(num_permutations, max_evaluations)
    radius = partial(BOUNDS[bound], error_rate=(1.0 - confidence) / n_players)

    def unsure(stats: RoundStatistics) -> Tensor:
        if stats.count.min() < min_rounds:
            return stats.count < min_rounds
        open_rules = []
        if tolerance is not None:
            open_rules.append(stats.stderr >= tolerance)
        if bottom_k is not None:
            open_rules.append(unsure_of_bottom_k(stats, bottom_k, radius(stats)))
        if not all(rule.any() for rule in open_rules):
            return torch.zeros(n_players, dtype=torch.bool)  # the first rule met stops
        return torch.stack(open_rules).any(0)

    def block_sizes() -> Iterator[int]:
        yield min(min_rounds, pairs)
        yield from split_into_blocks(pairs - min_rounds, per_block=4)

    stats = sample_pairs(
        value,
        importance,
        block_sizes(),
        seed=seed,
        max_evaluations=max_evaluations,
        tracked_players=unsure,
    )
    return _estimate(stats, value, start)


def _begin(
    method: str,
    value_fn: ValueFunction,
    n_players: int,
    weighting: str | Weighting,
    depth: int | None,
    **options: object,
) -> tuple[MemoizedValue, Tensor, float]:
    """What every sampling estimator does first: check its arguments, then start the clock.

    Returns the memoized game, the weighting's size importance and the start time.
    """
    check_players(n_players)
    weighting = resolve_weighting(weighting, depth)
    check_options(method, **options)
    start = time.perf_counter()
    return MemoizedValue(value_fn, n_players), weighting.size_importance(n_players), start
