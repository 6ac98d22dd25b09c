"""A custom value function and a custom batch layout.

The project's loaders give dict batches, ``{"image": ..., "label": ...}``, and what
matters is the macro F1 over the ten classes rather than the loss. Two arguments of the
callback say so:

* ``batch_transform`` turns a batch of the loader into ``(inputs, targets)`` (by default
  the callback takes a batch's first two items, which a dict does not have);
* ``value`` is what a coalition of channels is worth: any torchmetrics ``Metric`` (here
  ``MulticlassF1Score``), or any ``fn(logits, targets) -> float``, higher is better.

The Shapley values are then each channel's contribution to the F1, and the history's
``value_before`` / ``value_after`` are the F1 on the scoring batches around each step.

Run: ``python examples/custom_value_and_batches.py`` (``--quick`` for a few seconds, as CI does).
"""

import argparse

import lightning
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassF1Score

from lightning_shapley import ShapleyPruning
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN


class DictDigits(Dataset):
    """The digits as ``{"image": [1, 8, 8], "label": int}`` samples."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class DictClassifier(lightning.LightningModule):
    """A classifier whose steps read dict batches."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.net = DigitsCNN(channels=channels)
        self.f1 = MulticlassF1Score(num_classes=10, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.f1(self(batch["image"]), batch["label"])
        self.log("val_f1", self.f1, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def to_inputs_and_targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the callback scores on: the images and the labels of a dict batch."""
    return batch["image"], batch["label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, 3 epochs (CI)")
    quick = parser.parse_args().quick
    lightning.seed_everything(0)
    splits = digits_splits(seed=0)
    train = DataLoader(DictDigits(*splits.train.tensors), batch_size=64, shuffle=True)
    val = DataLoader(DictDigits(*splits.score.tensors), batch_size=100)

    pruning = ShapleyPruning(
        amount=0.5,
        epochs=[1] if quick else [6],
        value=MulticlassF1Score(num_classes=10, average="macro"),  # what a coalition is worth
        batch_transform=to_inputs_and_targets,  # how to read a batch
        score_dataloader=val,
        score_batches=1 if quick else 2,
        num_permutations=8 if quick else 16,
        method="permutation" if quick else "surrogate",  # CI: no surrogate to fit
    )
    model = DictClassifier(channels=(8, 8, 16) if quick else (16, 16, 32))
    trainer = lightning.Trainer(
        max_epochs=3 if quick else 10,
        callbacks=[pruning],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)

    step = pruning.history[-1]
    print(
        f"epoch {step['epoch']}: macro F1 on the scoring batches {step['value_before']:.3f} "
        f"-> {step['value_after']:.3f} after pruning {step['sparsity']:.0%} of the channels"
    )
    for unit, values in step["values"].items():
        pruned = [c for c, is_pruned in enumerate(step["masks"][unit]) if is_pruned]
        lowest = ", ".join(f"{values[c]:+.3f}" for c in pruned)
        print(f"{unit}: pruned channels {pruned}, whose F1 Shapley values were {lowest}")
    print(f"val_f1 after fine-tuning: {trainer.callback_metrics['val_f1']:.3f}")


if __name__ == "__main__":
    main()
