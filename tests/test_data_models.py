import itertools
import math
import re
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits

from lightning_shapley import ShapleyPruning, UntilDrop
from lightning_shapley.app.data import DigitsDataModule, digits_splits
from lightning_shapley.app.models import CosineAfter, DigitsCNN, ImageClassifier
from lightning_shapley.pruning.schedule import Gradual, MiddleOfTraining, OneShot, last_step_epoch


def test_split_sizes(digits_splits_fixture):
    splits = digits_splits_fixture
    assert (len(splits.train), len(splits.score), len(splits.test)) == (1200, 200, 397)


def test_splits_are_stratified(digits_splits_fixture):
    full = torch.cat([ds.tensors[1] for ds in vars(digits_splits_fixture).values()])
    overall = torch.bincount(full, minlength=10).double() / len(full)
    for dataset in vars(digits_splits_fixture).values():
        targets = dataset.tensors[1]
        share = torch.bincount(targets, minlength=10).double() / len(targets)
        # Stratification keeps each class's share within about one sample of the whole set's.
        assert torch.all((share - overall).abs() <= 1.5 / len(targets))


def test_splits_partition_the_dataset(digits_splits_fixture):
    images, _ = load_digits(return_X_y=True)
    splits = digits_splits_fixture
    ours = torch.cat([ds.tensors[0] for ds in (splits.train, splits.score, splits.test)])
    expected = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    # Equal multisets of images (the set holds a few duplicate images, so no set logic):
    # every sample lands in exactly one split.
    assert sorted(_bytes(ours)) == sorted(_bytes(expected))


def _bytes(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def test_value_ranges_and_dtypes(digits_splits_fixture):
    for dataset in vars(digits_splits_fixture).values():
        x, y = dataset.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        assert set(y.tolist()) == set(range(10))
    assert digits_splits_fixture.train.tensors[0].max() == 1


def test_split_depends_on_seed_only():
    a, b, c = digits_splits(seed=0), digits_splits(seed=0), digits_splits(seed=1)
    assert torch.equal(a.score.tensors[0], b.score.tensors[0])
    assert not torch.equal(a.score.tensors[0], c.score.tensors[0])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seed": -1}, "seed"),
        ({"train": 5}, "train"),
        ({"score": 0}, "score"),
        ({"train": 1700, "score": 90}, "train + score"),
    ],
)
def test_digits_splits_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(name)):
        digits_splits(**kwargs)


def test_datamodule_loaders():
    dm = DigitsDataModule(batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert sum(len(y) for _, y in dm.val_dataloader()) == 200
    assert sum(len(y) for _, y in dm.test_dataloader()) == 397


def test_datamodule_val_loader_is_fixed():
    dm = DigitsDataModule()
    first = [y for _, y in dm.val_dataloader()]
    second = [y for _, y in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_datamodule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size=0"):
        DigitsDataModule(batch_size=0)


@pytest.mark.parametrize("channels", [(32, 32, 64), (8, 8), (4, 6, 8, 10)])
def test_cnn_output_shape(channels):
    net = DigitsCNN(channels=channels, num_classes=7)
    assert net(torch.zeros(5, 1, 8, 8)).shape == (5, 7)
    assert net.classifier.in_features == channels[-1]


def test_cnn_layout():
    net = DigitsCNN()
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == [
        "Conv2d", "BatchNorm2d", "ReLU",
        "Conv2d", "BatchNorm2d", "ReLU",
        "MaxPool2d",
        "Conv2d", "BatchNorm2d", "ReLU",
    ]  # fmt: skip
    assert [net.features[i].out_channels for i in (0, 3, 7)] == [32, 32, 64]
    assert all(net.features[i].bias is None for i in (0, 3, 7))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"channels": (32,)}, "channels"),
        ({"channels": (8, 0)}, "channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_cnn_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsCNN(**kwargs)


def test_classifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lr=0"):
        ImageClassifier(DigitsCNN(), lr=0)
    with pytest.raises(ValueError, match="anneal='yes' must be true or false"):
        ImageClassifier(DigitsCNN(), anneal="yes")


def test_cosine_after_holds_until_its_start_then_falls_without_reaching_zero():
    factor = CosineAfter(start=2, epochs=4)
    values = [factor(epoch) for epoch in range(8)]
    assert values[:3] == [1.0, 1.0, 1.0]
    falling = values[3:7]
    assert all(a > b for a, b in itertools.pairwise(falling))
    assert falling == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(1, 5)])
    assert values[7] == values[6] > 0  # past the end it stays at the last epoch's rate


