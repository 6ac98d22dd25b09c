"""The ShapleyPruning callback in real Trainer.fit runs on the digits data."""

import csv
import functools
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from models_for_tests import ResidualBlock
from torch import nn
from torch.multiprocessing.spawn import ProcessExitedException
from torch.utils.data import DataLoader, TensorDataset

from lightning_shapley import ChannelGame
from lightning_shapley.app.data import DigitsDataModule
from lightning_shapley.app.models import DigitsCNN, ImageClassifier
from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.export import load_compact
from lightning_shapley.pruning.masking import channel_state, prune_channels, pruned_channels
from lightning_shapley.pruning.schedule import UntilDrop
from lightning_shapley.pruning.scorers import ChannelScores, ShapleyScorer
from lightning_shapley.pruning.units import find_units

CHANNELS = (16, 16, 32)
UNITS = {"net.features.0": "net.features.1", "net.features.3": "net.features.4"}
UNITS |= {"net.features.7": "net.features.8"}
# Two CPU processes over gloo: cheap DDP coverage on any machine.
DDP = {"strategy": "ddp_spawn", "accelerator": "cpu", "devices": 2}


def again_if_a_process_aborts_at_exit(test: Callable[..., None]) -> Callable[..., None]:
    """Runs a ``ddp_spawn`` test once more if a spawned process aborted (SIGABRT).

    In the full suite, about one run in four, a gloo process of this machine aborts while
    exiting ("terminate called without an active exception"), after fit has finished on
    every process; it was never seen with these tests alone. The test runs again in a
    folder of its own and must pass all its checks then: a real failure fails twice.
    """

    @functools.wraps(test)
    def wrapper(*args: object, tmp_path: Path, **kwargs: object) -> None:
        try:
            test(*args, tmp_path=tmp_path, **kwargs)
        except ProcessExitedException as error:
            if error.signal_name != "SIGABRT":
                raise
            warnings.warn(f"a spawned process aborted ({error}); running again", stacklevel=2)
            test(*args, tmp_path=tmp_path / "again", **kwargs)

    return wrapper


def make_module(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(DigitsCNN(channels=CHANNELS))


def make_trainer(tmp_path: Path, max_epochs: int, callbacks: list, **options) -> lightning.Trainer:
    return lightning.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **{"limit_train_batches": 8, **options},
    )


def logged(tmp_path: Path) -> list[dict[str, str]]:
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


def zero_rows(module: torch.nn.Module, name: str) -> torch.Tensor:
    weight = module.get_submodule(name).weight.detach()
    return weight.reshape(len(weight), -1).abs().sum(1) == 0


# --------------------------------------------------------------------------- processes


class RecordingScorer(ShapleyScorer):
    """The Shapley scorer, keeping each process's own scores before they are combined."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.local: list[dict] = []

    def score(self, model, unit, batches, pruned) -> ChannelScores:
        scores = super().score(model, unit, batches, pruned)
        targets = torch.cat([y for _, y in batches])
        self.local.append({"unit": unit.name, "scores": scores, "targets": targets})
        return scores


class SaveRankState(Callback):
    """Writes what each process ends fit with to ``directory / f"rank_{global_rank}.pt"``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_train_end(self, trainer: lightning.Trainer, pl_module) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, ShapleyPruning))
        state = {
            "masks": {unit.name: pruned_channels(pl_module, unit) for unit in pruning.units},
            "history": pruning.history,
            "local": getattr(pruning.scorer, "local", None),
        }
        torch.save(state, self.directory / f"rank_{trainer.global_rank}.pt")


def rank_states(directory: Path) -> list[dict]:
    files = sorted(directory.glob("rank_*.pt"))
    return [torch.load(file, weights_only=False) for file in files]


