"""Removing channels in rounds, with the survivors re-scored in between.

A score says what a channel is worth to the network as it is *now*; once some channels
are gone, the worth of the others changes (a channel that duplicated a removed one
becomes essential). Removing a pruning step's channels in small rounds and scoring the
survivors again after each round follows those changes: with leave-one-out scores
(``weighting="band", depth=1``) and one channel per round it is greedy backward
elimination. Interleaved, the units take their turns within a round, each scored with the
others at their current masks, so a layer sees what the layers before it gave up. After
each turn the BatchNorm statistics are re-estimated (``recalibration.py``), so the next
scores are measured on a network whose statistics fit it. By default a round values
afresh only the survivors near the cut (``rescore="near_cut"``); the others keep the
value they had, which is what lets a step cost less than the network grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_shapley.checks import is_int
from lightning_shapley.pruning.masking import prune_channels, pruned_channels
from lightning_shapley.pruning.recalibration import recalibrate_batchnorm
from lightning_shapley.pruning.scorers import ChannelScores, Scorer
from lightning_shapley.pruning.units import PrunableUnit
from lightning_shapley.shapley.values import Batch

SCOPES = ("layer", "global")
#: Which survivors a round re-values (see ``RoundPruner.rescore``).
RESCORING = ("near_cut", "all")
#: The key of the one quota of a global round, shared by all units.
_OVERALL = ""


def channels_to_prune(n_channels: int, sparsity: float) -> int:
    """How many of ``n_channels`` a ``sparsity`` removes (rounded down)."""
    return math.floor(sparsity * n_channels + 1e-9)


def check_rounds(scope: str, removal_step: object, interleave: object) -> None:
    """Raises a ``ValueError`` for settings of the rounds that do not go together.

    ``removal_step`` is a channel count, a fraction or ``None``; ``interleave`` a bool or
    ``None`` (left to the scope), and ``True`` only for the layer scope.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not known; use one of {SCOPES}")
    allowed = (
        removal_step is None
        or (is_int(removal_step) and removal_step >= 1)
        or (isinstance(removal_step, float) and 0.0 < removal_step < 1.0)
    )
    if not allowed:
        raise ValueError(
            f"removal_step={removal_step!r} is not allowed; use a number of channels per unit "
            "and round (an integer of at least 1), a fraction of each unit's channels in "
            "(0, 1), or None to remove a step's channels at once"
        )
    if interleave is not None and not isinstance(interleave, bool):
        raise ValueError(f"interleave={interleave!r} is not allowed; use True, False or None")
    if interleave and scope == "global":
        raise ValueError(
            "interleave=True does not apply to scope='global', whose rounds rank all units "
            "together; use interleave=False or scope='layer'"
        )


