"""The options of the estimators, checked where a setting enters.

:func:`check_options` holds every rule that does not depend on the number of players, so
that the callback, ``shapley_values`` and the estimators themselves refuse a bad option
with one message before any coalition is evaluated.
"""

from __future__ import annotations

import math

from lightning_shapley.checks import check_int, is_int, is_real
from lightning_shapley.shapley.sampling import BOUNDS


def check_options(method: str, **options: object) -> None:
    """Raises a ``ValueError`` for an option value ``method`` cannot take.

    Only what holds whatever the number of players is checked here, so that a setting
    fails where it enters; the estimators check the rest (``bottom_k < n``) themselves.
    """
    for name in ("num_permutations", "max_evaluations"):
        if name in options:
            check_int(name, options[name], 1, optional=True)
    if "surrogate_permutations" in options:
        check_int("surrogate_permutations", options["surrogate_permutations"], 1)
    if "seed" in options and not is_int(options["seed"]):
        raise ValueError(f"seed={options['seed']!r} is not allowed; it must be an integer")
    if options.get("num_permutations", 0) is None and options.get("max_evaluations") is None:
        raise ValueError(
            f"method={method!r} needs a budget: give num_permutations or max_evaluations "
            "(both are None)"
        )
    if method == "surrogate" and _too_few_for_surrogate(options.get("num_permutations")):
        raise ValueError(
            f"num_permutations={options['num_permutations']!r} is too few for "
            "method='surrogate': it needs 8 orderings (4 antithetic pairs, two per half), "
            "so num_permutations of at least 7"
        )
    if "truncation" in options:
        truncation = options["truncation"]
        if not (is_real(truncation) and 0.0 <= truncation < 1.0):
            raise ValueError(f"truncation={truncation!r} is not allowed; it must lie in [0, 1)")
    if method == "adaptive":
        _check_adaptive(**options)


def _too_few_for_surrogate(num_permutations: object) -> bool:
    return is_int(num_permutations) and math.ceil(num_permutations / 2) < 4


def _check_adaptive(
    bottom_k: object = None,
    tolerance: object = None,
    confidence: object = 0.95,
    bound: object = "bernstein",
    min_rounds: object = 8,
    **_budget: object,
) -> None:
    if bottom_k is None and tolerance is None:
        raise ValueError("method='adaptive' needs a stop rule: set bottom_k, tolerance or both")
    check_int("bottom_k", bottom_k, 1, optional=True)
    if tolerance is not None and not (is_real(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance={tolerance!r} is not allowed; it must be positive")
    if not (is_real(confidence) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence={confidence!r} is not allowed; it must lie in (0, 1)")
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is not known; use one of {tuple(BOUNDS)}")
    check_int("min_rounds", min_rounds, 2)


def check_players(n_players: int) -> None:
    """Raises a ``ValueError`` unless ``n_players`` is a positive integer."""
    check_int("n_players", n_players, 1)