def as_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("processes", [pytest.param(1, id="single"), pytest.param(2, id="ddp")])
@again_if_a_process_aborts_at_exit
def test_pruning_on_schedule_keeps_channels_zero_through_fine_tuning(
    tmp_path: Path, processes: int
) -> None:
    module = make_module()
    scorer = RecordingScorer(num_permutations=8)
    # One scoring per unit and step (no rounds), so each call can be matched to its step.
    pruning = ShapleyPruning(
        amount=0.5, epochs=[1, 2, 3], scorer=scorer, removal_step=None, interleave=False
    )
    callbacks = [pruning, SaveRankState(tmp_path)]
    options = DDP if processes > 1 else {}
    trainer = make_trainer(tmp_path, 5, callbacks, enable_checkpointing=False, **options)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    states = rank_states(tmp_path)
    assert len(states) == processes
    first = states[0]
    # Every process ends with the same masks and the same history.
    for other in states[1:]:
        assert first["masks"].keys() == other["masks"].keys()
        for name, mask in first["masks"].items():
            assert torch.equal(other["masks"][name], mask)
        for ours, theirs in zip(first["history"], other["history"], strict=True):
            assert ours.keys() == theirs.keys()
            for key in ours:
                if key in ("values", "stderr"):
                    for name, values in ours[key].items():
                        torch.testing.assert_close(
                            as_tensor(theirs[key][name]), as_tensor(values), equal_nan=True
                        )
                else:
                    assert theirs[key] == ours[key]
    assert [step["epoch"] for step in first["history"]] == [1, 2, 3]
    assert {name: int(mask.sum()) for name, mask in first["masks"].items()} == {
        name: n // 2 for name, n in zip(UNITS, CHANNELS, strict=True)
    }

    # Each process scored its own share of the 200 validation samples, all of them together.
    scored = [s["local"][0]["targets"] for s in states]
    assert sum(len(t) for t in scored) == 200
    if processes > 1:
        assert not torch.equal(scored[0][:64], scored[1][:64])
    # The scores used are the sample-weighted means of the processes' own, NaN where pruned.
    masks_before = {
        name: torch.zeros(n, dtype=torch.bool) for name, n in zip(UNITS, CHANNELS, strict=True)
    }
    for index, step in enumerate(first["history"]):
        for position, name in enumerate(UNITS):
            calls = [s["local"][index * len(UNITS) + position] for s in states]
            assert {call["unit"] for call in calls} == {name}
            weights = torch.tensor([len(call["targets"]) for call in calls], dtype=torch.float64)
            for key in ("values", "stderr"):
                local = torch.stack([getattr(call["scores"], key) for call in calls])
                expected = (local * weights[:, None]).sum(0) / weights.sum()
                torch.testing.assert_close(as_tensor(step[key][name]), expected, equal_nan=True)
            assert torch.equal(as_tensor(step["values"][name]).isnan(), masks_before[name])
        assert step["evaluations"] == sum(
            call["scores"].evaluations
            for s in states
            for call in s["local"][index * len(UNITS) : (index + 1) * len(UNITS)]
        )
        masks_before = {name: torch.tensor(mask) for name, mask in step["masks"].items()}

    # The model in this process holds the pruned weights, zero through two more epochs of
    # fine-tuning (with ddp_spawn, baked in by the callback when fit ended).
    for name, pruned in first["masks"].items():
        assert torch.equal(zero_rows(module, name), pruned)
        batchnorm = module.get_submodule(UNITS[name])
        assert (batchnorm.weight[pruned] == 0).all() and (batchnorm.bias[pruned] == 0).all()
        assert (batchnorm.weight[~pruned] != 0).all()

    rows = [row for row in logged(tmp_path) if row.get("pruning/target_sparsity")]
    targets = [float(row["pruning/target_sparsity"]) for row in rows]
    # The cubic ramp to 0.5 over three steps.
    assert targets == pytest.approx([0.5 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)])
    for row, step in zip(rows, first["history"], strict=True):
        for key in ("accuracy_before", "accuracy_after", "value_after", "evaluations"):
            assert float(row[f"pruning/{key}"]) == pytest.approx(step[key], rel=1e-6)
        assert float(row["pruning/parameters"]) == step["parameters"]
        assert float(row["pruning/scoring_seconds"]) > 0
        assert float(row["pruning/sparsity/net.features.3"]) <= 0.5
    assert float(rows[-1]["pruning/sparsity"]) == pytest.approx(
        sum(n // 2 for n in CHANNELS) / sum(CHANNELS)
    )


@pytest.mark.parametrize("processes", [pytest.param(1, id="single"), pytest.param(2, id="ddp")])
@again_if_a_process_aborts_at_exit
def test_default_rounds_remove_one_channel_at_a_time_and_agree_across_processes(
    tmp_path: Path, processes: int
) -> None:
    pruning = ShapleyPruning(amount=0.5, epochs=[0, 1])
    options = DDP if processes > 1 else {}
    trainer = make_trainer(
        tmp_path, 2, [pruning, SaveRankState(tmp_path)], enable_checkpointing=False, **options
    )
    trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=64))

    states = rank_states(tmp_path)
    for other in states[1:]:
        for name, mask in states[0]["masks"].items():
            assert torch.equal(other["masks"][name], mask)
    first = states[0]["history"][0]
    # Cubic ramp, first of two steps: 7 of 16 and 14 of 32 channels, one per round. The
    # first round scores every survivor alone and the whole unit (the band at depth 1,
    # exactly); later ones only the survivors near the cut, fewer than exact greedy's all.
    assert first["target_sparsity"] == pytest.approx(0.4375)
    removed = {name: sum(mask) for name, mask in first["masks"].items()}
    assert removed == {"net.features.0": 7, "net.features.3": 7, "net.features.7": 14}
    exact_greedy = sum(
        sum(n - k + 1 for k in range(removed[name]))
        for name, n in zip(UNITS, CHANNELS, strict=True)
    )
    first_round = sum(n + 1 for n in CHANNELS)
    assert first_round * processes < first["evaluations"] < exact_greedy * processes
    assert first["evaluations"] % processes == 0  # every process took the same rounds
    # The removed channels keep the value they were removed on.
    for name, mask in first["masks"].items():
        values = as_tensor(first["values"][name])
        assert torch.isfinite(values[torch.tensor(mask)]).all()
    last = states[0]["history"][-1]
    assert {name: sum(mask) for name, mask in last["masks"].items()} == {
        name: n // 2 for name, n in zip(UNITS, CHANNELS, strict=True)
    }


def test_export_writes_a_compact_model_that_reloads_into_the_original_class(
    tmp_path: Path, digits_splits_fixture
) -> None:
    module = make_module()
    pruning = ShapleyPruning(
        amount=0.5, epochs=0, scorer="l1", export=["compact", "int8", "onnx"], reporter=False
    )
    trainer = make_trainer(tmp_path, 1, [pruning], enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    assert [a.format for a in pruning.artifacts] == ["compact", "int8", "onnx"]
    for artifact in pruning.artifacts:
        assert artifact.path.is_file() and artifact.path.parent.name == "export"
        assert artifact.size_bytes == artifact.path.stat().st_size
    compact_file = pruning.artifacts[0]
    fresh = ImageClassifier(DigitsCNN(channels=CHANNELS))  # the unmodified classes, dense
    small = load_compact(compact_file.path, fresh)
    assert compact_file.parameters == sum(p.numel() for p in small.parameters())
    x, _ = digits_splits_fixture.test.tensors
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), module.eval()(x), atol=1e-5, rtol=0)
    row = next(r for r in logged(tmp_path) if r.get("export/compact/size_bytes"))
    assert float(row["export/compact/size_bytes"]) == compact_file.size_bytes
    assert float(row["export/int8/latency_ms"]) > 0
    assert 0 <= float(row["export/onnx/accuracy"]) <= 1


