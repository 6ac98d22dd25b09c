"""Tests of the estimators: known games, independent references, sampling statistics."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor

from lightning_shapley.shapley.estimators import (
    ShapleyEstimate,
    adaptive,
    exact,
    permutation,
    surrogate,
    truncated_monte_carlo,
)

Game = Callable[[Tensor], Tensor]
F64 = torch.float64

# --------------------------------------------------------------------------- games


def additive(weights: list[float]) -> Game:
    w = torch.tensor(weights, dtype=F64)
    return lambda c: c.to(F64) @ w


def unanimity(carrier: list[int]) -> Game:
    return lambda c: c[:, carrier].all(1).to(F64)


def glove(left: list[int], right: list[int]) -> Game:
    return lambda c: torch.minimum(c[:, left].sum(1), c[:, right].sum(1)).to(F64)


def weighted_majority(weights: list[float], quota: float) -> Game:
    w = torch.tensor(weights, dtype=F64)
    return lambda c: (c.to(F64) @ w >= quota).to(F64)


def random_table(n: int, seed: int) -> Game:
    """Every coalition gets an independent standard normal value: as non-additive as it gets."""
    table = torch.randn(2**n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    bits = 2 ** torch.arange(n)
    return lambda c: table[(c.long() * bits).sum(1)]


def pairwise(n: int, seed: int) -> tuple[Game, Tensor, Tensor]:
    """``v(S) = sum_{i in S} w_i + sum_{i<j in S} a_ij``; returns the game, ``w`` and ``a``."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=generator, dtype=F64)
    a = torch.triu(torch.randn(n, n, generator=generator, dtype=F64), diagonal=1)

    def value(c: Tensor) -> Tensor:
        x = c.to(F64)
        return x @ w + ((x @ a) * x).sum(1)

    return value, w, a


def plus(*games: Game) -> Game:
    return lambda c: sum(game(c) for game in games)


def scaled(game: Game, factor: float) -> Game:
    return lambda c: factor * game(c)


# --------------------------------------------------------------------------- references


def worth_of(game: Game, n: int, sets: Iterable[frozenset[int]]) -> dict[frozenset[int], float]:
    """The game's value of each given set of players, in one batched call."""
    sets = list(dict.fromkeys(sets))
    rows = torch.zeros(len(sets), n, dtype=torch.bool)
    for k, members in enumerate(sets):
        rows[k, list(members)] = True
    return dict(zip(sets, game(rows).tolist(), strict=True))


def all_subsets(players: Iterable[int]) -> list[frozenset[int]]:
    players = list(players)
    return [
        frozenset(chosen)
        for size in range(len(players) + 1)
        for chosen in itertools.combinations(players, size)
    ]


def shapley_by_permutations(game: Game, n: int) -> Tensor:
    """Average marginal contribution over all n! orders of joining (itertools)."""
    worth = worth_of(game, n, all_subsets(range(n)))
    phi = [0.0] * n
    for order in itertools.permutations(range(n)):
        before: frozenset[int] = frozenset()
        for player in order:
            after = before | {player}
            phi[player] += worth[after] - worth[before]
            before = after
    return torch.tensor(phi, dtype=F64) / math.factorial(n)


def banzhaf_brute_force(game: Game, n: int) -> Tensor:
    """Mean of v(S + i) - v(S) over the 2^(n-1) sets S without i."""
    worth = worth_of(game, n, all_subsets(range(n)))
    phi = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        total = sum(worth[s | {i}] - worth[s] for s in all_subsets(others))
        phi.append(total / 2 ** (n - 1))
    return torch.tensor(phi, dtype=F64)


def band_by_formula(game: Game, n: int, depth: int) -> Tensor:
    """(1/r) sum_{j=1..r} mean over R (|R| = j-1, i not in R) of v(N minus R) - v(N minus R, i)."""
    full = frozenset(range(n))
    removals = {
        i: [
            [frozenset(r) for r in itertools.combinations(sorted(full - {i}), size)]
            for size in range(depth)
        ]
        for i in range(n)
    }
    sets = [
        full - r - extra
        for i, by_size in removals.items()
        for group in by_size
        for r in group
        for extra in (frozenset(), frozenset({i}))
    ]
    worth = worth_of(game, n, sets)
    phi = []
    for i, by_size in removals.items():
        means = [sum(worth[full - r] - worth[full - r - {i}] for r in g) / len(g) for g in by_size]
        phi.append(sum(means) / depth)
    return torch.tensor(phi, dtype=F64)