@dataclass
class RoundPruner:
    """Prunes units to a target sparsity in rounds of scoring, removal and recalibration.

    Args:
        units: the prunable units.
        scorer: scores a unit's surviving channels (higher is more important).
        scope: ``"layer"`` (the target in each unit) or ``"global"`` (over all units, one
            ranking across them).
        min_channels: channels every unit keeps.
        removal_step: channels a round removes from each unit (an int), a fraction of
            each unit's channels (a float in (0, 1); with the global scope, of all units'
            channels), or ``None`` for everything in one round.
        interleave: the units take turns within a round, each scored after the ones
            before it were pruned (layer scope only); otherwise all are scored on the
            same network and pruned together.
        rescore: which survivors a round values again. ``"all"`` re-values every one:
            with leave-one-out scores, exact greedy elimination, the reference.
            ``"near_cut"`` (layer scope, with a scorer that
            :attr:`~lightning_shapley.pruning.scorers.Scorer.takes_candidates`) values
            every survivor in a step's first round; later rounds value afresh the lowest
            by their last values (:func:`first_pool` of them), then every channel whose
            older value lies within :data:`TRUST_MARGIN` times the largest move of the
            fresh ones above the cut, until no older value is that close: values that
            moved far make more of them doubtful. Older values do move, so this is not
            exact greedy; ``benchmarks/quality.py`` and ``benchmarks/scale.py`` measure
            how often it chooses as exact greedy does, how well the network it leaves
            does, and at what share of the evaluations. The global scope always
            re-values all.
        recalibrate_each_turn: re-estimate the BatchNorm statistics after every unit's
            turn, so each unit is scored on statistics that fit the network as it is; with
            ``False``, once per round. On the digits CNN, one-shot, per turn kept 98.9 /
            95.7 / 88.8 / 63.8% test accuracy at 25 / 50 / 62.5 / 75% sparsity against
            98.0 / 93.7 / 85.5 / 57.6% per round (mean of 3 seeds).

    Example:
        >>> from lightning_shapley.pruning.scorers import L1Scorer
        >>> from lightning_shapley.pruning.units import find_units
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> units = find_units(net, torch.randn(2, 4))
        >>> pruner = RoundPruner(units, L1Scorer(), removal_step=2)
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> _ = pruner.prune(net, batches, target=0.5)
        >>> int(pruned_channels(net, units[0]).sum())
        4
    """

    units: Sequence[PrunableUnit]
    scorer: Scorer
    scope: str = "layer"
    min_channels: int = 1
    removal_step: int | float | None = None
    interleave: bool = False
    recalibrate_each_turn: bool = True
    rescore: str = "near_cut"

    def __post_init__(self) -> None:
        check_rounds(self.scope, self.removal_step, self.interleave)
        if self.rescore not in RESCORING:
            raise ValueError(f"rescore={self.rescore!r} is not known; use one of {RESCORING}")

    def check_amount(self, amount: float | None) -> None:
        """Raises a ``ValueError`` if ``amount`` would leave a unit below ``min_channels``.

        A global ranking decides per unit later, and can always keep ``min_channels``; a
        schedule with no final amount (``None``, a search) is capped as it goes.
        """
        for unit in self.units:
            layer_amount = amount if self.scope == "layer" and amount is not None else 0.0
            kept = unit.n_channels - channels_to_prune(unit.n_channels, layer_amount)
            if kept < self.min_channels:
                raise ValueError(
                    f"amount={amount} would leave unit {unit.name!r} with {kept} of its "
                    f"{unit.n_channels} channels, fewer than min_channels={self.min_channels}; "
                    "lower amount or min_channels, or leave the unit out with layers="
                )

    def remaining(self, model: nn.Module, target: float) -> int:
        """Channels still to remove to reach ``target`` (as far as min_channels allows)."""
        return sum(self._quota(target, self._current(model), whole=True).values())

    def prune(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        target: float,
        recalibration_inputs: Sequence[Tensor] = (),
        *,
        combine: Callable[[dict[str, ChannelScores]], dict[str, ChannelScores]] | None = None,
        agree: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        after_recalibration: Callable[[], None] | None = None,
        progress: Callable[[int], object] | None = None,
    ) -> dict[str, ChannelScores]:
        """Removes channels until every unit (or all together) reaches ``target``.

        Args:
            model: the model; its masks grow cumulatively (``masking.prune_channels``).
            batches: the scoring batches, ``(inputs, targets)``.
            target: the sparsity to reach.
            recalibration_inputs: training inputs the BatchNorm statistics are
                re-estimated on after each turn (see ``recalibrate_each_turn``); empty to
                leave them alone.
            combine: turns the scores of a turn into the ones to act on (under DDP, the
                mean over the processes).
            agree: turns a plan into the one to apply (under DDP, rank zero's).
            after_recalibration: called after each re-estimation (under DDP, averages the
                statistics over the processes).
            progress: called with the number of channels each turn removed.

        Returns:
            Each unit's latest score of every channel in this call (for a removed channel,
            the score it was removed on; NaN for channels never scored), with the
            evaluations and seconds of all rounds added up.
        """
        latest = {unit.name: _unscored(unit.n_channels) for unit in self.units}
        # The scorer may keep what it builds per unit (a game) for the whole step.
        with self.scorer.step():
            current = self._current(model)
            while True:
                quota = self._quota(target, current, whole=self.removal_step is None)
                busy = [u for u in self.units if quota.get(u.name, quota.get(_OVERALL, 0)) > 0]
                if not busy:
                    break
                removed = 0
                for turn in [[unit] for unit in busy] if self.interleave else [busy]:
                    scores = {
                        unit.name: self._score(
                            model, unit, batches, current[unit.name], latest[unit.name],
                            quota.get(unit.name), combine,
                        )
                        for unit in turn
                    }  # fmt: skip
                    self._check_finite(scores, current)
                    plan = self._plan(quota, current, scores)
                    if agree is not None:
                        plan = agree(plan)
                    for unit in turn:
                        new = plan[unit.name]
                        if new.any():
                            current[unit.name] = current[unit.name] | new
                            prune_channels(model, unit, current[unit.name])
                        latest[unit.name] = _merged(latest[unit.name], scores[unit.name])
                    turn_removed = sum(int(new.sum()) for new in plan.values())
                    removed += turn_removed
                    if progress is not None:
                        progress(turn_removed)
                    if self.recalibrate_each_turn:
                        self._recalibrate(model, recalibration_inputs, after_recalibration)
                if not self.recalibrate_each_turn:
                    self._recalibrate(model, recalibration_inputs, after_recalibration)
                if removed == 0:
                    break  # min_channels holds every unit back: nothing more can go
        return latest

    def _score(
        self,
        model: nn.Module,
        unit: PrunableUnit,
        batches: Sequence[Batch],
        pruned: Tensor,
        known: ChannelScores,
        quota: int | None,
        combine: Callable[[dict[str, ChannelScores]], dict[str, ChannelScores]] | None,
    ) -> ChannelScores:
        """The unit's scores for this round: every survivor's, or fresh ones near the cut."""

        def score(candidates: Tensor | None) -> ChannelScores:
            # A scorer written before candidates existed takes four arguments.
            scores = (
                self.scorer.score(model, unit, batches, pruned)
                if candidates is None
                else self.scorer.score(model, unit, batches, pruned, candidates)
            )
            return scores if combine is None else combine({unit.name: scores})[unit.name]

        lazy = self.rescore == "near_cut" and self.scorer.takes_candidates and quota is not None
        if not lazy or known.values[~pruned].isnan().any():
            return score(None)
        values, stderr = known.values.clone(), known.stderr.clone()
        values[pruned], stderr[pruned] = math.nan, math.nan
        fresh = torch.zeros_like(pruned)
        evaluations, seconds, pool = 0, 0.0, first_pool(quota, int((~pruned).sum()))
        margin = 0.0  # how far above the cut an older value must lie to be trusted
        while True:
            lowest = ascending_unpruned(values)
            cut = values[lowest[quota - 1]]
            # Older values at most ``margin`` above the cut may have moved below it.
            doubtful = ~fresh & ~values.isnan() & (values <= cut + margin)
            if not doubtful.any():
                break
            candidates = torch.zeros_like(pruned)
            candidates[lowest[:pool]] = True
            candidates = (candidates | doubtful) & ~fresh
            scores = score(candidates)
            moved = (scores.values[candidates] - values[candidates]).abs().max()
            margin = max(margin, TRUST_MARGIN * float(moved))
            values[candidates] = scores.values[candidates]
            stderr[candidates] = scores.stderr[candidates]
            fresh |= candidates
            evaluations, seconds = evaluations + scores.evaluations, seconds + scores.seconds
            pool *= 2  # the cut moved past the pool: look further
        return ChannelScores(values, stderr, evaluations, seconds)

    def _check_finite(self, scores: dict[str, ChannelScores], current: dict[str, Tensor]) -> None:
        """Raises a ``ValueError`` if a channel in play scored NaN or infinity."""
        for name, unit_scores in scores.items():
            bad = ~torch.isfinite(unit_scores.values) & ~current[name]
            if bad.any():
                raise ValueError(
                    f"scorer {self.scorer.name!r} gave {int(bad.sum())} channels of unit "
                    f"{name!r} a score of NaN or infinity (channels "
                    f"{bad.nonzero().flatten().tolist()[:8]}); scores must be finite: check "
                    "the value function and the model's outputs"
                )

    @staticmethod
    def _recalibrate(
        model: nn.Module, inputs: Sequence[Tensor], after: Callable[[], None] | None
    ) -> None:
        if inputs and recalibrate_batchnorm(model, inputs) and after is not None:
            after()

    def _current(self, model: nn.Module) -> dict[str, Tensor]:
        return {unit.name: pruned_channels(model, unit) for unit in self.units}

    def _quota(self, target: float, current: dict[str, Tensor], whole: bool) -> dict[str, int]:
        """Channels the next round removes: per unit, or overall (key ``_OVERALL``)."""
        if self.scope == "global":
            total = sum(unit.n_channels for unit in self.units)
            left = channels_to_prune(total, target) - sum(int(p.sum()) for p in current.values())
            room = sum(
                unit.n_channels - self.min_channels - int(current[unit.name].sum())
                for unit in self.units
            )
            left = min(left, room)
            step = left if whole else self.round_size(total, len(self.units))
            return {_OVERALL: max(min(step, left), 0)}
        quota = {}
        for unit in self.units:
            wanted = min(
                channels_to_prune(unit.n_channels, target), unit.n_channels - self.min_channels
            )
            left = wanted - int(current[unit.name].sum())
            step = left if whole else self.round_size(unit.n_channels)
            quota[unit.name] = max(min(step, left), 0)
        return quota

    def round_size(self, n_channels: int, n_units: int = 1) -> int:
        """Channels one round removes from ``n_channels`` belonging to ``n_units`` units.

        With ``removal_step=None`` a round removes all of them.
        """
        if self.removal_step is None:
            return n_channels
        if isinstance(self.removal_step, float):
            return max(1, math.floor(self.removal_step * n_channels + 1e-9))
        return self.removal_step * n_units

    def _plan(
        self, quota: dict[str, int], current: dict[str, Tensor], scores: dict[str, ChannelScores]
    ) -> dict[str, Tensor]:
        """Which of the scored units' channels go now: the lowest scores, up to the quota."""
        plan = {name: torch.zeros_like(current[name]) for name in scores}
        if _OVERALL not in quota:
            for name, unit_scores in scores.items():
                plan[name][ascending_unpruned(unit_scores.values)[: quota[name]]] = True
            return plan
        needed = quota[_OVERALL]
        candidates = sorted(
            (float(unit_scores.values[c]), name, c)
            for name, unit_scores in scores.items()
            for c in ascending_unpruned(unit_scores.values).tolist()
        )
        left = {name: len(current[name]) - int(current[name].sum()) for name in scores}
        for _, name, channel in candidates:
            if needed <= 0:
                break
            if left[name] > self.min_channels:
                plan[name][channel] = True
                left[name] -= 1
                needed -= 1
        return plan