def test_unknown_export_format_fails_when_built() -> None:
    with pytest.raises(ValueError, match=r"export: 'tflite' is not an export format.*'compact'"):
        ShapleyPruning(export=["tflite"])


def test_game_value_equals_metric_of_the_masked_model(digits_splits_fixture) -> None:
    module = make_module()
    x, y = digits_splits_fixture.score.tensors
    batches = [(x[:100], y[:100]), (x[100:], y[100:])]
    (unit,) = find_units(module.eval(), x[:2], ["net.features.3"])
    game = ChannelGame(module, unit.name, batches)
    coalition = torch.rand(unit.n_channels, generator=torch.Generator().manual_seed(1)) < 0.6
    value = game(coalition[None])[0]
    prune_channels(module, unit, ~coalition)
    with torch.no_grad():
        loss = F.cross_entropy(torch.cat([module(b) for b, _ in batches]), y)
    assert value.item() == pytest.approx(-loss.item(), abs=1e-5)


@pytest.mark.parametrize("scorer", ["shapley", "l1", "bn_gamma", "taylor", "random"])
def test_every_scorer_prunes_the_same_amount(tmp_path: Path, scorer: str) -> None:
    module = make_module()
    pruning = ShapleyPruning(amount=0.25, epochs=0, scorer=scorer, num_permutations=8)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[pruning], enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    counts = [int(pruned_channels(module, unit).sum()) for unit in pruning.units]
    assert counts == [n // 4 for n in CHANNELS]


def test_global_scope_ranks_across_units(tmp_path: Path) -> None:
    module = make_module()
    pruning = ShapleyPruning(
        amount=0.5, epochs=0, scope="global", scorer="l1", min_channels=4, num_permutations=8
    )
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[pruning], enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    counts = [int(pruned_channels(module, unit).sum()) for unit in pruning.units]
    assert sum(counts) == sum(CHANNELS) // 2
    assert all(n - c >= 4 for n, c in zip(CHANNELS, counts, strict=True))
    # L1 norms differ between layers, so a global ranking does not prune evenly.
    assert len(set(c / n for c, n in zip(counts, CHANNELS, strict=True))) > 1


# --------------------------------------------------------------------------- checkpoints


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch >= self.epoch


def test_resume_mid_schedule_continues_with_the_same_masks(tmp_path: Path) -> None:
    first = make_module()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    pruning = ShapleyPruning(amount=0.5, epochs=[0, 2], num_permutations=8)
    # Interrupted after epoch 1, between the two steps of a 3-epoch schedule.
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[pruning, checkpoints, StopAfter(1)])
    trainer.fit(first, datamodule=DigitsDataModule(batch_size=64))
    saved = {unit.name: pruned_channels(first, unit) for unit in pruning.units}
    assert all(mask.any() for mask in saved.values())

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not any(k.endswith(("_orig", "_mask")) for k in checkpoint["state_dict"])
    # A pruned checkpoint loads into a fresh model for inference, pruned channels at zero.
    fresh = make_module(seed=1)
    fresh.load_state_dict(checkpoint["state_dict"])
    for unit in pruning.units:
        assert torch.equal(zero_rows(fresh, unit.name), saved[unit.name])

    resumed_module = make_module(seed=2)
    resumed = ShapleyPruning(amount=0.5, epochs=[0, 2], num_permutations=8)
    trainer = make_trainer(tmp_path / "resumed", max_epochs=3, callbacks=[resumed])
    trainer.fit(
        resumed_module,
        datamodule=DigitsDataModule(batch_size=64),
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert [step["epoch"] for step in resumed.history] == [0, 2]
    for unit in resumed.units:
        now = pruned_channels(resumed_module, unit)
        assert (now & saved[unit.name]).sum() == saved[unit.name].sum()  # kept pruned
        assert int(now.sum()) == unit.n_channels // 2


# --------------------------------------------------------------------------- critical threshold

# On the digits CNN of this file (seed 0, full epochs), the scoring loss (negative
# cross-entropy, in nats) is about 0.30 below the dense model's after 0.25 sparsity and an
# epoch of fine-tuning, 0.45 after 0.5 and 1.19 after 0.75 (on seeds 0-4, 0.75 broke a
# tolerance of 0.7 on four of five): 0.25 and 0.5 hold, the step to 0.75 is rolled back.
TOLERANCE = 0.7


def until_drop() -> UntilDrop:
    return UntilDrop(step=0.25, tolerance=TOLERANCE, start_epoch=3)


class UnitStates(Callback):
    """Saves every unit's tensors (``channel_state`` of all channels) at each epoch's end.

    Placed before ``ShapleyPruning`` in the callback list it sees the model before that
    epoch's pruning; placed after, the model after it.
    """

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module) -> None:
        pruning = next(c for c in trainer.callbacks if isinstance(c, ShapleyPruning))
        every = {unit.name: torch.ones(unit.n_channels, dtype=torch.bool) for unit in pruning.units}
        self.by_epoch[trainer.current_epoch] = {
            u.name: channel_state(pl_module, u, every[u.name]) for u in pruning.units
        }