def gain(game: Game, n: int) -> float:
    """v(N) - v(empty)."""
    ends = game(torch.stack([torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)]))
    return float(ends[0] - ends[1])


def assert_close(actual: Tensor, expected: Tensor | list[float], atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=F64), rtol=0, atol=atol)


# --------------------------------------------------------------------------- exact: Shapley


def test_exact_additive_game_gives_the_weights() -> None:
    weights = [0.5, -1.25, 3.0, 0.0, 7.5]
    est = exact(additive(weights), 5)
    assert isinstance(est, ShapleyEstimate)
    assert est.values.dtype == F64
    assert_close(est.values, weights)
    assert_close(est.stderr, torch.zeros(5))
    assert est.evaluations == 2**5


@pytest.mark.parametrize(
    ("n", "carrier"), [(6, [1, 3, 4]), (4, [2]), (5, [0, 1, 2, 3, 4]), (7, [0, 6])]
)
def test_exact_unanimity_game_splits_one_among_the_carrier(n: int, carrier: list[int]) -> None:
    expected = [1 / len(carrier) if i in carrier else 0.0 for i in range(n)]
    assert_close(exact(unanimity(carrier), n).values, expected)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [
        ([0, 1], [2], [1 / 6, 1 / 6, 2 / 3]),
        ([2], [0, 1], [1 / 6, 1 / 6, 2 / 3]),
        # By hand: a left glove adds a pair iff fewer left than right gloves precede it;
        # over predecessor counts 0..4 that happens with probability 0, 3/4, 1/2, 1, 1.
        ([0, 1], [2, 3, 4], [13 / 20, 13 / 20, 7 / 30, 7 / 30, 7 / 30]),
    ],
)
def test_exact_glove_game_by_hand(left: list[int], right: list[int], expected: list[float]) -> None:
    assert_close(exact(glove(left, right), len(expected)).values, expected)


def test_exact_weighted_majority_by_hand() -> None:
    # Quota 51 of 100: winning coalitions are player 0 with at least one other.
    assert_close(exact(weighted_majority([50, 30, 20], 51), 3).values, [2 / 3, 1 / 6, 1 / 6])


@pytest.mark.parametrize(
    ("game", "n"),
    [
        pytest.param(weighted_majority([4, 3, 3, 2, 2, 1, 1], 9), 7, id="majority-7"),
        pytest.param(weighted_majority([5, 4, 1, 1, 1], 7), 5, id="majority-5"),
        pytest.param(weighted_majority([1, 1, 1, 1, 1, 1], 6), 6, id="unanimous-majority"),
        pytest.param(glove([0, 3, 5], [1, 2, 4, 6]), 7, id="glove-3v4"),
        pytest.param(glove([0, 1], [2, 3, 4]), 5, id="glove-2v3"),
        pytest.param(random_table(6, seed=3), 6, id="random-table-6"),
        pytest.param(pairwise(7, seed=4)[0], 7, id="pairwise-7"),
    ],
)
def test_exact_shapley_matches_enumeration_of_all_orders(game: Game, n: int) -> None:
    assert_close(exact(game, n).values, shapley_by_permutations(game, n))


def test_exact_pairwise_game_splits_each_interaction_in_half() -> None:
    game, w, a = pairwise(9, seed=5)
    expected = w + (a + a.T).sum(1) / 2
    assert_close(exact(game, 9).values, expected)


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_shapley_is_efficient_on_random_games(n: int, seed: int) -> None:
    game = random_table(n, seed)
    assert math.isclose(exact(game, n).values.sum().item(), gain(game, n), abs_tol=1e-9)


# --------------------------------------------------------------------------- exact: Banzhaf


def test_exact_banzhaf_glove_by_hand() -> None:
    assert_close(exact(glove([0, 1], [2]), 3, "banzhaf").values, [1 / 4, 1 / 4, 3 / 4])


def test_exact_banzhaf_unanimity_game() -> None:
    carrier = [0, 2, 5]
    expected = [2.0 ** -(len(carrier) - 1) if i in carrier else 0.0 for i in range(6)]
    assert_close(exact(unanimity(carrier), 6, "banzhaf").values, expected)


