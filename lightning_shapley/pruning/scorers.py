"""Importance criteria for a unit's channels, behind one interface.

Every scorer returns one number per channel of a unit, higher meaning more important,
so the callback prunes the lowest under the same schedule whatever the criterion: the
Shapley value (the default), leave-one-out (greedy elimination's criterion, measured by
really pruning each channel) and the usual baselines, L1 filter norm, BatchNorm
``|gamma|``, first-order Taylor and random. Channels already pruned score NaN.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_shapley.checks import check_int
from lightning_shapley.layers import Unit, by_channel, copies_of, kind_of
from lightning_shapley.model_io import call_model
from lightning_shapley.pruning.masking import copy_model, set_pruned_channels
from lightning_shapley.shapley.functional import estimate_channels
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.registry import default_method, resolve_estimator
from lightning_shapley.shapley.values import (
    LOSS,
    Batch,
    ValueFunction,
    ValueSetting,
    evaluate,
    negative_loss,
    resolve_value,
    scoring_mode,
)
from lightning_shapley.shapley.weighting import Weighting, resolve_weighting


@dataclass(frozen=True)
class ChannelScores:
    """Scores of a unit's channels.

    Attributes:
        values: float64 ``[n_channels]``, higher is more important; NaN where pruned.
        stderr: float64 ``[n_channels]``, the standard error of each score (0 for
            deterministic criteria).
        evaluations: coalition evaluations spent (Shapley only).
        seconds: wall-clock time spent scoring.
    """

    values: Tensor
    stderr: Tensor
    evaluations: int
    seconds: float


class Scorer(ABC):
    """Scores the channels of one unit on the scoring batches.

    Attributes:
        name: the scorer's name in settings and logs.
        takes_candidates: whether :meth:`score` can value some channels alone
            (``candidates=``), each as it counts in the network as it is, the others kept;
            the rounds then re-value only the channels near the cut (``rescore``).
    """

    name: str
    takes_candidates: bool = False

    @abstractmethod
    def score(
        self,
        model: nn.Module,
        unit: Unit,
        batches: Sequence[Batch],
        pruned: Tensor,
        candidates: Tensor | None = None,
    ) -> ChannelScores:
        """Scores of ``unit``'s channels; ``pruned`` (bool ``[n_channels]``) score NaN.

        With ``candidates`` (bool ``[n_channels]``, for a scorer that
        :attr:`takes_candidates`), only those are valued and the others score NaN too.
        """

    def check(self, unit: Unit) -> None:  # noqa: B027 (a hook: most scorers take any unit)
        """Raises ``ValueError`` if this scorer cannot score ``unit`` (checked before training)."""

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One pruning step: the model's units are scored again and again, round by round.

        A scorer may keep what it builds per unit for the length of the step (the Shapley
        scorer keeps each unit's game); by default nothing is kept.
        """
        yield


class CriterionScorer(Scorer):
    """A scorer whose criterion is one deterministic number per channel."""

    @abstractmethod
    def _values(self, model: nn.Module, unit: Unit, batches: Sequence[Batch]) -> Tensor:
        """One float per channel, higher is more important."""

    def score(
        self,
        model: nn.Module,
        unit: Unit,
        batches: Sequence[Batch],
        pruned: Tensor,
        candidates: Tensor | None = None,
    ) -> ChannelScores:
        """The criterion's values, NaN where ``pruned``, with zero standard errors.

        A criterion costs the same for one channel as for all, so all are valued.
        """
        start = time.perf_counter()
        values = self._values(model, unit, batches).detach().to("cpu", torch.float64)
        values = values.masked_fill(pruned.cpu(), float("nan"))
        stderr = torch.zeros_like(values).masked_fill(pruned.cpu(), float("nan"))
        return ChannelScores(values, stderr, 0, time.perf_counter() - start)


