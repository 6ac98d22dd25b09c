"""The ShapleyPruning callback in real Trainer.fit runs on the digits data."""

import csv
from pathlib import Path

import lightning
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_shapley import ChannelGame
from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.data import DigitsDataModule
from lightning_shapley.masking import prune_channels, pruned_channels
from lightning_shapley.models import DigitsCNN, ImageClassifier
from lightning_shapley.units import find_units

CHANNELS = (16, 16, 32)
UNITS = {"net.features.0": "net.features.1", "net.features.3": "net.features.4"}
UNITS |= {"net.features.7": "net.features.8"}


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
        limit_train_batches=8,
        **options,
    )


def logged(tmp_path: Path) -> list[dict[str, str]]:
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


def zero_rows(module: torch.nn.Module, name: str) -> torch.Tensor:
    weight = module.get_submodule(name).weight.detach()
    return weight.reshape(len(weight), -1).abs().sum(1) == 0


# --------------------------------------------------------------------------- end to end


def test_pruning_on_schedule_keeps_channels_zero_through_fine_tuning(tmp_path: Path) -> None:
    module = make_module()
    pruning = ShapleyPruning(amount=0.5, epochs=[1, 2, 3], num_permutations=8)
    trainer = make_trainer(tmp_path, max_epochs=5, callbacks=[pruning], enable_checkpointing=False)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))

    assert [step["epoch"] for step in pruning.history] == [1, 2, 3]
    for unit in pruning.units:
        pruned = pruned_channels(module, unit)
        assert int(pruned.sum()) == unit.n_channels // 2
        # Zero in every coupled parameter after two more epochs of fine-tuning.
        producer = module.get_submodule(unit.name)
        assert torch.equal(zero_rows(module, unit.name), pruned)
        if producer.bias is not None:
            assert (producer.bias[pruned] == 0).all()
        batchnorm = module.get_submodule(UNITS[unit.name])
        assert (batchnorm.weight[pruned] == 0).all() and (batchnorm.bias[pruned] == 0).all()
        assert (batchnorm.weight[~pruned] != 0).all()

    rows = [row for row in logged(tmp_path) if row.get("pruning/target_sparsity")]
    targets = [float(row["pruning/target_sparsity"]) for row in rows]
    # The cubic ramp to 0.5 over three steps.
    assert targets == pytest.approx([0.5 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)])
    for row in rows:
        for key in ("pruning/accuracy_before", "pruning/accuracy_after", "pruning/parameters"):
            assert row[key] != ""
        assert float(row["pruning/scoring_seconds"]) > 0
        assert float(row["pruning/evaluations"]) > 0
        assert float(row["pruning/sparsity/net.features.3"]) <= 0.5
    assert float(rows[-1]["pruning/sparsity"]) == pytest.approx(
        sum(n // 2 for n in CHANNELS) / sum(CHANNELS)
    )


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
        ({"amount": 0.9, "min_channels": 4}, r"min_channels=4"),
        ({"score_dataloader": bad_batches()}, r"cannot be unpacked into \(inputs, targets\)"),
        ({"scope": "everything"}, r"scope='everything' is not known"),
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