@pytest.mark.parametrize(
    ("game", "n"),
    [
        pytest.param(random_table(7, seed=8), 7, id="random-table-7"),
        pytest.param(weighted_majority([4, 3, 3, 2, 2, 1], 8), 6, id="majority-6"),
        pytest.param(glove([0, 1, 2], [3, 4]), 5, id="glove-3v2"),
    ],
)
def test_exact_banzhaf_matches_brute_force(game: Game, n: int) -> None:
    assert_close(exact(game, n, "banzhaf").values, banzhaf_brute_force(game, n))


# --------------------------------------------------------------------------- exact: band


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_band_depth_one_is_leave_one_out(seed: int) -> None:
    n = 8
    game = random_table(n, seed)
    full = frozenset(range(n))
    worth = worth_of(game, n, [full] + [full - {i} for i in range(n)])
    loo = [worth[full] - worth[full - {i}] for i in range(n)]
    est = exact(game, n, "band", depth=1)
    assert_close(est.values, loo)
    assert est.evaluations == n + 1


@pytest.mark.parametrize("extra_depth", [0, 3])
def test_exact_band_of_full_depth_is_shapley(extra_depth: int) -> None:
    n = 7
    game = random_table(n, seed=4)
    band = exact(game, n, "band", depth=n + extra_depth)
    assert_close(band.values, exact(game, n).values)


def test_exact_band_depth_two_glove_by_hand() -> None:
    # phi_i = (v(N) - v(N-i) + mean_{j != i} [v(N-j) - v(N-j-i)]) / 2
    assert_close(exact(glove([0, 1], [2]), 3, "band", depth=2).values, [1 / 4, 1 / 4, 1.0])


@pytest.mark.parametrize("depth", [2, 3, 5])
@pytest.mark.parametrize(
    ("game", "n"),
    [
        pytest.param(random_table(7, seed=9), 7, id="random-table-7"),
        pytest.param(weighted_majority([4, 3, 3, 2, 2, 1, 1], 9), 7, id="majority-7"),
    ],
)
def test_exact_band_matches_the_removal_formula(game: Game, n: int, depth: int) -> None:
    assert_close(exact(game, n, "band", depth=depth).values, band_by_formula(game, n, depth))


def test_exact_band_on_forty_players_costs_the_band_only() -> None:
    n, depth = 40, 2
    weights = torch.linspace(-2.0, 3.0, n, dtype=F64).tolist()
    est = exact(additive(weights), n, "band", depth=depth)
    assert est.evaluations == 1 + 40 + 780
    assert_close(est.values, weights)

    # A pairwise game: the removal of i from N \ R loses w_i + sum_{k not in R} a_ik, and
    # each other player is among the j - 1 removed with probability (j - 1) / (n - 1).
    game, w, a = pairwise(n, seed=6)
    est = exact(game, n, "band", depth=depth)
    assert est.evaluations == 1 + 40 + 780
    kept_share = 1 - (depth - 1) / (2 * (n - 1))
    assert_close(est.values, w + (a + a.T).sum(1) * kept_share)
    assert_close(est.values, band_by_formula(game, n, depth))


# --------------------------------------------------------------------------- exact: limits


def never_called(coalitions: Tensor) -> Tensor:
    raise AssertionError("the value function must not be called")


@pytest.mark.parametrize("weighting", ["shapley", "banzhaf"])
@pytest.mark.parametrize("n", [21, 22, 30])
def test_exact_refuses_too_many_players(weighting: str, n: int) -> None:
    with pytest.raises(ValueError, match=rf"method='exact'.* {n} players.*limit of 1,048,576"):
        exact(never_called, n, weighting)


def test_exact_refuses_a_band_too_deep_for_the_limit() -> None:
    # C(60, 5) alone is 5,461,512 coalitions.
    with pytest.raises(ValueError, match=r"method='exact'.*band\(depth=5\).*limit"):
        exact(never_called, 60, "band", depth=5)


def test_exact_allows_a_shallow_band_on_many_players() -> None:
    weights = torch.arange(60, dtype=F64).tolist()
    est = exact(additive(weights), 60, "band", depth=2)
    assert est.evaluations == 1 + 60 + math.comb(60, 2)
    assert_close(est.values, weights)


