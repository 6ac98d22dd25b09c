"""Pruning schedules: at which epochs to prune, and to what sparsity.

A schedule knows nothing of models or Lightning. The pruning callback asks it at the end of
every training epoch (0-based, ``trainer.current_epoch``) for a *target*: the fraction of a
unit's channels that should be removed once this epoch's step is done, or ``None`` for no
step now. Targets are cumulative sparsities, not increments.

Example:
    >>> schedule = make_schedule(0.5, epochs=[2, 4, 6], ramp="linear")
    >>> [schedule.target(epoch) for epoch in range(7)]
    [None, None, 0.16666666666666666, None, 0.3333333333333333, None, 0.5]
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from lightning_shapley.checks import is_int, is_real

RAMPS = ("cubic", "linear")


@runtime_checkable
class PruningSchedule(Protocol):
    """What the pruning callback needs from a schedule."""

    def target(self, epoch: int) -> float | None:
        """Sparsity to reach at the end of ``epoch`` (0-based), or ``None`` for no step now."""
        ...

    def validate(self, max_epochs: int | None) -> None:
        """Raise ``ValueError`` before training if the schedule cannot run in ``max_epochs``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold for a resumed run to continue the schedule."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@dataclass(frozen=True)
class OneShot:
    """Prune once, straight to ``amount``, at the end of ``epoch``.

    Args:
        amount: the sparsity to reach, in ``[0, 1)``.
        epoch: the 0-based epoch at whose end the step runs.

    Example:
        >>> [OneShot(0.5, epoch=1).target(epoch) for epoch in range(3)]
        [None, 0.5, None]
    """

    amount: float
    epoch: int = 0

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        object.__setattr__(self, "epoch", _check_epoch("epoch", self.epoch))

    def target(self, epoch: int) -> float | None:
        """``amount`` at the scheduled epoch, ``None`` at every other."""
        return self.amount if epoch == self.epoch else None

    def validate(self, max_epochs: int | None) -> None:
        """Fail if the step's epoch never ends within ``max_epochs``."""
        _check_within("epoch", self.epoch, self.epoch, max_epochs)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: a one-shot schedule is stateless."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


