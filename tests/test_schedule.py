import itertools
import math

import pytest

from lightning_shapley.pruning.schedule import (
    Decision,
    Gradual,
    MiddleOfTraining,
    OneShot,
    PruningSchedule,
    UntilDrop,
    make_schedule,
)

# Hand-computed: cubic 1 - (1 - k/K)^3, linear k/K, for k = 1..K.
EXPECTED = {
    ("cubic", 3): [19 / 27, 26 / 27, 1.0],
    ("cubic", 4): [37 / 64, 56 / 64, 63 / 64, 1.0],
    ("linear", 3): [1 / 3, 2 / 3, 1.0],
    ("linear", 4): [1 / 4, 2 / 4, 3 / 4, 1.0],
}


@pytest.mark.parametrize(("ramp", "steps"), list(EXPECTED))
def test_gradual_targets_match_hand_computed_ramp(ramp: str, steps: int) -> None:
    amount = 0.8
    epochs = tuple(range(1, 2 * steps, 2))  # 1, 3, 5, (7)
    schedule = Gradual(amount, epochs, ramp=ramp)
    targets = [schedule.target(epoch) for epoch in epochs]
    assert targets == pytest.approx([amount * f for f in EXPECTED[ramp, steps]], abs=1e-12)
    assert targets[-1] == amount  # exactly, not approximately
    assert all(a <= b for a, b in itertools.pairwise(targets))
    off_schedule = [e for e in range(2 * steps + 3) if e not in epochs]
    assert all(schedule.target(epoch) is None for epoch in off_schedule)


def test_gradual_is_monotone_and_ends_at_amount_for_many_shapes() -> None:
    for ramp in ("cubic", "linear"):
        for steps in range(1, 12):
            for amount in (0.0, 0.1, 0.5, 0.95, 0.999):
                schedule = Gradual(amount, tuple(range(steps)), ramp=ramp)
                targets = [schedule.target(epoch) for epoch in range(steps)]
                assert targets[-1] == amount
                assert all(0 <= a <= b <= amount for a, b in itertools.pairwise(targets))


def test_gradual_accepts_a_list_and_stores_a_tuple() -> None:
    schedule = Gradual(0.5, [0, 2])  # type: ignore[arg-type]
    assert schedule.epochs == (0, 2)
    assert hash(schedule) == hash(Gradual(0.5, (0, 2)))


def test_one_shot() -> None:
    schedule = OneShot(0.3, epoch=2)
    assert [schedule.target(epoch) for epoch in range(5)] == [None, None, 0.3, None, None]
    assert OneShot(0.3).target(0) == 0.3
    schedule.validate(3)
    schedule.validate(None)
    schedule.validate(-1)  # Lightning's "no limit"


def test_make_schedule() -> None:
    assert isinstance(make_schedule(0.5, None), MiddleOfTraining)
    assert make_schedule(0.5, 4) == OneShot(0.5, epoch=4)
    assert make_schedule(0.5, [1, 3], ramp="linear") == Gradual(0.5, (1, 3), ramp="linear")
    assert make_schedule(0.5, (1, 3)) == Gradual(0.5, (1, 3), ramp="cubic")


def test_without_epochs_the_steps_span_the_middle_third_of_training() -> None:
    schedule = MiddleOfTraining(0.6, ramp="linear")
    assert schedule.target(0) is None  # no steps before fit sets up
    schedule.validate(max_epochs=9)
    assert schedule.epochs == (2, 3, 4, 5)  # 3 to 6 of the 9 epochs trained
    assert [schedule.target(epoch) for epoch in range(9)] == [
        None, None, 0.15, 0.3, 0.44999999999999996, 0.6, None, None, None
    ]  # fmt: skip
    for max_epochs in range(1, 60):
        epochs = MiddleOfTraining.epochs_for(max_epochs)
        assert 1 <= len(epochs) <= MiddleOfTraining.MAX_STEPS
        assert list(epochs) == sorted(set(epochs))
        assert epochs[-1] < max(max_epochs - 1, 1)  # the last third is fine-tuning
        assert epochs[0] + 1 >= min(max_epochs / 3, max_epochs)  # never before a third
    for bad in (None, -1):
        with pytest.raises(ValueError, match=rf"max_epochs={bad!r} sets no end; give epochs="):
            MiddleOfTraining(0.5).validate(bad)