# --------------------------------------------------------------------------- sampling

Estimator = Callable[..., ShapleyEstimate]


@pytest.fixture(scope="module")
def table12() -> tuple[Game, Tensor]:
    game = random_table(12, seed=0)
    return game, exact(game, 12).values


def mean_error(
    estimator: Estimator, game: Game, n: int, reference: Tensor, seeds: int, **options: object
) -> float:
    errors = [
        (estimator(game, n, seed=seed, **options).values - reference).abs().mean().item()
        for seed in range(seeds)
    ]
    return sum(errors) / len(errors)


@pytest.mark.parametrize(
    ("estimator", "budgets"),
    [
        pytest.param(permutation, [{"num_permutations": b} for b in (16, 64, 256)], id="perm"),
        pytest.param(surrogate, [{"num_permutations": b} for b in (16, 64, 256)], id="surrogate"),
        pytest.param(
            truncated_monte_carlo,
            [{"num_permutations": b, "truncation": 0.0} for b in (16, 64, 256)],
            id="tmc",
        ),
        pytest.param(adaptive, [{"tolerance": t} for t in (0.2, 0.1, 0.05)], id="adaptive"),
    ],
)
def test_sampling_error_shrinks_with_the_budget(
    estimator: Estimator, budgets: list[dict[str, object]], table12: tuple[Game, Tensor]
) -> None:
    game, reference = table12
    errors = [mean_error(estimator, game, 12, reference, seeds=5, **b) for b in budgets]
    # Seen: about 0.27, 0.14, 0.07 (permutation); 16x the budget should give about 4x less.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 2, errors


@pytest.mark.parametrize(
    ("estimator", "options"),
    [
        pytest.param(permutation, {"num_permutations": 30}, id="permutation"),
        pytest.param(surrogate, {"num_permutations": 16}, id="surrogate"),
        pytest.param(truncated_monte_carlo, {"truncation": 0.0}, id="tmc-0"),
        pytest.param(truncated_monte_carlo, {"truncation": 0.2}, id="tmc-0.2"),
        pytest.param(truncated_monte_carlo, {"truncation": 0.6}, id="tmc-0.6"),
    ],
)
@pytest.mark.parametrize(
    ("game", "n"),
    [
        pytest.param(random_table(10, seed=1), 10, id="random-table"),
        pytest.param(weighted_majority([5, 4, 3, 3, 2, 2, 1, 1, 1, 1], 12), 10, id="majority"),
        pytest.param(plus(pairwise(10, 2)[0], unanimity([1, 4, 7])), 10, id="pairwise+unanimity"),
    ],
)
def test_sampled_shapley_values_are_efficient(
    estimator: Estimator, options: dict[str, object], game: Game, n: int
) -> None:
    for seed in range(6):
        est = estimator(game, n, seed=seed, **options)
        assert math.isclose(est.values.sum().item(), gain(game, n), abs_tol=1e-9), seed


def test_truncation_saves_evaluations_on_a_monotone_game() -> None:
    game, n = weighted_majority([5, 4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1], 12), 12
    reference = exact(game, n).values
    plain = permutation(game, n, num_permutations=64, seed=3)
    # Values are 0 or 1: a walk stops at the first coalition worth exactly v(empty).
    truncated = truncated_monte_carlo(game, n, truncation=0.01, num_permutations=64, seed=3)
    assert truncated.evaluations < plain.evaluations
    # On a monotone game nothing below a losing coalition matters: the errors are alike.
    tmc_error = (truncated.values - reference).abs().mean()
    assert tmc_error < 2 * (plain.values - reference).abs().mean() + 1e-12


