"""Shapley pruning in an existing Lightning project: the lines marked ``# +`` are all it takes.

Everything else is a plain Lightning project of its own (a small CNN on scikit-learn's
digits, its own loaders), not the package's embedded model. The callback scores the
channels of both convolutions on the validation loader at the end of epochs 5 and 7,
prunes half of them in two steps, and training fine-tunes the rest; ``compact`` then
removes the pruned channels physically.

Run: ``python examples/plain_lightning.py`` (``--quick`` for a few seconds, as CI does).
"""

import argparse

import lightning
import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_shapley import ShapleyPruning, compact  # +


class DigitsModel(lightning.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loaders() -> tuple[DataLoader, DataLoader]:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=128),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs instead of 10 (CI)")
    quick = parser.parse_args().quick
    lightning.seed_everything(0)
    train, val = loaders()
    model = DigitsModel()

    # CI: fewer epochs, one scoring batch, plain sampling (no surrogate to fit).
    small_settings = {"method": "permutation", "num_permutations": 8, "score_batches": 1}
    pruning = ShapleyPruning(  # +
        amount=0.5,  # + half of each convolution's channels...
        epochs=[0, 1] if quick else [5, 7],  # + ...in two steps, at the end of these epochs
        score_dataloader=val,  # + held-out batches (by default: the datamodule's val loader)
        **(small_settings if quick else {}),
    )  # +
    trainer = lightning.Trainer(
        max_epochs=3 if quick else 10,
        callbacks=[pruning],  # +
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)

    small = compact(model, next(iter(val))[0])  # + the pruned channels removed physically
    dense, kept = (sum(p.numel() for p in m.parameters()) for m in (model, small))  # +
    print(f"parameters: {dense:,} dense, {kept:,} compact")  # +
    for step in pruning.history:
        print(
            f"epoch {step['epoch']}: sparsity {step['sparsity']:.2f}, scoring accuracy "
            f"{step['accuracy_before']:.3f} -> {step['accuracy_after']:.3f}, "
            f"{step['evaluations']} evaluations in {step['scoring_seconds']:.1f} s"
        )
    print(f"val_acc after fine-tuning: {trainer.callback_metrics['val_acc']:.3f}")


if __name__ == "__main__":
    main()