def assert_revived_as_before(before: dict, after: dict, revived: dict[str, torch.Tensor]) -> None:
    """The revived channels' weights and BatchNorm statistics are those ``before`` held."""
    assert any(channels.any() for channels in revived.values())
    for name, channels in revived.items():
        for key, value in before[name].items():
            assert torch.equal(after[name][key][channels], value[channels]), key
            assert after[name][key][channels].abs().sum() > 0, key


def masks_of(entry: dict) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(mask) for name, mask in entry["masks"].items()}


# One ranking a step with the statistics left alone, and the defaults (rounds, statistics
# re-estimated): the tolerance breaks at a different step, which one depends on the
# thread count, so the test finds it in the history.
ONE_RANKING = {"removal_step": None, "recalibrate": 0}


@pytest.mark.parametrize("pipeline", [pytest.param(ONE_RANKING, id="one-ranking"), {}])
def test_until_drop_rolls_back_the_step_that_broke_the_tolerance(
    tmp_path: Path, pipeline: dict
) -> None:
    module = make_module()
    pruning = ShapleyPruning(schedule=until_drop(), scorer="l1", **pipeline)
    before, after = UnitStates(), UnitStates()
    trainer = make_trainer(
        tmp_path, 8, [before, pruning, after], enable_checkpointing=False, limit_train_batches=None
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    assert trainer.current_epoch == 8  # every epoch ran
    history = pruning.history
    steps = len(history) - 1
    assert steps >= 2 and history[-1]["rolled_back"]
    last = 3 + steps - 1  # the epoch of the step that broke the tolerance
    final = 0.25 * (steps - 1)
    # Judged at the end of the next epoch, which rolls back; later epochs prune nothing.
    assert [(e["epoch"], e["target_sparsity"], e["rolled_back"]) for e in history] == [
        (3 + k, 0.25 * (k + 1), False) for k in range(steps)
    ] + [(last + 1, final, True)]
    assert pruning.schedule.stopped and pruning.schedule.final_amount == final
    assert pruning.dense_metric == history[0]["value_before"]
    rollback = history[-1]
    assert rollback["value_before"] < pruning.dense_metric - TOLERANCE  # what broke it
    assert rollback["dense_metric"] == pruning.dense_metric
    assert rollback["sparsity"] == pruning.schedule.final_amount
    # The masks are those before the rolled-back step, through the last epoch's fine-tuning.
    restored = masks_of(history[steps - 2])
    for unit in pruning.units:
        pruned = pruned_channels(module, unit)
        assert torch.equal(pruned, restored[unit.name])
        assert int(pruned.sum()) == unit.n_channels * pruning.schedule.final_amount
        assert torch.equal(zero_rows(module, unit.name), pruned)
        assert (module.get_submodule(UNITS[unit.name]).bias[pruned] == 0).all()
    assert all(torch.equal(masks_of(rollback)[n], m) for n, m in restored.items())
    # The channels the step pruned came back with their weights and statistics before it.
    dropped = masks_of(history[steps - 1])
    revived = {n: dropped[n] & ~m for n, m in restored.items()}
    assert_revived_as_before(before.by_epoch[last], after.by_epoch[last + 1], revived)

    rows = [row for row in logged(tmp_path) if row.get("pruning/rolled_back")]
    assert [float(row["pruning/rolled_back"]) for row in rows] == [0] * steps + [1]
    assert float(rows[-1]["pruning/sparsity"]) == final
    judged = [float(row["pruning/metric"]) for row in logged(tmp_path) if row.get("pruning/metric")]
    assert len(judged) == steps and judged[-1] == pytest.approx(rollback["value_before"])


def test_until_drop_resumed_mid_search_rolls_back_the_unjudged_step(tmp_path: Path) -> None:
    first = make_module()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    pruning = ShapleyPruning(schedule=until_drop(), scorer="l1", **ONE_RANKING)
    before = UnitStates()
    # Interrupted after the step to 0.75, before it is judged.
    callbacks = [before, pruning, checkpoints, StopAfter(5)]
    trainer = make_trainer(tmp_path, 8, callbacks, limit_train_batches=None)
    trainer.fit(first, datamodule=DigitsDataModule(batch_size=64))
    assert [e["epoch"] for e in pruning.history] == [3, 4, 5]
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("ShapleyPruning")]
    assert saved["dense_metric"] == pruning.dense_metric
    assert saved["schedule"] == {"proposed": 3, "held": 2, "last_epoch": 5, "stopped": False}

    module = make_module(seed=2)
    resumed = ShapleyPruning(schedule=until_drop(), scorer="l1", **ONE_RANKING)
    after = UnitStates()
    trainer = make_trainer(tmp_path / "resumed", 8, [resumed, after], limit_train_batches=None)
    trainer.fit(
        module,
        datamodule=DigitsDataModule(batch_size=64),
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
    )
    assert [(e["epoch"], e["rolled_back"]) for e in resumed.history] == [
        (3, False),
        (4, False),
        (5, False),
        (6, True),
    ]
    assert resumed.schedule.final_amount == 0.5
    restored = masks_of(pruning.history[1])
    for unit in resumed.units:
        assert torch.equal(pruned_channels(module, unit), restored[unit.name])
    # The checkpoint held the step's channels at zero; they came back as they were before it.
    dropped = masks_of(pruning.history[2])
    revived = {n: dropped[n] & ~m for n, m in restored.items()}
    assert_revived_as_before(before.by_epoch[5], after.by_epoch[6], revived)