def test_every_schedule_has_the_uniform_interface() -> None:
    for schedule in (
        OneShot(0.5),
        Gradual(0.5, (1, 2)),
        UntilDrop(0.1, 0.01),
        MiddleOfTraining(0.5),
    ):
        assert isinstance(schedule, PruningSchedule)
        schedule.load_state_dict(schedule.state_dict())
    assert OneShot(0.5).state_dict() == {}
    assert Gradual(0.5, (1, 2)).state_dict() == {}


@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5, math.nan, True, "0.5"])
def test_bad_amount(amount: object) -> None:
    with pytest.raises(ValueError, match=r"amount=.* must lie in \[0, 1\)"):
        make_schedule(amount, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"amount=.* must lie in \[0, 1\)"):
        make_schedule(amount, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epochs", "bad"),
    [
        ([2, 1], r"epochs=\(2, 1\).*1 follows 2"),
        ([1, 1], r"epochs=\(1, 1\).*1 follows 1"),
        ([-1], r"epochs=\(-1,\).*-1 is not a non-negative int"),
        ([0, 1.5], r"epochs=\(0, 1.5\).*1.5 is not a non-negative int"),
        ([], r"epochs=\(\) is not allowed"),
    ],
)
def test_bad_epochs(epochs: list, bad: str) -> None:
    with pytest.raises(ValueError, match=bad) as info:
        make_schedule(0.5, epochs)
    assert "strictly increasing non-negative ints" in str(info.value)


def test_bad_single_epoch_and_type() -> None:
    with pytest.raises(ValueError, match=r"epoch=-1 .* 0-based epoch \(int >= 0\)"):
        make_schedule(0.5, -1)
    with pytest.raises(ValueError, match=r"epochs='2' .* use None"):
        make_schedule(0.5, "2")  # type: ignore[arg-type]


def test_unknown_ramp() -> None:
    allowed = r"use one of \('cubic', 'linear'\)"
    with pytest.raises(ValueError, match=rf"ramp='quadratic' is not known; {allowed}"):
        make_schedule(0.5, [1, 2], ramp="quadratic")
    with pytest.raises(ValueError, match=rf"ramp='exp' is not known; {allowed}"):
        Gradual(0.5, (1, 2), ramp="exp")