@pytest.mark.parametrize(
    ("estimator", "options", "seeds"),
    [
        pytest.param(permutation, {"num_permutations": 32}, 150, id="permutation"),
        pytest.param(surrogate, {"num_permutations": 32}, 30, id="surrogate"),
    ],
)
def test_standard_errors_give_nominal_coverage(
    estimator: Estimator, options: dict[str, object], seeds: int
) -> None:
    n = 8
    game = random_table(n, seed=2)
    reference = exact(game, n).values
    errors, stderrs = [], []
    for seed in range(seeds):
        est = estimator(game, n, seed=seed, **options)
        errors.append(est.values - reference)
        stderrs.append(est.stderr)
    error, stderr = torch.cat(errors).abs(), torch.cat(stderrs)
    assert torch.isfinite(stderr).all()
    coverage = (error <= 1.96 * stderr).double().mean().item()
    # Seen: 0.92-0.93 (t quantiles with 7-15 degrees of freedom sit a little above 1.96);
    # a stderr 2x too small covers 0.62-0.66, one 2x too large 0.996-1.0. The RMS ratio
    # (seen 0.99-1.02) checks the scale of the errors directly.
    assert 0.85 <= coverage <= 0.99, coverage
    ratio = (error.square().mean() / stderr.square().mean()).sqrt().item()
    assert 0.8 <= ratio <= 1.25, ratio


# --------------------------------------------------------------------------- band sampling


@functools.cache
def pairwise_band_reference(n: int, depth: int) -> tuple[Game, Tensor]:
    game = pairwise(n, seed=7)[0]
    return game, exact(game, n, "band", depth=depth).values


@pytest.mark.parametrize(
    ("estimator", "depth"),
    [(permutation, 1), (permutation, 2), (permutation, 3), (surrogate, 2)],
)
def test_band_sampling_converges_to_exact_band(estimator: Estimator, depth: int) -> None:
    n = 30
    game, reference = pairwise_band_reference(n, depth)
    errors = []
    for budget in (16, 256):
        runs = [
            estimator(game, n, "band", depth=depth, num_permutations=budget, seed=seed)
            for seed in range(4)
        ]
        for est in runs:
            assert est.evaluations <= 1 + budget * depth
        errors.append(sum((e.values - reference).abs().mean().item() for e in runs) / len(runs))
    assert errors[1] < errors[0] / 2, errors


def test_band_sampling_walks_only_the_band() -> None:
    n, depth, budget = 200, 2, 16
    sizes: list[int] = []

    def game(c: Tensor) -> Tensor:
        sizes.extend(c.sum(1).tolist())
        return c.to(F64) @ torch.arange(n, dtype=F64)

    est = permutation(game, n, "band", depth=depth, num_permutations=budget, seed=0)
    assert min(sizes) >= n - depth
    assert est.evaluations <= 1 + budget * depth


# --------------------------------------------------------------------------- seeds

SEEDED = [
    pytest.param(permutation, {}, id="permutation"),
    pytest.param(surrogate, {"num_permutations": 16}, id="surrogate"),
    pytest.param(truncated_monte_carlo, {"truncation": 0.1}, id="tmc"),
    pytest.param(adaptive, {"bottom_k": 2, "num_permutations": 64}, id="adaptive"),
    pytest.param(permutation, {"weighting": "band", "depth": 2}, id="permutation-band"),
    pytest.param(
        surrogate, {"weighting": "banzhaf", "num_permutations": 16}, id="surrogate-banzhaf"
    ),
]


@pytest.mark.parametrize(("estimator", "options"), SEEDED)
def test_same_seed_same_estimate_other_seed_other_estimate(
    estimator: Estimator, options: dict[str, object]
) -> None:
    game = random_table(9, seed=11)
    first = estimator(game, 9, seed=5, **options)
    again = estimator(game, 9, seed=5, **options)
    other = estimator(game, 9, seed=6, **options)
    assert torch.equal(first.values, again.values)
    assert torch.equal(first.stderr, again.stderr)
    assert first.evaluations == again.evaluations
    assert not torch.equal(first.values, other.values)


# --------------------------------------------------------------------------- adaptive


def separated_bottom_game(n: int) -> tuple[Game, set[int]]:
    """Players 11, 4, 7 are worth about 0.2, 0.5, 0.8; the rest 2 to 5; plus noise."""
    weights = 2 + 3 * torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=F64)
    bottom = [11, 4, 7]
    weights[bottom] = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    return plus(additive(weights.tolist()), scaled(random_table(n, seed=0), 0.3)), set(bottom)