class ShapleyScorer(Scorer):
    """Shapley values of the unit's channels (see :func:`~lightning_shapley.shapley_values`).

    The game zeroes a channel outside the coalition at every producer and BatchNorm of the
    unit, as pruning it does, so units whose channels several layers produce (a residual
    add, an expand and a depthwise convolution) are scored like any other. Within a
    :meth:`step` each unit's game is built once and refreshed between rounds.

    Every setting is checked and resolved here, once; resolved objects (a
    :class:`~lightning_shapley.shapley.values.ValueFunction`, a
    :class:`~lightning_shapley.shapley.weighting.Weighting`) are taken as they are.

    Args:
        value: the coalition value, ``"loss"`` (default), ``"accuracy"``, a Metric or a
            callable.
        weighting: a name of :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS`.
        depth: the band's depth; ``None`` is 1 for the band.
        method: the estimator; ``None`` enumerates bands of depth up to
            :data:`~lightning_shapley.shapley.registry.EXACT_BAND_DEPTH` exactly and
            samples the rest (``"surrogate"``).
        num_permutations: the sampling budget (the sampling methods only).
        seed: seed of the sampling (the sampling methods only).
        **options: further estimator options, e.g. ``bottom_k`` for ``"adaptive"``.
    """

    name = "shapley"
    takes_candidates = True

    def __init__(
        self,
        value: ValueSetting | ValueFunction = "loss",
        weighting: str | Weighting = "shapley",
        depth: int | None = None,
        method: str | None = "surrogate",
        num_permutations: int = 32,
        seed: int = 0,
        **options: object,
    ) -> None:
        if weighting == "band" and depth is None:
            depth = 1
        #: The coalition-size weighting, resolved.
        self.weighting = resolve_weighting(weighting, depth)
        method = method or default_method(self.weighting)
        # Checked whatever the method, so a bad budget is never silently ignored.
        check_int("num_permutations", num_permutations, 1, optional=True)
        # Exact enumeration takes no budget and draws nothing at random.
        sampling = {} if method == "exact" else {"num_permutations": num_permutations, "seed": seed}
        #: The estimator with its options, resolved.
        self.estimator = resolve_estimator(method, sampling | options)
        #: The coalition value, resolved.
        self.value_function = resolve_value(value)
        self._games: dict[str, ChannelGame] | None = None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Keeps each unit's game for the step, so it is built once rather than every round."""
        self._games = {}
        try:
            yield
        finally:
            self._games = None

    def score(
        self,
        model: nn.Module,
        unit: Unit,
        batches: Sequence[Batch],
        pruned: Tensor,
        candidates: Tensor | None = None,
    ) -> ChannelScores:
        """Shapley values with their standard errors and the evaluations spent.

        With ``candidates`` the game is played among them, the other channels kept in
        every coalition (:meth:`ChannelGame.focus`): at the band of depth 1 each value is
        exactly the candidate's leave-one-out in the whole game.
        """
        game = self._game(model, unit, batches, pruned)
        try:
            game.focus(candidates)
            estimate = estimate_channels(game, self.weighting, self.estimator)
        finally:
            game.release()
        return ChannelScores(
            estimate.values, estimate.stderr, estimate.evaluations, estimate.seconds
        )

    def _game(
        self, model: nn.Module, unit: Unit, batches: Sequence[Batch], pruned: Tensor
    ) -> ChannelGame:
        """This step's game of ``unit``, brought up to date; a new one outside a step."""
        key = (unit.name, id(batches))
        game = None if self._games is None else self._games.get(key)
        if game is None:
            game = ChannelGame.from_unit(
                model, unit, batches, value=self.value_function, pruned=pruned
            )
            if self._games is not None:
                self._games[key] = game
        else:
            game.refresh(pruned)
        return game


class L1Scorer(CriterionScorer):
    """L1 norm of each channel's filter, summed over the unit's producers (Li et al., 2017)."""

    name = "l1"

    def _values(self, model: nn.Module, unit: Unit, batches: Sequence[Batch]) -> Tensor:
        norms = []
        for name in unit.producers:
            producer = model.get_submodule(name)
            dim = dict(kind_of(producer).parameters)["weight"]
            weight = producer.weight.detach().movedim(dim, 0)
            norms.append(by_channel(weight.abs(), unit.n_channels, copies_of(unit)).sum(1))
        return sum(norms)


