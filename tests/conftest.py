import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch.utils.data import DataLoader

from lightning_shapley.data import DigitsSplits, digits_splits
from lightning_shapley.models import DigitsCNN


@pytest.fixture(scope="session")
def digits_splits_fixture() -> DigitsSplits:
    return digits_splits(seed=0)


@pytest.fixture(scope="session")
def trained_cnn(digits_splits_fixture: DigitsSplits) -> DigitsCNN:
    """A small DigitsCNN trained with a plain loop (no Trainer): >90% test accuracy in seconds."""
    torch.manual_seed(0)
    net = DigitsCNN(channels=(16, 16, 32))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loader = DataLoader(
        digits_splits_fixture.train,
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    net.train()
    for _ in range(8):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval()


@pytest.fixture(scope="session")
def score_batches(digits_splits_fixture: DigitsSplits) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 50 from the score split, the same every run."""
    x, y = digits_splits_fixture.score.tensors
    return [(x[i : i + 50], y[i : i + 50]) for i in (0, 50)]