@pytest.mark.parametrize("seed", range(4))
def test_adaptive_finds_the_bottom_k_before_the_budget_is_spent(seed: int) -> None:
    n, budget = 16, 8000
    game, bottom = separated_bottom_game(n)
    reference = exact(game, n).values
    assert set(torch.argsort(reference)[:3].tolist()) == bottom
    estimates = {
        bound: adaptive(
            game,
            n,
            bottom_k=3,
            bound=bound,
            num_permutations=None,
            max_evaluations=budget,
            seed=seed,
        )
        for bound in ("bernstein", "normal")
    }
    for est in estimates.values():
        assert set(torch.argsort(est.values)[:3].tolist()) == bottom
        # Every player got the minimum rounds before any stop was considered.
        assert est.samples.min() >= 8
    # Seen: 800-1000 evaluations with the Bernstein bound; the normal bound is tighter.
    assert estimates["bernstein"].evaluations < budget / 4
    assert estimates["normal"].evaluations <= estimates["bernstein"].evaluations


@pytest.mark.parametrize("tolerance", [0.2, 0.1])
def test_adaptive_stops_once_every_stderr_is_below_tolerance(
    tolerance: float, table12: tuple[Game, Tensor]
) -> None:
    game, _ = table12
    est = adaptive(game, 12, tolerance=tolerance, seed=0)
    assert (est.stderr < tolerance).all()
    # It stopped on the rule, not on a spent budget (2048 orderings could reach all
    # 4096 coalitions), and promptly: the last player settled just below the tolerance.
    assert est.evaluations < 0.8 * 2**12
    assert est.stderr.max() > tolerance / 2


# --------------------------------------------------------------------------- memoization


@pytest.mark.parametrize(
    ("estimator", "options"),
    [
        pytest.param(exact, {}, id="exact"),
        pytest.param(exact, {"weighting": "band", "depth": 3}, id="exact-band"),
        pytest.param(permutation, {"num_permutations": 200}, id="permutation"),
        pytest.param(surrogate, {"num_permutations": 64}, id="surrogate"),
        pytest.param(truncated_monte_carlo, {"truncation": 0.3}, id="tmc"),
        pytest.param(adaptive, {"bottom_k": 3}, id="adaptive"),
        pytest.param(permutation, {"weighting": "band", "depth": 2}, id="permutation-band"),
        pytest.param(permutation, {"num_permutations": None, "max_evaluations": 300}, id="budget"),
    ],
)
def test_each_coalition_is_evaluated_once_and_counted(
    estimator: Estimator, options: dict[str, object]
) -> None:
    n = 9
    game = random_table(n, seed=12)
    asked: list[bytes] = []

    def counting(coalitions: Tensor) -> Tensor:
        assert coalitions.dtype == torch.bool
        assert coalitions.ndim == 2
        assert coalitions.shape[1] == n
        asked.extend(bytes(row) for row in coalitions.to(torch.uint8).tolist())
        return game(coalitions)

    est = estimator(counting, n, **options)
    assert len(asked) == len(set(asked))
    assert est.evaluations == len(asked)
    # The memo does not change the answer.
    assert torch.equal(est.values, estimator(game, n, **options).values)


# --------------------------------------------------------------------------- errors

GAME4 = additive([1.0, 2.0, 3.0, 4.0])


def nan_game(c: Tensor) -> Tensor:
    values = c.to(F64).sum(1)
    return torch.where(c.sum(1) == 2, math.nan, values)