@again_if_a_process_aborts_at_exit
def test_until_drop_under_ddp_judges_and_rolls_back_alike_on_every_process(
    tmp_path: Path,
) -> None:
    module = make_module()
    pruning = ShapleyPruning(schedule=until_drop(), scorer="l1")
    callbacks = [pruning, SaveRankState(tmp_path)]
    trainer = make_trainer(
        tmp_path, 7, callbacks, enable_checkpointing=False, limit_train_batches=None, **DDP
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    first, second = rank_states(tmp_path)
    # The metric is a mean over both processes' scoring batches: the same decisions on each.
    history = first["history"]
    for ours, theirs in zip(history, second["history"], strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours.keys() - {"values", "stderr"}:  # NaN where pruned: compared below
            assert theirs[key] == ours[key], key
        for name, values in ours.get("values", {}).items():
            torch.testing.assert_close(
                as_tensor(theirs["values"][name]), as_tensor(values), equal_nan=True
            )
    assert [e["rolled_back"] for e in history] == [False] * (len(history) - 1) + [True]
    # Which step breaks the tolerance depends on the arithmetic (threads, instruction set);
    # whichever it is, the masks go back to those before it: dense if it was the first.
    assert len(history) >= 2
    dense = {name: torch.zeros_like(mask) for name, mask in masks_of(history[0]).items()}
    restored = masks_of(history[-3]) if len(history) >= 3 else dense
    for name, mask in restored.items():
        assert torch.equal(masks_of(history[-1])[name], mask)
        assert torch.equal(first["masks"][name], mask) and torch.equal(second["masks"][name], mask)
        # The model here got rank zero's weights, baked: the revived channels are alive.
        assert torch.equal(zero_rows(module, name), mask)


# --------------------------------------------------------------------------- residual CNN


class ResidualCNN(nn.Module):
    """Stem conv-bn-relu, two residual blocks, global average pool, linear head."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.block1 = ResidualBlock(channels)
        self.block2 = ResidualBlock(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


# The residual stream is one unit of three producers and three BatchNorms.
RESIDUAL_UNITS = {
    "net.stem.0": (("net.stem.0", "net.block1.conv2", "net.block2.conv2"),
                   ("net.stem.1", "net.block1.bn2", "net.block2.bn2")),
    "net.block1.conv1": (("net.block1.conv1",), ("net.block1.bn1",)),
    "net.block2.conv1": (("net.block2.conv1",), ("net.block2.bn1",)),
}  # fmt: skip


@pytest.mark.parametrize("scorer", ["l1", "shapley"])
def test_a_residual_cnn_prunes_and_trains(
    tmp_path: Path, scorer: str, digits_splits_fixture
) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(ResidualCNN(channels=16))
    pruning = ShapleyPruning(amount=0.5, epochs=[0, 1], scorer=scorer, num_permutations=8)
    trainer = make_trainer(
        tmp_path, 4, [pruning], enable_checkpointing=False, limit_train_batches=None
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    assert {u.name: (u.producers, u.batchnorms) for u in pruning.units} == RESIDUAL_UNITS
    assert [step["epoch"] for step in pruning.history] == [0, 1]
    x, y = digits_splits_fixture.test.tensors
    with torch.no_grad():  # also recomputes every masked weight from the trained _orig
        test_accuracy = (module.eval()(x).argmax(1) == y).float().mean().item()
    assert test_accuracy > 0.5  # chance is 0.1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # Two epochs of fine-tuning after the last step kept every coupled parameter at zero.
    for name, (producers, batchnorms) in RESIDUAL_UNITS.items():
        pruned = torch.tensor(pruning.history[-1]["masks"][name])
        assert int(pruned.sum()) == 8
        for producer in producers:
            assert torch.equal(zero_rows(module, producer), pruned), producer
        for batchnorm in batchnorms:
            bn = module.get_submodule(batchnorm)
            assert torch.equal(bn.weight == 0, pruned) and (bn.bias[pruned] == 0).all(), batchnorm


# --------------------------------------------------------------------------- bad settings


def bad_batches() -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(8, 1, 8, 8)), batch_size=4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"amount": 1.0}, r"amount=1.0 "),
        ({"amount": -0.1}, r"amount=-0.1 "),
        ({"epochs": [1, 9]}, r"max_epochs"),
        ({"layers": ["net.nothing"]}, r"net.nothing"),
        ({"scorer": "magic"}, r"scorer='magic' is not known"),
        ({"method": "magic"}, r"method='magic' is not known"),
        ({"weighting": "band", "depth": 0}, r"depth=0 is not allowed for weighting='band'"),
        ({"amount": 0.9, "min_channels": 4}, r"min_channels=4"),
        ({"score_dataloader": bad_batches()}, r"cannot be unpacked into \(inputs, targets\)"),
        ({"scope": "everything"}, r"scope='everything' is not known"),
        (
            {"schedule": UntilDrop(step=0.25, tolerance=0.1)},
            r"schedule=UntilDrop\(.*\) replaces amount, epochs and ramp, but got epochs=\[1\]",
        ),
        ({"schedule": "cubic", "epochs": None}, r"schedule='cubic' is not a pruning schedule"),
        ({"layers": "net.features.0"}, r"layers='net.features.0' is a string"),
        ({"method": "adaptive"}, r"method='adaptive' needs a stop rule"),
        ({"method": "surrogate", "num_permutations": 4}, r"num_permutations=4 is too few"),
        (
            {"method": "adaptive", "estimator_options": {"tolerance": -1.0}},
            r"tolerance=-1.0 is not allowed",
        ),
        ({"estimator_options": {"bottom_k": 3}}, r"\['bottom_k'\] are not options of"),
        (
            {"scorer": ShapleyScorer(value="accuracy"), "weighting": "shapley"},
            r"is a scorer instance.*weighting='shapley' were given as well",
        ),
        (
            {"scorer": ShapleyScorer(value="loss"), "value": "accuracy"},
            r"is a scorer instance.*value='accuracy' were given as well",
        ),
    ],
)
def test_bad_settings_fail_before_training(tmp_path: Path, options: dict, message: str) -> None:
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        pruning = ShapleyPruning(**{"epochs": [1], **options})
        trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[pruning])
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    # No training step ran and nothing was masked.
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_scorer_instance_brings_its_value_and_settings_to_the_callback() -> None:
    scorer = ShapleyScorer(value="accuracy", weighting="band", method="exact")
    pruning = ShapleyPruning(scorer=scorer)
    assert pruning.scorer is scorer
    assert pruning.value_function is scorer.value_function  # judged with what it scores
    assert pruning.value_function.name == "accuracy"


def test_estimator_options_reach_the_estimator() -> None:
    pruning = ShapleyPruning(method="adaptive", estimator_options={"tolerance": 0.01})
    assert pruning.scorer.estimator.method == "adaptive"
    assert pruning.scorer.estimator.options == {
        "num_permutations": 32,
        "seed": 0,
        "tolerance": 0.01,
    }


def test_a_game_is_built_once_per_unit_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, ...]] = []
    original = ChannelGame.__init__

    def counting_init(self, model, layer, *args, **kwargs) -> None:
        built.append(tuple(layer))
        original(self, model, layer, *args, **kwargs)

    monkeypatch.setattr(ChannelGame, "__init__", counting_init)
    pruning = ShapleyPruning(amount=0.5, epochs=[0, 1], reporter=False)
    trainer = make_trainer(tmp_path, 2, [pruning], enable_checkpointing=False)
    trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=64))

    units = [(*unit.producers, *unit.batchnorms) for unit in pruning.units]
    # The dry run at set-up, then two steps: each game once, though each step has many rounds.
    assert built == units * 3
    # The first step had many rounds: more evaluations than two rounds valuing every channel
    # of every unit (sum(n + 1) each), though only its first values them all.
    assert pruning.history[0]["evaluations"] > 2 * (sum(CHANNELS) + len(CHANNELS))


def test_two_callbacks_on_one_trainer_keep_their_own_state(tmp_path: Path) -> None:
    first = ShapleyPruning(amount=0.5, epochs=[0], layers=["net.features.0"], reporter=False)
    second = ShapleyPruning(
        amount=0.25, epochs=[1], layers=["net.features.3"], scorer="l1", reporter=False
    )
    assert first.state_key != second.state_key
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, 2, [first, second, checkpoint])
    module = make_module()
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    assert saved[first.state_key]["history"][-1]["masks"].keys() == {"net.features.0"}
    assert saved[second.state_key]["history"][-1]["masks"].keys() == {"net.features.3"}
    assert first.history[-1]["sparsity"] == 0.5 and second.history[-1]["sparsity"] == 0.25


# --------------------------------------------------------------------------- all or nothing


class FailingValue:
    """The negative cross-entropy, raising ``error`` at its ``at``-th call once armed."""

    def __init__(self, error: BaseException, armed: bool = True, at: int = 50) -> None:
        self.error, self.armed, self.calls, self.at = error, armed, 0, at

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        self.calls += self.armed
        if self.calls == self.at:
            raise self.error
        return -F.cross_entropy(logits, targets).item()


class ModelSnapshot(Callback):
    """What the model is at the end of each epoch, before the pruning callback runs.

    Arms the failing value function at the start of epoch ``arm_at``.
    """

    def __init__(self, value: FailingValue, arm_at: int) -> None:
        self.value, self.arm_at = value, arm_at
        self.taken: dict = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.value.armed = self.value.armed or trainer.current_epoch == self.arm_at

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.taken = everything_of(pl_module)


def everything_of(module: nn.Module) -> dict:
    """Every tensor (cloned), parameter identity, hook, tensor attribute and flag of a model."""
    return {
        "tensors": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "parameters": [(name, id(p)) for name, p in module.named_parameters()],
        "hooks": [
            (name, len(m._forward_pre_hooks), len(m._load_state_dict_post_hooks))
            for name, m in module.named_modules()
        ],
        "attributes": [
            (name, sorted(k for k, v in vars(m).items() if isinstance(v, torch.Tensor)))
            for name, m in module.named_modules()
        ],
        "training": [m.training for m in module.modules()],
    }


def assert_same_model(ours: dict, theirs: dict) -> None:
    assert ours["tensors"].keys() == theirs["tensors"].keys()
    for key, tensor in ours["tensors"].items():
        assert torch.equal(tensor, theirs["tensors"][key]), key
    for part in ("parameters", "hooks", "attributes", "training"):
        assert ours[part] == theirs[part], part


def test_a_step_that_fails_half_way_leaves_the_model_and_history_as_before(tmp_path: Path) -> None:
    value = FailingValue(RuntimeError("the 50th evaluation failed"))
    snapshot = ModelSnapshot(value, arm_at=0)
    pruning = ShapleyPruning(amount=0.5, epochs=[0], value=value, reporter=False)
    trainer = make_trainer(tmp_path, 1, [snapshot, pruning], enable_checkpointing=False)
    module = make_module()
    with pytest.raises(RuntimeError, match="the 50th evaluation failed"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    assert value.calls == 50  # it failed inside the step, after rounds had pruned
    assert_same_model(everything_of(module), snapshot.taken)
    assert pruning.history == [] and pruning.dense_metric is None


def test_ctrl_c_in_a_later_step_undoes_that_step_only(tmp_path: Path) -> None:
    value = FailingValue(KeyboardInterrupt(), armed=False, at=10)  # mid-step: it takes more
    snapshot = ModelSnapshot(value, arm_at=1)
    pruning = ShapleyPruning(amount=0.5, epochs=[0, 1], value=value, reporter=False)
    trainer = make_trainer(tmp_path, 2, [snapshot, pruning], enable_checkpointing=False)
    module = make_module()
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown after Ctrl-C
            trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C from then on

    assert value.calls == 10
    assert_same_model(everything_of(module), snapshot.taken)
    (first,) = pruning.history  # the first step stands, masks and all
    for unit in pruning.units:
        assert pruned_channels(module, unit).tolist() == first["masks"][unit.name]


# ------------------------------------------------------------------- refused before training


def test_a_model_with_no_prunable_unit_is_refused_at_setup(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))  # the head only
    pruning = ShapleyPruning(epochs=[0], reporter=False)
    trainer = make_trainer(tmp_path, 1, [pruning], enable_checkpointing=False)
    with pytest.raises(ValueError, match="has no prunable unit"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


class FiniteOnce:
    """A value that is finite when the callback sets up, then ``bad``."""

    def __init__(self, bad: float) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        self.calls += 1
        return 0.0 if self.calls == 1 else self.bad


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_value_that_is_not_finite_is_refused_at_setup(tmp_path: Path, bad: float) -> None:
    pruning = ShapleyPruning(epochs=[0], value=lambda *_: bad, reporter=False)
    trainer = make_trainer(tmp_path, 1, [pruning], enable_checkpointing=False)
    with pytest.raises(ValueError, match=f"value='<lambda>' is {bad} on the scoring batches"):
        trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=64))
    assert trainer.global_step == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_leave_one_out_values_that_are_not_finite_are_refused(tmp_path: Path, bad: float) -> None:
    pruning = ShapleyPruning(epochs=[0], scorer="loo", value=FiniteOnce(bad), reporter=False)
    module = make_module()
    snapshot = ModelSnapshot(FailingValue(RuntimeError(), armed=False), arm_at=99)
    trainer = make_trainer(tmp_path, 1, [snapshot, pruning], enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"scorer 'loo' gave .* a score of NaN or infinity"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert_same_model(everything_of(module), snapshot.taken)
    assert pruning.history == []


def test_resuming_with_fewer_layers_than_the_checkpoint_pruned_is_refused(tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pruning = ShapleyPruning(amount=0.5, epochs=[0], scorer="l1", reporter=False)
    trainer = make_trainer(tmp_path, 1, [pruning, checkpoints])
    trainer.fit(make_module(), datamodule=DigitsDataModule(batch_size=64))

    narrower = ShapleyPruning(
        amount=0.5, epochs=[0], scorer="l1", layers=["net.features.0"], reporter=False
    )
    trainer = make_trainer(tmp_path / "resumed", 2, [narrower])
    with pytest.raises(
        ValueError, match=r"pruned the units \['net.features.3', 'net.features.7'\]"
    ):
        trainer.fit(
            make_module(seed=1),
            datamodule=DigitsDataModule(batch_size=64),
            ckpt_path=tmp_path / "ckpt" / "last.ckpt",
        )
    assert trainer.global_step == 1 * 8  # the first run's steps, none of the resumed run's


# ------------------------------------------------------------------- scoring data from fit


def digits_loaders() -> tuple[DataLoader, DataLoader]:
    data = DigitsDataModule(batch_size=64)
    return data.train_dataloader(), data.val_dataloader()


@pytest.mark.parametrize("with_val", [True, False])
def test_fit_with_loaders_scores_on_the_val_loader_else_the_train_loader(
    tmp_path: Path, with_val: bool
) -> None:
    train, val = digits_loaders()
    pruning = ShapleyPruning(amount=0.25, epochs=[0], score_batches=2, reporter=False)
    trainer = make_trainer(tmp_path, 1, [pruning], enable_checkpointing=False)
    trainer.fit(make_module(), train, val if with_val else None)

    source = val if with_val else train
    expected = [batch for _, batch in zip(range(2), source, strict=False)]
    assert len(pruning.scoring_batches) == 2
    for (x, y), (ex, ey) in zip(pruning.scoring_batches, expected, strict=True):
        if with_val:  # the training loader shuffles: only its shapes are comparable
            assert torch.equal(x, ex) and torch.equal(y, ey)
        assert x.shape == ex.shape
    assert pruning.history[-1]["sparsity"] == 0.25


# ------------------------------------------------------------------- checkpoints after pruning


def test_test_on_the_best_checkpoint_after_pruning_scores_the_weights_in_that_file(
    tmp_path: Path,
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    pruning = ShapleyPruning(amount=0.5, epochs=[1, 2], scorer="l1", reporter=False)
    trainer = make_trainer(tmp_path, 4, [pruning, checkpoint])
    module = make_module()
    data = DigitsDataModule(batch_size=64)
    trainer.fit(module, datamodule=data)
    assert any(name.endswith("_orig") for name, _ in module.named_parameters())  # still masked

    (tested,) = trainer.test(module, datamodule=data, ckpt_path="best")
    best = torch.load(checkpoint.best_model_path, weights_only=False)
    fresh = make_module(seed=3)
    fresh.load_state_dict(best["state_dict"])  # plain weights: a fresh model takes them
    (reference,) = lightning.Trainer(logger=False, enable_progress_bar=False).test(
        fresh, datamodule=data, verbose=False
    )
    assert tested["test/acc"] == reference["test/acc"]
    # The masks are the file's: its zero channels, whichever epoch it came from.
    for unit in pruning.units:
        zero = zero_rows(fresh, unit.name)
        assert torch.equal(pruned_channels(module, unit), zero)
    # validate and predict load the file the same way, and so does a trainer without us.
    (validated,) = trainer.validate(module, datamodule=data, ckpt_path="best", verbose=False)
    assert validated["val/acc"] == pytest.approx(float(checkpoint.best_model_score), abs=1e-6)
    plain = lightning.Trainer(logger=False, enable_progress_bar=False)
    x = data.test_dataloader().dataset.tensors[0][:16]
    loader = DataLoader(x, batch_size=16)  # the default predict_step calls the model on a batch
    (predicted,) = plain.predict(module, loader, ckpt_path=checkpoint.best_model_path)
    with torch.no_grad():
        assert torch.equal(predicted, fresh.eval()(x))


class TemplateModule(ImageClassifier):
    """lightning-hydra-template's habit: the network itself among the hyperparameters."""

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__(net, lr)
        self.save_hyperparameters(logger=False)


def test_load_from_checkpoint_with_the_network_in_the_hyperparameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TemplateModule(DigitsCNN(channels=CHANNELS))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pruning = ShapleyPruning(amount=0.5, epochs=[0], scorer="l1", reporter=False)
    trainer = make_trainer(tmp_path, 2, [pruning, checkpoint])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    last = tmp_path / "ckpt" / "last.ckpt"
    loaded = TemplateModule.load_from_checkpoint(last, weights_only=False).eval()  # a pickled net
    x = DigitsDataModule(batch_size=64).val_dataloader().dataset.tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))
    assert not any(name.endswith("_orig") for name, _ in loaded.named_parameters())
    assert any(name.endswith("_orig") for name, _ in module.named_parameters())  # untouched