@dataclass(frozen=True)
class Gradual:
    r"""Prune in steps at the listed epochs, ramping the sparsity up to ``amount``.

    The ``k``-th of ``K`` steps has progress ``t = k / K`` and targets
    ``amount * (1 - (1 - t)^3)`` with the cubic ramp of Zhu & Gupta (2017), "To prune, or
    not to prune", which removes many channels early, while the network is redundant, and
    few near the end; or ``amount * t`` with the linear ramp. The last step reaches
    ``amount`` exactly.

    Args:
        amount: the final sparsity, in ``[0, 1)``.
        epochs: strictly increasing 0-based epochs at whose end a step runs.
        ramp: ``"cubic"`` or ``"linear"``.

    Example:
        >>> schedule = Gradual(0.64, epochs=(0, 2, 4, 6))
        >>> [round(schedule.target(epoch), 4) for epoch in schedule.epochs]
        [0.37, 0.56, 0.63, 0.64]
        >>> schedule.target(1) is None
        True
    """

    amount: float
    epochs: tuple[int, ...]
    ramp: str = "cubic"

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        object.__setattr__(self, "epochs", _check_epochs(self.epochs))
        _check_ramp(self.ramp)

    def target(self, epoch: int) -> float | None:
        """The ramp's sparsity at a listed epoch, ``None`` at every other."""
        if epoch not in self.epochs:
            return None
        progress = (self.epochs.index(epoch) + 1) / len(self.epochs)
        if self.ramp == "linear":
            return self.amount * progress
        return self.amount * (1.0 - (1.0 - progress) ** 3)

    def validate(self, max_epochs: int | None) -> None:
        """Fail if the last listed epoch never ends within ``max_epochs``."""
        _check_within("epochs", self.epochs, self.epochs[-1], max_epochs)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the targets depend on the epoch alone."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class MiddleOfTraining:
    """A :class:`Gradual` ramp over the middle third of training, set from ``max_epochs``.

    What the callback does when no ``epochs`` are given: a model is pruned once it has
    learned something, and fine-tuned for the last third. The steps end the epochs after
    which between one third and two thirds of ``max_epochs`` have been trained, at most
    :attr:`MAX_STEPS` of them, evenly spread; with ``max_epochs=1`` the one step ends the
    only epoch. The epochs are fixed by :meth:`validate`, which the callback calls when
    fit sets up.

    Example:
        >>> schedule = MiddleOfTraining(0.5)
        >>> schedule.validate(max_epochs=10)
        >>> schedule.epochs
        (3, 4, 5)
        >>> MiddleOfTraining.epochs_for(30)
        (9, 11, 14, 17, 19)
    """

    #: The most steps the ramp takes, however long the training.
    MAX_STEPS = 5

    def __init__(self, amount: float, ramp: str = "cubic") -> None:
        _check_amount(amount)
        _check_ramp(ramp)
        self.amount, self.ramp = float(amount), ramp
        self._gradual: Gradual | None = None

    @classmethod
    def epochs_for(cls, max_epochs: int) -> tuple[int, ...]:
        """The 0-based epochs at whose end the steps run, for ``max_epochs`` epochs."""
        first = max(1, -(-max_epochs // 3))  # epochs trained at the first step
        last = max(first, min(2 * max_epochs // 3, max_epochs - 1))
        count = min(cls.MAX_STEPS, last - first + 1)
        if count == 1:
            return (min(first, max_epochs) - 1,)
        span = last - first
        return tuple(sorted({first - 1 + round(i * span / (count - 1)) for i in range(count)}))

    @property
    def epochs(self) -> tuple[int, ...]:
        """The epochs of the steps, once :meth:`validate` has set them."""
        if self._gradual is None:
            raise RuntimeError("the epochs are set from max_epochs by validate(max_epochs)")
        return self._gradual.epochs

    def target(self, epoch: int) -> float | None:
        """The ramp's sparsity at a step's epoch, ``None`` at every other."""
        return None if self._gradual is None else self._gradual.target(epoch)

    def validate(self, max_epochs: int | None) -> None:
        """Sets the steps from ``max_epochs``; fails when training has no end to take a third of."""
        if max_epochs is None or not is_int(max_epochs) or max_epochs < 1:
            raise ValueError(
                f"epochs=None spreads the pruning steps over the middle third of training, but "
                f"the trainer's max_epochs={max_epochs!r} sets no end; give epochs= (the 0-based "
                "epochs at whose end to prune) or a max_epochs"
            )
        self._gradual = Gradual(self.amount, self.epochs_for(int(max_epochs)), self.ramp)

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the steps follow from ``max_epochs`` again when a resumed fit sets up."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""

    def __repr__(self) -> str:
        return f"MiddleOfTraining(amount={self.amount}, ramp={self.ramp!r})"


class Decision(enum.Enum):
    """What :meth:`UntilDrop.record` tells the callback to do."""

    CONTINUE = "continue"
    ROLL_BACK_AND_STOP = "roll_back_and_stop"


class UntilDrop:
    """Raise the sparsity step by step until the validation metric drops: the critical threshold.

    From ``start_epoch`` on, each epoch proposes ``step`` more sparsity than the last
    (``step, 2 step, ...``, capped at ``max_amount``). The callback drives it as a state
    machine: after a proposed sparsity has been applied and validated, it passes the metric
    to :meth:`record` (higher is better: pass accuracy, or the negative loss). Once the
    metric falls more than ``tolerance`` below the dense model's (or is NaN), ``record``
    answers :attr:`Decision.ROLL_BACK_AND_STOP`: the callback restores the masks of
    :attr:`final_amount`, the last sparsity that held, and :meth:`target` returns ``None``
    from then on. Reaching ``max_amount`` with the metric held also stops it.

    Epochs without a ``record`` (validation did not run) still raise the target; a later
    drop then rolls back to the last sparsity that was recorded as holding.

    Args:
        step: sparsity added per epoch, in ``(0, 1)``.
        tolerance: the largest allowed drop below the dense metric, at least 0, in the
            metric's units.
        max_amount: the sparsity at which the search ends, in ``(0, 1)``.
        start_epoch: the 0-based epoch at whose end the first step runs.

    Example:
        >>> schedule = UntilDrop(step=0.25, tolerance=0.01)
        >>> schedule.target(0)
        0.25
        >>> schedule.record(metric=0.97, dense_metric=0.97)
        <Decision.CONTINUE: 'continue'>
        >>> schedule.target(1)
        0.5
        >>> schedule.record(metric=0.90, dense_metric=0.97)
        <Decision.ROLL_BACK_AND_STOP: 'roll_back_and_stop'>
        >>> schedule.final_amount, schedule.target(2)
        (0.25, None)
    """

    def __init__(
        self, step: float, tolerance: float, max_amount: float = 0.95, start_epoch: int = 0
    ) -> None:
        _check_fraction("step", step, "(0, 1) (the sparsity added per epoch)")
        if not is_real(tolerance) or not tolerance >= 0:
            raise ValueError(
                f"tolerance={tolerance!r} is not allowed; it must be a number of at least 0 "
                "(the largest allowed drop below the dense metric)"
            )
        _check_fraction("max_amount", max_amount, "(0, 1) (the sparsity at which to stop)")
        self.step = float(step)
        self.tolerance = float(tolerance)
        self.max_amount = float(max_amount)
        self.start_epoch = _check_epoch("start_epoch", start_epoch)
        self._proposed = 0  # steps proposed so far
        self._held = 0  # steps whose metric was recorded as holding
        self._last_epoch: int | None = None  # epoch of the latest proposal
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether the search has ended (rolled back, or held at ``max_amount``)."""
        return self._stopped

    @property
    def final_amount(self) -> float | None:
        """The sparsity the search settled at; ``None`` while it is still running."""
        return self._amount(self._held) if self._stopped else None

    def target(self, epoch: int) -> float | None:
        """Propose the next sparsity; ``None`` before ``start_epoch``, at the cap or once stopped.

        Asking again in the same epoch returns the same proposal.
        """
        if self._stopped or epoch < self.start_epoch:
            return None
        if self._last_epoch is not None and epoch <= self._last_epoch:
            return self._amount(self._proposed) if epoch == self._last_epoch else None
        if self._amount(self._proposed) >= self.max_amount:
            return None
        self._proposed += 1
        self._last_epoch = epoch
        return self._amount(self._proposed)

    def record(self, metric: float, dense_metric: float) -> Decision:
        """Judge the latest proposed sparsity by a metric measured after it was applied.

        Args:
            metric: the validation metric of the pruned model (higher is better).
            dense_metric: the same metric of the dense model.

        Returns:
            :attr:`Decision.ROLL_BACK_AND_STOP` if the metric fell more than ``tolerance``
            below ``dense_metric``; else :attr:`Decision.CONTINUE`, also when there is no new
            step to judge (before the first proposal, or once stopped).
        """
        if self._stopped or self._proposed == self._held:
            return Decision.CONTINUE
        if not metric >= dense_metric - self.tolerance:  # a NaN metric counts as a drop
            self._stopped = True
            return Decision.ROLL_BACK_AND_STOP
        self._held = self._proposed
        self._stopped = self._amount(self._held) >= self.max_amount
        return Decision.CONTINUE

    def validate(self, max_epochs: int | None) -> None:
        """Fail if ``start_epoch`` never ends within ``max_epochs``."""
        _check_within("start_epoch", self.start_epoch, self.start_epoch, max_epochs)

    def state_dict(self) -> dict[str, Any]:
        """The search's progress, for a resumed run to continue it."""
        return {
            "proposed": self._proposed,
            "held": self._held,
            "last_epoch": self._last_epoch,
            "stopped": self._stopped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        self._proposed = int(state["proposed"])
        self._held = int(state["held"])
        self._last_epoch = None if state["last_epoch"] is None else int(state["last_epoch"])
        self._stopped = bool(state["stopped"])

    def _amount(self, steps: int) -> float:
        # k * step rather than a running sum, rounded so that 3 * 0.1 reads 0.3 in logs.
        return min(round(steps * self.step, 12), self.max_amount)

    def __repr__(self) -> str:
        return (
            f"UntilDrop(step={self.step}, tolerance={self.tolerance}, "
            f"max_amount={self.max_amount}, start_epoch={self.start_epoch})"
        )


def last_step_epoch(schedule: PruningSchedule) -> int | None:
    """The epoch of a schedule's last step, where it is fixed before training.

    A :class:`MiddleOfTraining` knows it once :meth:`~MiddleOfTraining.validate` has run. A
    search (:class:`UntilDrop`), a schedule of another kind, or one not yet validated gives
    ``None``: when it stops is decided by the training itself.

    Example:
        >>> last_step_epoch(Gradual(0.5, epochs=(3, 6))), last_step_epoch(OneShot(0.5, epoch=2))
        (6, 2)
    """
    if isinstance(schedule, OneShot):
        return schedule.epoch
    if isinstance(schedule, Gradual):
        return schedule.epochs[-1]
    if isinstance(schedule, MiddleOfTraining) and schedule._gradual is not None:
        return schedule.epochs[-1]
    return None


def make_schedule(
    amount: float, epochs: int | Sequence[int] | None, ramp: str = "cubic"
) -> PruningSchedule:
    """Build the schedule the callback's ``amount`` and ``epochs`` arguments describe.

    Args:
        amount: the final sparsity, in ``[0, 1)``.
        epochs: ``None`` for a ramp over the middle third of training
            (:class:`MiddleOfTraining`); an epoch for one step there; a sequence of epochs
            for a :class:`Gradual` ramp.
        ramp: the :class:`Gradual` ramp, ``"cubic"`` or ``"linear"``.

    Example:
        >>> make_schedule(0.5, epochs=3)
        OneShot(amount=0.5, epoch=3)
        >>> make_schedule(0.5, epochs=[1, 2])
        Gradual(amount=0.5, epochs=(1, 2), ramp='cubic')
    """
    _check_ramp(ramp)
    if epochs is None:
        return MiddleOfTraining(amount, ramp)
    if is_int(epochs):
        return OneShot(amount, epoch=epochs)
    if isinstance(epochs, str) or not isinstance(epochs, Sequence):
        raise ValueError(
            f"epochs={epochs!r} is not allowed; use None (steps over the middle third of "
            "training), an epoch, "
            "or a list of strictly increasing non-negative epochs"
        )
    return Gradual(amount, tuple(epochs), ramp=ramp)


def resolve_schedule(
    schedule: PruningSchedule | None,
    amount: float = 0.5,
    epochs: int | Sequence[int] | None = None,
    ramp: str = "cubic",
) -> PruningSchedule:
    """The callback's schedule: ``schedule``, or the one its other settings describe.

    Without ``schedule``, :func:`make_schedule` builds it from ``amount``, ``epochs`` and
    ``ramp``. A schedule replaces those three settings entirely: giving both is refused, as is a
    ``schedule`` that is not one.
    """
    if schedule is None:
        return make_schedule(amount, epochs, ramp)
    if not isinstance(schedule, PruningSchedule):
        raise ValueError(
            f"schedule={schedule!r} is not a pruning schedule; it needs the methods target, "
            "validate, state_dict and load_state_dict (see lightning_shapley.pruning.schedule)"
        )
    settings = (("amount", amount, 0.5), ("epochs", epochs, None), ("ramp", ramp, "cubic"))
    given = [f"{name}={value!r}" for name, value, default in settings if value != default]
    if given:
        raise ValueError(
            f"schedule={schedule!r} replaces amount, epochs and ramp, but got {', '.join(given)} "
            "as well; pass either schedule= or those settings"
        )
    return schedule


def _check_amount(amount: float) -> None:
    if not is_real(amount) or not 0.0 <= amount < 1.0:
        raise ValueError(
            f"amount={amount!r} is not allowed; it must lie in [0, 1) "
            "(the fraction of channels removed; 1 would remove them all)"
        )


def _check_fraction(name: str, value: float, allowed: str) -> None:
    if not is_real(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value!r} is not allowed; it must lie in {allowed}")


def _check_epoch(name: str, epoch: int) -> int:
    if not is_int(epoch) or epoch < 0:
        raise ValueError(f"{name}={epoch!r} is not allowed; it must be a 0-based epoch (int >= 0)")
    return int(epoch)


def _check_epochs(epochs: Sequence[int]) -> tuple[int, ...]:
    allowed = "strictly increasing non-negative ints (0-based epochs), e.g. (2, 4, 6)"
    if isinstance(epochs, str) or not isinstance(epochs, Sequence) or len(epochs) == 0:
        raise ValueError(f"epochs={epochs!r} is not allowed; it must be {allowed}")
    for epoch in epochs:
        if not is_int(epoch) or epoch < 0:
            raise ValueError(
                f"epochs={tuple(epochs)!r} is not allowed: {epoch!r} is not a non-negative int; "
                f"they must be {allowed}"
            )
    for before, after in itertools.pairwise(epochs):
        if after <= before:
            raise ValueError(
                f"epochs={tuple(epochs)!r} is not allowed: {after} follows {before}; "
                f"they must be {allowed}"
            )
    return tuple(int(epoch) for epoch in epochs)


def _check_ramp(ramp: str) -> None:
    if ramp not in RAMPS:
        raise ValueError(f"ramp={ramp!r} is not known; use one of {RAMPS}")


def _check_within(name: str, value: object, last_epoch: int, max_epochs: int | None) -> None:
    """Fail if ``last_epoch`` never ends; ``None`` or a negative ``max_epochs`` is unlimited."""
    if max_epochs is None or max_epochs < 0 or last_epoch < max_epochs:
        return
    raise ValueError(
        f"{name}={value!r} has an epoch beyond max_epochs={max_epochs}: epoch {last_epoch} "
        f"never ends; epochs are 0-based, so each must be at most {max_epochs - 1}"
    )