def inf_game(c: Tensor) -> Tensor:
    return torch.where(c.all(1), math.inf, 0.0).to(F64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: exact(GAME4, 0), r"n_players=0 .*integer of at least 1", id="exact-0"),
        pytest.param(lambda: permutation(GAME4, 0), r"n_players=0 ", id="permutation-0"),
        pytest.param(lambda: adaptive(GAME4, -3, tolerance=1.0), r"n_players=-3 ", id="adapt-neg"),
        pytest.param(
            lambda: permutation(GAME4, 4, num_permutations=0),
            r"num_permutations=0 .*integer of at least 1",
            id="perm-0",
        ),
        pytest.param(
            lambda: surrogate(GAME4, 4, num_permutations=-1),
            r"num_permutations=-1 .*integer of at least 1",
            id="surrogate-neg",
        ),
        pytest.param(
            lambda: truncated_monte_carlo(GAME4, 4, max_evaluations=0),
            r"max_evaluations=0 .*integer of at least 1",
            id="max-eval-0",
        ),
        pytest.param(
            lambda: permutation(GAME4, 4, num_permutations=None),
            r"num_permutations or max_evaluations",
            id="no-budget",
        ),
        pytest.param(
            lambda: exact(GAME4, 4, "owen"), r"weighting='owen' is not known", id="unknown"
        ),
        pytest.param(lambda: permutation(GAME4, 4, 3), r"weighting=3 ", id="not-a-string"),
        pytest.param(
            lambda: exact(GAME4, 4, "band"),
            r"depth=None is not allowed for weighting='band'",
            id="band-no-depth",
        ),
        pytest.param(
            lambda: permutation(GAME4, 4, "band", depth=0),
            r"depth=0 is not allowed for weighting='band'.*at least 1",
            id="band-depth-0",
        ),
        pytest.param(
            lambda: exact(GAME4, 4, "shapley", depth=2),
            r"depth=2 applies only to weighting='band'",
            id="shapley-depth",
        ),
        pytest.param(
            lambda: surrogate(GAME4, 4, "banzhaf", depth=1),
            r"depth=1 applies only to weighting='band'",
            id="banzhaf-depth",
        ),
        pytest.param(
            lambda: truncated_monte_carlo(GAME4, 4, truncation=1.5),
            r"truncation=1.5 .*\[0, 1\)",
            id="truncation-1.5",
        ),
        pytest.param(
            lambda: truncated_monte_carlo(GAME4, 4, truncation=-0.1),
            r"truncation=-0.1 ",
            id="truncation-neg",
        ),
        pytest.param(lambda: adaptive(GAME4, 4), r"needs a stop rule", id="no-stop-rule"),
        pytest.param(
            lambda: adaptive(GAME4, 4, bottom_k=1, bound="hoeffding"),
            r"bound='hoeffding' is not known; use one of \('bernstein', 'normal'\)",
            id="bound-unknown",
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, bottom_k=4), r"bottom_k=4 .*\[1, 4\)", id="bottom-k=n"
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, bottom_k=0), r"bottom_k=0 .*at least 1", id="bottom-k=0"
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, tolerance=0.0), r"tolerance=0.0 .*positive", id="tol-0"
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, bottom_k=1, confidence=1.0),
            r"confidence=1.0 .*\(0, 1\)",
            id="confidence-1",
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, bottom_k=1, min_rounds=1),
            r"min_rounds=1 ",
            id="min-rounds-1",
        ),
        pytest.param(
            lambda: surrogate(GAME4, 4, num_permutations=6),
            r"num_permutations=6 is too few for method=.surrogate.",
            id="surrogate-too-few",
        ),
        pytest.param(
            lambda: truncated_monte_carlo(GAME4, 4, truncation=None),
            r"truncation=None ",
            id="truncation-none",
        ),
        pytest.param(
            lambda: adaptive(GAME4, 4, tolerance="x"), r"tolerance='x' ", id="tolerance-str"
        ),
    ],
)
def test_bad_settings_are_refused(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


ONE_PER_COALITION = r"; it must return one number per coalition"


@pytest.mark.parametrize(
    "estimator", [exact, permutation, surrogate, truncated_monte_carlo, adaptive]
)
@pytest.mark.parametrize(
    ("game", "message"),
    [
        pytest.param(
            nan_game,
            r"returned nan for a coalition of 2 of 4 players; values must be finite",
            id="nan",
        ),
        pytest.param(
            inf_game,
            r"returned inf for a coalition of 4 of 4 players; values must be finite",
            id="inf",
        ),
        pytest.param(
            lambda c: c.to(F64),
            r"returned shape \(\d+, 4\) for \d+ coal.*" + ONE_PER_COALITION,
            id="2d",
        ),
        pytest.param(
            lambda c: c.to(F64).sum(1)[:-1],
            r"returned shape \(\d+,\) for \d+ coal.*" + ONE_PER_COALITION,
            id="short",
        ),
        pytest.param(
            lambda c: torch.tensor(1.0),
            r"returned shape \(\) for \d+ coal.*" + ONE_PER_COALITION,
            id="scalar",
        ),
    ],
)
def test_bad_value_functions_are_refused(estimator: Estimator, game: Game, message: str) -> None:
    options = {"bottom_k": 1} if estimator is adaptive else {}
    with pytest.raises(ValueError, match=message):
        estimator(game, 4, **options)