#: An older value is trusted only this far above the cut, in units of the largest move of
#: the values valued afresh in the round: values that moved far make the older ones doubtful.
TRUST_MARGIN = 0.3


def first_pool(quota: int, survivors: int) -> int:
    """How many of the lowest survivors a lazy round values first.

    Twice the quota, or 1.5 times the square root of the survivors where that is more.
    The square root keeps a margin below the cut in small units, where a round removes a
    single channel, and a shrinking share of large ones. With this pool alone (no
    margin), on 3 seeds at 50% one-shot, a pool of twice the quota lost 2.8 points of test
    accuracy on the 1-D signals CNN against exact greedy; this one none (84.0 against 83.6).
    """
    return max(2 * quota, math.ceil(1.5 * math.sqrt(survivors)))


def ascending_unpruned(values: Tensor) -> Tensor:
    """Indices of the channels still in play (finite score), lowest score first."""
    order = torch.argsort(values.nan_to_num(nan=math.inf), stable=True)
    return order[: int(torch.isfinite(values).sum())]


def _unscored(n_channels: int) -> ChannelScores:
    nan = torch.full((n_channels,), math.nan, dtype=torch.float64)
    return ChannelScores(nan, nan.clone(), 0, 0.0)


def _merged(earlier: ChannelScores, later: ChannelScores) -> ChannelScores:
    """Each channel's latest score; evaluations and seconds add up."""
    scored = ~later.values.isnan()
    return ChannelScores(
        torch.where(scored, later.values, earlier.values),
        torch.where(scored, later.stderr, earlier.stderr),
        earlier.evaluations + later.evaluations,
        earlier.seconds + later.seconds,
    )