class WaitCounts(Callback):
    """EarlyStopping's count of epochs without improvement after each epoch's check.

    Lightning runs EarlyStopping after the other callbacks at the end of an epoch, so the
    count is read when the next epoch starts.
    """

    def __init__(self, stopping: EarlyStopping) -> None:
        self.stopping, self.counts = stopping, {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.counts[trainer.current_epoch - 1] = self.stopping.wait_count


def test_best_is_never_a_pruned_epoch_ranked_by_its_dense_score(tmp_path: Path) -> None:
    # Saving at the end of each training epoch (Lightning's default when validation runs
    # every epoch) comes after the step: the validation before it measured other weights.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_top_k=-1
    )
    stopping = EarlyStopping(monitor="val/acc", mode="max", patience=10)
    waits = WaitCounts(stopping)
    pruning = ShapleyPruning(amount=0.5, epochs=[1, 2], scorer="l1", reporter=False)
    trainer = make_trainer(tmp_path, 4, [pruning, checkpoint, stopping, waits])
    data = DigitsDataModule(batch_size=64)
    trainer.fit(make_module(), datamodule=data)

    scores = {Path(path).name: float(score) for path, score in checkpoint.best_k_models.items()}
    for epoch in (1, 2):  # the pruning epochs rank last, whatever was measured before
        (name,) = [n for n in scores if n.startswith(f"epoch={epoch}-")]
        assert scores[name] == torch.finfo(torch.float32).min
    assert not Path(checkpoint.best_model_path).name.startswith(("epoch=1-", "epoch=2-"))
    best = torch.load(checkpoint.best_model_path, weights_only=False)
    fresh = make_module(seed=3)
    fresh.load_state_dict(best["state_dict"])
    (validated,) = lightning.Trainer(logger=False, enable_progress_bar=False).validate(
        fresh, datamodule=data, verbose=False
    )
    assert validated["val/acc"] == pytest.approx(float(checkpoint.best_model_score), abs=1e-6)
    assert waits.counts[1] >= 1 and waits.counts[2] >= 2  # pruning epochs do not improve
    assert trainer.callback_metrics["val/acc"] > 0  # the measured values are back after fit


def test_checkpoints_saved_at_validation_end_hold_the_weights_they_were_scored_on(
    tmp_path: Path,
) -> None:
    # Saved when validation ends, before the step: every file's score is its own weights'.
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="val/acc",
        mode="max",
        save_top_k=-1,
        save_on_train_epoch_end=False,
    )
    pruning = ShapleyPruning(amount=0.5, epochs=[1, 2], scorer="l1", reporter=False)
    trainer = make_trainer(tmp_path, 4, [pruning, checkpoint])
    data = DigitsDataModule(batch_size=64)
    trainer.fit(make_module(), datamodule=data)

    assert len(checkpoint.best_k_models) == 4
    for path, score in checkpoint.best_k_models.items():
        fresh = make_module(seed=3)
        fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
        (validated,) = lightning.Trainer(logger=False, enable_progress_bar=False).validate(
            fresh, datamodule=data, verbose=False
        )
        assert validated["val/acc"] == pytest.approx(float(score), abs=1e-6), Path(path).name
