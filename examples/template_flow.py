"""lightning-hydra-template's flow with Shapley pruning added as one callbacks config.

A module in the template's style (the network saved among its hyperparameters, val/acc
and its best so far as torchmetrics), ModelCheckpoint on val/acc and EarlyStopping as the
template configures them, ``template_callbacks/shapley_pruning.yaml`` instantiated as the
template's ``train.py`` instantiates its callbacks, then ``trainer.test(ckpt_path="best")``
and ``load_from_checkpoint``, and the reloaded model compacted.

Run: ``python examples/template_flow.py`` (``--quick`` for a few seconds, as CI does).
"""

import argparse
from pathlib import Path

import hydra
import lightning
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import OmegaConf
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_shapley import compact
from lightning_shapley.app.data import DigitsDataModule

HERE = Path(__file__).resolve().parent


class DigitsLitModule(lightning.LightningModule):
    """Written in the template's style: ``net`` is a constructor argument and a hyperparameter."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes=10)
        self.test_acc = MulticlassAccuracy(num_classes=10)
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for CI")
    parser.add_argument("--out", default="template_flow", help="where checkpoints go")
    args = parser.parse_args()
    lightning.seed_everything(0)

    # What the template's configs/callbacks/ compose, and ours beside them.
    callbacks_cfg = OmegaConf.load(HERE / "template_callbacks" / "shapley_pruning.yaml")
    if args.quick:
        callbacks_cfg.shapley_pruning.epochs = [1, 2]
    callbacks = [hydra.utils.instantiate(cfg) for cfg in callbacks_cfg.values()]
    checkpoint = ModelCheckpoint(
        dirpath=Path(args.out) / "checkpoints", monitor="val/acc", mode="max", save_last=True
    )
    callbacks += [checkpoint, EarlyStopping(monitor="val/acc", mode="max", patience=3)]

    module = DigitsLitModule(small_cnn())
    data = DigitsDataModule(batch_size=64)
    trainer = lightning.Trainer(
        max_epochs=4 if args.quick else 8,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    # The network among the hyperparameters is pickled: torch.load needs weights_only=False.
    (tested,) = trainer.test(
        module, datamodule=data, ckpt_path="best", verbose=False, weights_only=False
    )

    reloaded = DigitsLitModule.load_from_checkpoint(checkpoint.best_model_path, weights_only=False)
    (again,) = lightning.Trainer(logger=False, enable_progress_bar=False).test(
        reloaded, datamodule=data, verbose=False
    )
    x = next(iter(data.val_dataloader()))[0]
    small = compact(reloaded.eval(), x)
    dense = sum(p.numel() for p in reloaded.parameters())
    kept = sum(p.numel() for p in small.parameters())
    print(f"best checkpoint: {Path(checkpoint.best_model_path).name}")
    print(f"test on best: {tested['test/acc']:.4f}; reloaded: {again['test/acc']:.4f}")
    print(f"compact of the reloaded model: {dense:,} -> {kept:,} parameters")


if __name__ == "__main__":
    main()