def test_the_last_step_epoch_of_each_kind_of_schedule():
    assert last_step_epoch(OneShot(0.5, epoch=4)) == 4
    assert last_step_epoch(Gradual(0.5, epochs=(2, 5, 7))) == 7
    middle = MiddleOfTraining(0.5)
    assert last_step_epoch(middle) is None  # its epochs follow from max_epochs, not yet given
    middle.validate(max_epochs=12)
    assert last_step_epoch(middle) == middle.epochs[-1]
    assert last_step_epoch(UntilDrop(step=0.1, tolerance=0.02)) is None


class _LearningRates(lightning.Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def _trainer(tmp_path: Path, max_epochs: int, **options: object) -> lightning.Trainer:
    """A quiet CPU trainer writing nothing but into ``tmp_path``; ``options`` override."""
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return lightning.Trainer(max_epochs=max_epochs, **(settings | options))


def _fit(module, max_epochs: int, callbacks: list, tmp_path: Path) -> None:
    _trainer(
        tmp_path, max_epochs, limit_train_batches=3, limit_val_batches=1, callbacks=callbacks
    ).fit(module, datamodule=DigitsDataModule(batch_size=32))


def test_the_learning_rate_falls_after_the_last_pruning_step_of_a_real_fit(tmp_path):
    lightning.seed_everything(0)
    rates = _LearningRates()
    pruning = ShapleyPruning(amount=0.5, epochs=[1, 2], score_batches=1, reporter=False)
    _fit(ImageClassifier(DigitsCNN(channels=(8, 8, 16)), lr=0.01), 6, [pruning, rates], tmp_path)
    assert len(pruning.history) == 2
    expected = [0.01 * CosineAfter(start=2, epochs=3)(epoch) for epoch in range(6)]
    assert rates.seen == pytest.approx(expected)
    assert rates.seen[:3] == [0.01] * 3 and rates.seen[-1] < 0.002


def test_without_a_pruning_callback_the_whole_run_anneals(tmp_path):
    rates = _LearningRates()
    _fit(ImageClassifier(DigitsCNN(channels=(8, 8, 16)), lr=0.01), 3, [rates], tmp_path)
    assert rates.seen == pytest.approx([0.01 * CosineAfter(-1, 3)(epoch) for epoch in range(3)])


@pytest.mark.parametrize(
    "module, callbacks",
    [
        (ImageClassifier(DigitsCNN(channels=(8, 8, 16)), anneal=False), []),
        # A search's last step is not known before training: the rate stays as it is.
        (
            ImageClassifier(DigitsCNN(channels=(8, 8, 16))),
            [
                ShapleyPruning(
                    schedule=UntilDrop(step=0.25, tolerance=0.5), score_batches=1, reporter=False
                )
            ],
        ),
    ],
    ids=["anneal=False", "UntilDrop"],
)
def test_a_constant_learning_rate_where_there_is_nothing_to_anneal_after(
    module, callbacks, tmp_path
):
    rates = _LearningRates()
    _fit(module, 3, [*callbacks, rates], tmp_path)
    assert rates.seen == [0.01] * 3


def test_trained_cnn_accuracy(trained_cnn, digits_splits_fixture):
    x, y = digits_splits_fixture.test.tensors
    with torch.no_grad():
        accuracy = (trained_cnn(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.9
    assert not trained_cnn.training


def test_score_batches(score_batches):
    assert [tuple(x.shape) for x, _ in score_batches] == [(50, 1, 8, 8), (50, 1, 8, 8)]


def test_trainer_fit_logs_validation_accuracy(tmp_path):
    lightning.seed_everything(0)
    module = ImageClassifier(DigitsCNN(channels=(8, 8, 16)))
    trainer = _trainer(tmp_path, 1, devices=1, limit_train_batches=5, limit_val_batches=2)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert 0 <= metrics["val/acc"] <= 1
    assert module.hparams.lr == 1e-2


def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(tmp_path: Path) -> None:
    def trainer(max_epochs: int, **options: object) -> lightning.Trainer:
        return _trainer(tmp_path, max_epochs, limit_train_batches=6, limit_val_batches=0, **options)

    def module() -> ImageClassifier:
        torch.manual_seed(0)
        # Constant rate: the stand-in for an interrupted run stops at max_epochs=2, and an
        # annealed rate would follow a 2-epoch cosine there rather than the 3-epoch one.
        return ImageClassifier(DigitsCNN(channels=(8, 8, 16)), anneal=False)

    uninterrupted = module()
    trainer(3).fit(uninterrupted, datamodule=DigitsDataModule())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = module()
    trainer(2, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        first, datamodule=DigitsDataModule()
    )
    resumed = module()
    trainer(3).fit(
        resumed, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    for (name, ours), theirs in zip(
        resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
