"""The embedded dataset: scikit-learn's 8x8 handwritten digits, which ships with the package."""

from collections.abc import Iterator
from dataclasses import dataclass

import lightning
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Sampler, TensorDataset

NUM_CLASSES = 10
# Pixel intensities in load_digits are integers 0..16.
_MAX_PIXEL = 16.0


@dataclass(frozen=True)
class DigitsSplits:
    """The three disjoint, class-stratified splits of the digits data.

    Attributes:
        train: Training images and labels.
        score: Held-out data on which channels are scored (the validation split).
        test: Data touched only for the final test.
    """

    train: TensorDataset
    score: TensorDataset
    test: TensorDataset


def digits_splits(seed: int = 0, train: int = 1200, score: int = 200) -> DigitsSplits:
    """Split the 1797 digits into stratified train, score and test sets.

    Images are float32 tensors of shape ``(N, 1, 8, 8)`` scaled to ``[0, 1]``; targets are
    int64 class labels. The test split holds every sample not in train or score.

    Args:
        seed: Seed of the split; the same seed gives the same split.
        train: Number of training samples.
        score: Number of scoring (validation) samples.

    Returns:
        The train, score and test datasets.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> splits = digits_splits(seed=0)
        >>> len(splits.train), len(splits.score), len(splits.test)
        (1200, 200, 397)
    """
    images, targets = load_digits(return_X_y=True)
    _check_split_args(seed, train, score, total=len(targets))
    train_idx, rest_idx = train_test_split(
        np.arange(len(targets)), train_size=train, stratify=targets, random_state=seed
    )
    score_idx, test_idx = train_test_split(
        rest_idx, train_size=score, stratify=targets[rest_idx], random_state=seed
    )
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / _MAX_PIXEL
    y = torch.as_tensor(targets, dtype=torch.int64)

    def subset(idx: np.ndarray) -> TensorDataset:
        idx = torch.as_tensor(idx)
        return TensorDataset(x[idx], y[idx])

    return DigitsSplits(train=subset(train_idx), score=subset(score_idx), test=subset(test_idx))


def _check_split_args(seed: int, train: int, score: int, total: int) -> None:
    # Stratification needs at least one sample of every class in every split.
    errors = []
    if not 0 <= seed < 2**32:
        errors.append(f"seed={seed!r} must be in [0, 2**32)")
    if train < NUM_CLASSES:
        errors.append(f"train={train!r} must be at least {NUM_CLASSES} (one sample per class)")
    if score < NUM_CLASSES:
        errors.append(f"score={score!r} must be at least {NUM_CLASSES} (one sample per class)")
    if train + score > total - NUM_CLASSES:
        errors.append(
            f"train + score = {train + score} must be at most {total - NUM_CLASSES}, "
            f"leaving at least {NUM_CLASSES} of the {total} samples for test"
        )
    if errors:
        raise ValueError("; ".join(errors))


class DigitsDataModule(lightning.LightningDataModule):
    """Lightning data module over :func:`digits_splits`.

    The validation loader serves the score split, the held-out data on which pruning scores
    channels; the test loader serves the test split.

    Args:
        batch_size: Samples per batch in every loader.
        seed: Seed of the split and of the training shuffle.
        num_workers: Worker processes per loader.
    """

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        errors = []
        if batch_size < 1:
            errors.append(f"batch_size={batch_size!r} must be a positive integer")
        if num_workers < 0:
            errors.append(f"num_workers={num_workers!r} must be a non-negative integer")
        if errors:
            raise ValueError("; ".join(errors))
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.splits: DigitsSplits | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; later stages reuse them."""
        if self.splits is None:
            self.splits = digits_splits(seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches: each epoch's order is fixed by ``seed`` and the epoch.

        So a run resumed from a checkpoint sees the same batches as one never interrupted.
        """
        sampler = EpochShuffle(len(self._splits().train), self.seed)
        return self._loader(self._splits().train, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Batches of the score split, in a fixed order."""
        return self._loader(self._splits().score)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split, in a fixed order."""
        return self._loader(self._splits().test)

    def _splits(self) -> DigitsSplits:
        # Loaders may be requested outside a Trainer (e.g. to fetch scoring batches).
        self.setup()
        assert self.splits is not None
        return self.splits

    def _loader(self, dataset: TensorDataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, **kwargs
        )


class EpochShuffle(Sampler[int]):
    """A random order of ``size`` indices drawn from ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` before each training epoch; the order does not depend
    on how many epochs this sampler has served, unlike a generator seeded once.

    Example:
        >>> sampler = EpochShuffle(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> first = list(sampler)
        >>> again = EpochShuffle(5, seed=0)
        >>> again.set_epoch(3)
        >>> list(again) == first, sorted(first)
        (True, [0, 1, 2, 3, 4])
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order :meth:`__iter__` gives."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_EPOCH_STRIDE * self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


# Seeds of different (seed, epoch) pairs never meet for fewer epochs than this.
_EPOCH_STRIDE = 1_000_003
