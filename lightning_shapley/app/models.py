"""The embedded model: a small CNN for 8x8 digits, and a Lightning module to train classifiers."""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import nn

from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.pruning.schedule import last_step_epoch

Batch = tuple[torch.Tensor, torch.Tensor]


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU blocks, a 2x2 max-pool after the second block, global pooling, a linear head.

    With the default ``channels=(32, 32, 64)`` the prunable convolutions are
    ``features.0``, ``features.3`` and ``features.7``; ``classifier`` is the output layer.

    Args:
        channels: Output channels of each convolution; at least two.
        num_classes: Number of output logits.
        in_channels: Channels of the input images.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> net = DigitsCNN()
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, channels: Sequence[int] = (32, 32, 64), num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        errors = []
        if len(channels) < 2 or any(c < 1 for c in channels):
            errors.append(
                f"channels={tuple(channels)!r} must hold at least two positive integers "
                "(the max-pool follows the second block)"
            )
        if num_classes < 1:
            errors.append(f"num_classes={num_classes!r} must be a positive integer")
        if in_channels < 1:
            errors.append(f"in_channels={in_channels!r} must be a positive integer")
        if errors:
            raise ValueError("; ".join(errors))
        inputs = [in_channels, *channels[:-1]]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(inputs, channels, strict=True)):
            layers += _conv_bn_relu(c_in, c_out)
            if i == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, num_classes)`` for images of shape ``(N, in_channels, H, W)``."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # The BatchNorm's shift makes a convolution bias redundant.
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class ImageClassifier(lightning.LightningModule):
    """Trains any classifier ``net`` with cross-entropy and Adam; logs loss and accuracy.

    Logged metrics: ``train/loss``; ``val/loss`` and ``val/acc``; ``test/loss`` and
    ``test/acc``.

    With ``anneal`` the learning rate is ``lr`` until the last pruning step and then falls
    along a half cosine over the epochs left (:class:`CosineAfter`), so that the fine-tune
    settles instead of ending wherever the last epoch at a constant rate left it. The last
    step is that of the trainer's :class:`~lightning_shapley.ShapleyPruning` callback;
    without one the whole run anneals. A schedule that searches for its sparsity
    (``UntilDrop``) has no last step known in advance, and keeps ``lr`` constant.

    Args:
        net: A module mapping inputs to logits of shape ``(N, num_classes)``.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        anneal: Whether the learning rate falls after the last pruning step.
    """

    def __init__(
        self, net: nn.Module, lr: float = 1e-2, weight_decay: float = 0.0, anneal: bool = True
    ) -> None:
        super().__init__()
        errors = []
        if lr <= 0:
            errors.append(f"lr={lr!r} must be positive")
        if weight_decay < 0:
            errors.append(f"weight_decay={weight_decay!r} must be non-negative")
        if not isinstance(anneal, bool):
            errors.append(f"anneal={anneal!r} must be true or false")
        if errors:
            raise ValueError("; ".join(errors))
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``net``."""
        return self.net(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch, logged as ``train/loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, batch_size=len(y))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``val/loss`` and ``val/acc``."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Log ``test/loss`` and ``test/acc``."""
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        """Adam over all parameters of ``net``, annealed after the last pruning step."""
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        max_epochs = self.trainer.max_epochs
        start = self._last_pruning_epoch()
        if not self.hparams.anneal or start is None or not max_epochs or max_epochs < 1:
            return optimizer
        factor = CosineAfter(start=start, epochs=max_epochs - 1 - start)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _last_pruning_epoch(self) -> int | None:
        # -1 without a pruning callback: every epoch comes after the (absent) last step.
        pruning = [c for c in self.trainer.callbacks if isinstance(c, ShapleyPruning)]
        return last_step_epoch(pruning[0].schedule) if pruning else -1

    def _evaluate(self, batch: Batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        # Weighting each batch by its size makes the epoch means exact over the whole split.
        metrics = {
            f"{stage}/loss": F.cross_entropy(logits, y),
            f"{stage}/acc": (logits.argmax(dim=1) == y).float().mean(),
        }
        self.log_dict(metrics, batch_size=len(y))


@dataclass(frozen=True)
class CosineAfter:
    """A learning-rate factor per epoch: 1 up to epoch ``start``, then a half cosine.

    The ``epochs`` after ``start`` take the cosine's inner points, so the first of them still
    learns at nearly the full rate and the last at a small one, never zero.

    Example:
        >>> [round(CosineAfter(start=1, epochs=3)(epoch), 3) for epoch in range(5)]
        [1.0, 1.0, 0.854, 0.5, 0.146]
    """

    start: int
    epochs: int

    def __call__(self, epoch: int) -> float:
        """The factor of the learning rate in ``epoch`` (0-based)."""
        if epoch <= self.start:
            return 1.0
        progress = min(epoch - self.start, self.epochs) / (self.epochs + 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
