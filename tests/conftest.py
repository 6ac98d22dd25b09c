import pytest
import torch
from models_for_tests import train_digits_cnn

from lightning_shapley.app.data import DigitsSplits, digits_splits
from lightning_shapley.app.models import DigitsCNN


@pytest.fixture(scope="session")
def digits_splits_fixture() -> DigitsSplits:
    return digits_splits(seed=0)


@pytest.fixture(scope="session")
def trained_cnn(digits_splits_fixture: DigitsSplits) -> DigitsCNN:
    """A small DigitsCNN trained with a plain loop (no Trainer): >90% test accuracy in seconds."""
    return train_digits_cnn(digits_splits_fixture.train, (16, 16, 32), epochs=8, seed=0)


@pytest.fixture(scope="session")
def score_batches(digits_splits_fixture: DigitsSplits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 50 from the score split, the same every run."""
    x, y = digits_splits_fixture.score.tensors
    return [(x[i : i + 50], y[i : i + 50]) for i in (0, 50)]
