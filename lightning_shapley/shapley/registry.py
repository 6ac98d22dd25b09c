"""The estimators by name, and an estimator resolved with its options.

:func:`resolve_estimator` turns a ``method`` setting and its options into an
:class:`Estimator`, checking every option as the setting enters; :func:`default_method`
is the policy for ``method=None``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lightning_shapley.shapley.estimators import (
    ShapleyEstimate,
    ValueFunction,
    adaptive,
    exact,
    permutation,
    surrogate,
    truncated_monte_carlo,
)
from lightning_shapley.shapley.options import check_options
from lightning_shapley.shapley.weighting import Weighting

#: The estimators by the name ``method`` takes.
ESTIMATORS: dict[str, Callable[..., ShapleyEstimate]] = {
    "exact": exact,
    "permutation": permutation,
    "surrogate": surrogate,
    "tmc": truncated_monte_carlo,
    "adaptive": adaptive,
}
#: Bands up to this depth are enumerated exactly by default: ``1 + n + C(n, 2)`` coalitions.
EXACT_BAND_DEPTH = 2


def default_method(weighting: Weighting) -> str:
    """``"exact"`` for a band shallow enough to enumerate, ``"surrogate"`` otherwise.

    Example:
        >>> default_method(Weighting("band", depth=1)), default_method(Weighting("shapley"))
        ('exact', 'surrogate')
    """
    shallow = weighting.name == "band" and weighting.depth <= EXACT_BAND_DEPTH
    return "exact" if shallow else "surrogate"


@dataclass(frozen=True)
class Estimator:
    """An estimator with its options, checked: call it with a value function and a weighting.

    Make one with :func:`resolve_estimator`.

    Attributes:
        method: a name of :data:`ESTIMATORS`.
        options: its keyword options (budget, seed, stop rule...).
    """

    method: str
    options: Mapping[str, object]

    def __call__(
        self, value_fn: ValueFunction, n_players: int, weighting: Weighting
    ) -> ShapleyEstimate:
        """The estimate of the game ``value_fn`` of ``n_players`` under ``weighting``."""
        return ESTIMATORS[self.method](value_fn, n_players, weighting, **self.options)

    def __str__(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        return f"{self.method}({options})"


def resolve_estimator(method: str | Estimator, options: Mapping[str, object]) -> Estimator:
    """The estimator named ``method`` with ``options``, every option checked now.

    A resolved :class:`Estimator` is returned as it is (``options`` must then be empty).

    Raises:
        ValueError: an unknown method, an option it does not take, or a value it cannot
            take (naming the option, the value and what is allowed).

    Example:
        >>> resolve_estimator("adaptive", {"num_permutations": 64})
        Traceback (most recent call last):
        ...
        ValueError: method='adaptive' needs a stop rule: set bottom_k, tolerance or both
    """
    if isinstance(method, Estimator):
        if options:
            raise ValueError(
                f"{sorted(options)} were given beside the resolved estimator {method}; "
                "set the options on the Estimator itself"
            )
        return method
    if method not in ESTIMATORS:
        raise ValueError(f"method={method!r} is not known; use one of {tuple(ESTIMATORS)}")
    parameters = inspect.signature(ESTIMATORS[method]).parameters
    allowed = [
        name
        for name, parameter in parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name != "depth"
    ]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown} are not options of method={method!r}; it takes {allowed}")
    defaults = {name: parameters[name].default for name in allowed}
    check_options(method, **(defaults | dict(options)))
    return Estimator(method, dict(options))


# --------------------------------------------------------------------------- checks
