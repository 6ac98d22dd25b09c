r"""Coalition-size weightings: which coalitions a channel's value averages over.

Every value this package estimates is a *semivalue*: for player ``i`` of ``n``,

.. math::
    \phi_i = \sum_{S \subseteq N \setminus \{i\}} w(|S|)\,[v(S \cup \{i\}) - v(S)],

and the weighting is the function ``w``. A uniformly random ordering of the players puts
``i`` after a predecessor set of each size ``s`` with probability ``1/n``, so
``phi_i = E[lambda(s) * marginal]`` with the *size importance*
``lambda(s) = n * C(n-1, s) * w(s)``; the sampling estimators use ``lambda`` directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_shapley.checks import is_int

WEIGHTINGS = ("shapley", "banzhaf", "band")


@dataclass(frozen=True)
class Weighting:
    r"""A coalition-size weighting ``w(s)``.

    Args:
        name: ``"shapley"`` (the classic value, ``w(s) = s!(n-s-1)!/n!``), ``"banzhaf"``
            (``w(s) = 2^{1-n}``) or ``"band"`` (only coalitions within ``depth`` removals of
            the full set count: ``w(s) = 1 / (r C(n-1, s))`` for ``s >= n - r``, else 0).
        depth: the band's depth ``r`` (at least 1); ``None`` for the other weightings. A
            depth of ``n`` or more is the classic Shapley value; depth 1 is leave-one-out,
            ``v(N) - v(N \ {i})``.

    Example:
        >>> Weighting("band", depth=2).size_importance(4)
        tensor([0., 0., 2., 2.], dtype=torch.float64)
    """

    name: str = "shapley"
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.name not in WEIGHTINGS:
            raise ValueError(f"weighting={self.name!r} is not known; use one of {WEIGHTINGS}")
        if self.name == "band":
            if not is_int(self.depth) or self.depth < 1:
                raise ValueError(
                    f"depth={self.depth!r} is not allowed for weighting='band'; "
                    "it must be an integer of at least 1 (the number of removals counted)"
                )
        elif self.depth is not None:
            raise ValueError(
                f"depth={self.depth!r} applies only to weighting='band', not {self.name!r}; "
                "leave it unset"
            )

    def band_depth(self, n: int) -> int:
        """How many removals from the full set carry weight for ``n`` players."""
        return min(self.depth, n) if self.name == "band" else n

    def coalition_weights(self, n: int) -> Tensor:
        """``w(s)`` for ``s = 0 .. n-1`` (float64), the weight of one coalition of size ``s``."""
        # In log space: C(n-1, s) overflows float64 for a thousand players.
        return torch.exp(self.size_importance(n).log() - math.log(n) - _log_binomials(n - 1))

    def size_importance(self, n: int) -> Tensor:
        """``lambda(s) = n C(n-1, s) w(s)`` for ``s = 0 .. n-1``.

        The factor by which a marginal contribution after ``s`` predecessors counts when
        the orderings are uniformly random.
        """
        sizes = torch.arange(n, dtype=torch.float64)
        if self.name == "shapley":
            return torch.ones(n, dtype=torch.float64)
        if self.name == "banzhaf":
            return n * torch.exp(_log_binomials(n - 1) - (n - 1) * math.log(2.0))
        depth = self.band_depth(n)
        inside = torch.full((n,), n / depth, dtype=torch.float64)
        return torch.where(sizes >= n - depth, inside, torch.zeros_like(inside))

    def __str__(self) -> str:
        return f"band(depth={self.depth})" if self.name == "band" else self.name


def _log_binomials(m: int) -> Tensor:
    k = torch.arange(m + 1, dtype=torch.float64)
    return (
        torch.lgamma(torch.tensor(m + 1.0, dtype=torch.float64))
        - torch.lgamma(k + 1)
        - torch.lgamma(m - k + 1)
    )


def resolve_weighting(weighting: str | Weighting, depth: int | None = None) -> Weighting:
    """Turn ``("band", 2)`` or an existing :class:`Weighting` into a :class:`Weighting`."""
    if isinstance(weighting, Weighting):
        if depth is not None and depth != weighting.depth:
            raise ValueError(
                f"depth={depth!r} conflicts with the given weighting {weighting}; "
                "set the depth on the Weighting itself"
            )
        return weighting
    if not isinstance(weighting, str):
        raise ValueError(
            f"weighting={weighting!r} is not allowed; use one of {WEIGHTINGS} or a Weighting"
        )
    return Weighting(weighting, depth)