def test_validate_rejects_an_epoch_beyond_max_epochs() -> None:
    Gradual(0.5, (1, 9)).validate(10)
    with pytest.raises(
        ValueError, match=r"epochs=\(1, 10\) has an epoch beyond max_epochs=10.*at most 9"
    ):
        Gradual(0.5, (1, 10)).validate(10)
    with pytest.raises(ValueError, match=r"epoch=3 has an epoch beyond max_epochs=3.*at most 2"):
        OneShot(0.5, epoch=3).validate(3)
    with pytest.raises(ValueError, match=r"start_epoch=5 has an epoch beyond max_epochs=5"):
        UntilDrop(0.1, 0.01, start_epoch=5).validate(5)


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"step": 0.0}, r"step=0.0 is not allowed; it must lie in \(0, 1\)"),
        ({"step": 1.0}, r"step=1.0 is not allowed; it must lie in \(0, 1\)"),
        ({"tolerance": -0.1}, r"tolerance=-0.1 is not allowed; .* at least 0"),
        ({"tolerance": math.nan}, r"tolerance=nan is not allowed"),
        ({"max_amount": 1.0}, r"max_amount=1.0 is not allowed; it must lie in \(0, 1\)"),
        ({"start_epoch": -2}, r"start_epoch=-2 is not allowed; .*int >= 0"),
    ],
)
def test_bad_until_drop(kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        UntilDrop(**{"step": 0.1, "tolerance": 0.01, **kwargs})


def _run(schedule: UntilDrop, metrics: dict[int, float], epochs: range) -> list:
    """Drive the schedule as the callback would; return (target, decision) per epoch."""
    trace = []
    for epoch in epochs:
        decision = schedule.record(metrics[epoch], dense_metric=0.9) if epoch in metrics else None
        trace.append((schedule.target(epoch), decision))
    return trace


def test_until_drop_steps_then_rolls_back() -> None:
    schedule = UntilDrop(step=0.1, tolerance=0.02, start_epoch=1)
    assert schedule.target(0) is None
    proposed = []
    for epoch, metric in zip(range(1, 5), [0.9, 0.89, 0.885, 0.87], strict=True):
        proposed.append(schedule.target(epoch))
        assert schedule.target(epoch) == proposed[-1]  # asking twice is harmless
        assert schedule.final_amount is None
        expected = Decision.ROLL_BACK_AND_STOP if metric < 0.88 else Decision.CONTINUE
        assert schedule.record(metric, dense_metric=0.9) is expected
    assert proposed == [0.1, 0.2, 0.3, 0.4]
    assert schedule.stopped
    assert schedule.final_amount == 0.3
    assert all(schedule.target(epoch) is None for epoch in range(5, 20))
    assert schedule.record(0.5, dense_metric=0.9) is Decision.CONTINUE  # nothing left to judge


def test_until_drop_first_step_failing_rolls_back_to_dense() -> None:
    schedule = UntilDrop(step=0.2, tolerance=0.0)
    assert schedule.record(0.1, 0.9) is Decision.CONTINUE  # nothing proposed yet
    assert schedule.target(0) == 0.2
    assert schedule.record(math.nan, 0.9) is Decision.ROLL_BACK_AND_STOP  # NaN is a drop
    assert schedule.final_amount == 0.0


def test_until_drop_stops_at_max_amount() -> None:
    schedule = UntilDrop(step=0.3, tolerance=0.01, max_amount=0.8)
    targets = []
    for epoch in range(6):
        targets.append(schedule.target(epoch))
        schedule.record(0.9, 0.9)
    assert targets == [0.3, 0.6, 0.8, None, None, None]
    assert schedule.stopped
    assert schedule.final_amount == 0.8


def test_until_drop_without_records_keeps_rising_and_rolls_back_to_the_last_hold() -> None:
    schedule = UntilDrop(step=0.1, tolerance=0.01)
    assert schedule.target(0) == 0.1
    assert schedule.record(0.9, 0.9) is Decision.CONTINUE
    assert [schedule.target(epoch) for epoch in (1, 2)] == [0.2, 0.3]  # no validation between
    assert schedule.record(0.5, 0.9) is Decision.ROLL_BACK_AND_STOP
    assert schedule.final_amount == 0.1


def test_until_drop_state_dict_round_trips_mid_run() -> None:
    metrics = {1: 0.9, 2: 0.895, 3: 0.9, 4: 0.89, 5: 0.85, 6: 0.9}
    reference = UntilDrop(step=0.15, tolerance=0.02)
    expected = _run(reference, metrics, range(7))

    first = UntilDrop(step=0.15, tolerance=0.02)
    head = _run(first, metrics, range(3))  # stops with 0.45 proposed, not yet judged
    state = first.state_dict()
    resumed = UntilDrop(step=0.15, tolerance=0.02)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    tail = _run(resumed, metrics, range(3, 7))

    # Each epoch's metric judges the previous epoch's target: 0.15 .. 0.6 hold, 0.75 drops.
    assert head + tail == expected
    assert resumed.final_amount == reference.final_amount == pytest.approx(0.6)
    assert resumed.state_dict() == reference.state_dict()