class BatchNormScorer(CriterionScorer):
    """``|gamma|`` of the BatchNorm scaling each channel (Liu et al., 2017, network slimming)."""

    name = "bn_gamma"

    def check(self, unit: Unit) -> None:
        """Only units with a BatchNorm have a ``gamma``."""
        if not unit.batchnorms:
            raise ValueError(
                f"scorer='bn_gamma' needs a BatchNorm after unit {unit.name!r}, which has none; "
                "use 'shapley', 'l1', 'taylor' or 'random' for it"
            )

    def _values(self, model: nn.Module, unit: Unit, batches: Sequence[Batch]) -> Tensor:
        self.check(unit)
        return sum(model.get_submodule(name).weight.detach().abs() for name in unit.batchnorms)


class TaylorScorer(CriterionScorer):
    """First-order Taylor importance: ``|activation x gradient|`` of the loss, per channel.

    The activation is the unit's output after its BatchNorm, averaged over the scoring
    batches (Molchanov et al., 2017). Gradients are taken with respect to the activation
    only, so no parameter's ``.grad`` is touched.

    Args:
        value: reads the logits out of the model's output (its ``output_transform``);
            the loss is the cross-entropy whatever the value.
    """

    name = "taylor"

    def __init__(self, value: ValueFunction = LOSS) -> None:
        self._read_output = value.logits

    def _values(self, model: nn.Module, unit: Unit, batches: Sequence[Batch]) -> Tensor:
        site = model.get_submodule(unit.batchnorms[0] if unit.batchnorms else unit.name)
        captured: list[Tensor] = []

        def capture(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            leaf = output.detach().requires_grad_()
            captured.append(leaf)
            return leaf

        total = torch.zeros(unit.n_channels, dtype=torch.float64)
        copies = 1 if unit.batchnorms else copies_of(unit)  # the site's layout
        axis = kind_of(model.get_submodule(unit.name)).output_axis
        handle = site.register_forward_hook(capture)
        try:
            with scoring_mode(model), torch.enable_grad():
                for inputs, targets in batches:
                    captured.clear()
                    logits = self._read_output(call_model(model, inputs))
                    loss = -negative_loss(logits.unsqueeze(0), targets)[0]
                    (gradient,) = torch.autograd.grad(loss, captured[0])
                    contribution = (captured[0] * gradient).detach()
                    dims = [d for d in range(contribution.ndim) if d != axis % contribution.ndim]
                    per_feature = contribution.abs().sum(dims).double().cpu()
                    # A channel may span several features (a group, an attention head).
                    total += by_channel(per_feature, unit.n_channels, copies).sum(1)
        finally:
            handle.remove()
        return total / sum(len(targets) for _, targets in batches)


class RandomScorer(CriterionScorer):
    """Uniform random scores: the baseline any criterion must beat."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def _values(self, model: nn.Module, unit: Unit, batches: Sequence[Batch]) -> Tensor:
        return torch.rand(unit.n_channels, generator=self._generator, dtype=torch.float64)


class LeaveOneOutScorer(Scorer):
    r"""What removing each channel alone costs now: ``v(N) - v(N \ {i})``.

    Removing the lowest, one per round with the survivors re-scored, is greedy backward
    elimination, the strongest baseline for pruning. Each value is measured by pruning
    the channel for real (through :mod:`~lightning_shapley.pruning.masking`, on a copy of the
    model) and running the whole model, with none of the game's shortcuts: it is the
    reference the Shapley band at depth 1, the same quantity, is checked against.

    Args:
        value: the value of the network: ``"loss"`` (default), ``"accuracy"``, a Metric
            or a callable, as for the Shapley scorer.
    """

    name = "loo"
    takes_candidates = True

    def __init__(self, value: ValueSetting | ValueFunction = "loss") -> None:
        #: The value of the network, resolved.
        self.value_function = resolve_value(value)

    def score(
        self,
        model: nn.Module,
        unit: Unit,
        batches: Sequence[Batch],
        pruned: Tensor,
        candidates: Tensor | None = None,
    ) -> ChannelScores:
        """Each surviving channel's (or candidate's) leave-one-out value.

        One evaluation per channel valued, and one for the network as it is.
        """
        start = time.perf_counter()
        probe = copy_model(model)
        pruned = pruned.cpu()

        def value_without(channels: Tensor) -> float:
            set_pruned_channels(probe, unit, channels)
            return evaluate(probe, batches, self.value_function).value

        full = value_without(pruned)
        values = torch.full((unit.n_channels,), float("nan"), dtype=torch.float64)
        valued = ~pruned if candidates is None else ~pruned & candidates.cpu()
        survivors = valued.nonzero().flatten().tolist()
        for channel in survivors:
            alone = pruned.clone()
            alone[channel] = True
            values[channel] = full - value_without(alone)
        stderr = torch.zeros_like(values).masked_fill(~valued, float("nan"))
        return ChannelScores(values, stderr, len(survivors) + 1, time.perf_counter() - start)


SCORERS: dict[str, type[Scorer]] = {
    scorer.name: scorer
    for scorer in (
        ShapleyScorer,
        LeaveOneOutScorer,
        L1Scorer,
        BatchNormScorer,
        TaylorScorer,
        RandomScorer,
    )
}


#: The settings of the Shapley scorer that the callback takes beside ``scorer``, with the
#: callback's defaults: they configure a scorer named ``"shapley"``, and nothing else.
SHAPLEY_SETTINGS: dict[str, object] = {
    "weighting": "band",
    "depth": None,
    "method": None,
    "num_permutations": 32,
    "estimator_options": None,
}


def make_scorer(
    scorer: str | Scorer,
    *,
    value: ValueFunction,
    seed: int = 0,
    **shapley_settings: object,
) -> Scorer:
    """The scorer for the callback's settings: a name from :data:`SCORERS`, or an instance.

    Args:
        scorer: a name of :data:`SCORERS` or a :class:`Scorer`.
        value: the resolved value; the Shapley and leave-one-out scorers score with it.
        seed: seeds the Shapley sampling and the random scorer.
        **shapley_settings: the keys of :data:`SHAPLEY_SETTINGS`, for ``"shapley"``.

    The Shapley settings configure a scorer named ``"shapley"``; a sweep over scorer
    names may pass them to every scorer alike, and the others do without them.

    Raises:
        ValueError: an unknown name, or a setting given beside a scorer instance (which
            carries its own, so the setting would otherwise be ignored).
    """
    given = [
        f"{name}={setting!r}"
        for name, setting in shapley_settings.items()
        if setting != SHAPLEY_SETTINGS[name]
    ]
    if isinstance(scorer, Scorer):
        if seed != 0:
            given.append(f"seed={seed!r}")
        own = getattr(scorer, "value_function", None)
        if own is not None and value is not LOSS and value != own:
            given.append(f"value={value.name!r}")
        if given:
            raise ValueError(
                f"scorer={scorer!r} is a scorer instance, which carries its own settings, "
                f"but {', '.join(given)} were given as well; set them on the scorer instead"
            )
        return scorer
    if scorer not in SCORERS:
        raise ValueError(
            f"scorer={scorer!r} is not known; use one of {tuple(SCORERS)} or a Scorer instance"
        )
    if scorer == "shapley":
        settings = {**SHAPLEY_SETTINGS, **shapley_settings}
        options = dict(settings.pop("estimator_options") or {})
        return ShapleyScorer(value=value, seed=seed, **settings, **options)
    if scorer == "loo":
        return LeaveOneOutScorer(value)
    if scorer == "taylor":
        return TaylorScorer(value)
    return RandomScorer(seed) if scorer == "random" else SCORERS[scorer]()
