"""Small models of the shapes the channel game must handle, all for 1x8x8 digit images.

Their BatchNorm statistics and affine parameters are randomized, so that a BatchNorm shift
leaking through a masked channel, or a wrong channel being zeroed, changes the logits.
At the end, :func:`pruned_values` is the reference a game must equal: the metric of the
model pruned by ``masking.py``.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning.masking import copy_model, prune_channels
from lightning_shapley.pruning.units import PrunableUnit


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                shape = module.num_features
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.5)
    return model.eval()


class DataDependentCNN(nn.Module):
    """A conv block whose forward branches on the data: ``torch.fx`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        if x.sum() > 0:
            h = h * 2.0
        return self.head(h.mean((2, 3)))


class ShapeBranchingCNN(DataDependentCNN):
    """The same block, branching on the input's rank: ``torch.export`` captures it, fx cannot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # a batch of single-channel images without their channel axis
            x = x.unsqueeze(1)
        h = F.relu(self.bn(self.conv(x)))
        return self.head(h.mean((2, 3)))


class ResidualBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``: the input crosses every cut inside."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResidualNet(nn.Module):
    """A stem convolution, one residual block and a pooled linear head."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.block = ResidualBlock(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def mlp(hidden: int = 12) -> nn.Sequential:
    """Flatten, then Linear-BatchNorm1d-ReLU-Linear-ReLU-Linear; layer ``"1"`` is prunable."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def flatten_head_cnn(channels: int = 6) -> nn.Sequential:
    """A conv block whose output is flattened straight into the linear head."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 64, 10),
    )


class LSTMNet(nn.Module):
    """Reads the image row by row with an LSTM: the LSTM's output is a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.flatten(1, 2))
        return self.head(out[:, -1])


class ProjectionBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with a 1x1 conv + BN shortcut."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ProjectionNet(ProjectionBlock):
    """A stem, then a :class:`ProjectionBlock`, pooling and a linear head.

    The block's output is one unit of two producers, ``conv2`` and ``shortcut.0``, neither
    downstream of the other.
    """

    def __init__(self, c_in: int = 4, c_out: int = 6) -> None:
        super().__init__(c_in, c_out)
        self.stem = nn.Sequential(
            nn.Conv2d(1, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()
        )
        self.head = nn.Linear(c_out, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(self.stem(x)).mean((2, 3)))


class InvertedResidualNet(nn.Module):
    """A stem and a MobileNetV2 block: expand 1x1, depthwise 3x3, project 1x1, identity skip.

    Two units have two producers: the expanded channels (``expand`` and ``depthwise``, the
    second downstream of the first) and the residual stream (``stem.0`` and ``project``).
    """

    def __init__(self, channels: int = 4, expanded: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU6()
        )
        self.expand = nn.Conv2d(channels, expanded, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(expanded)
        self.depthwise = nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False)
        self.bn2 = nn.BatchNorm2d(expanded)
        self.project = nn.Conv2d(expanded, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out)) + x
        return self.head(out.mean((2, 3)))


class PreActResidualNet(nn.Module):
    """A pre-activation residual block: ``x + conv2(relu(bn2(conv1(relu(bn1(x))))))``.

    The stem's output goes both into ``bn1`` and along the skip, so masking after that
    BatchNorm alone would not zero it; the stream's last BatchNorm follows the add.
    """

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = x + self.conv2(F.relu(self.bn2(out)))
        return self.head(F.relu(self.bn_out(out)).mean((2, 3)))


# --------------------------------------------------------------------------- the pruned model


def pruned_copy(model: nn.Module, unit: PrunableUnit, pruned: Tensor) -> nn.Module:
    """A deep copy of ``model`` in eval mode with the channels ``pruned`` of ``unit`` pruned.

    ``masking.prune_channels`` keeps at least one channel, so with every channel pruned
    (the empty coalition) the same parameters are zeroed by hand: the producers' weights
    and biases, the BatchNorms' weights and biases. ``copy_model`` copies a model that is
    masked already, whose computed ``weight`` ``copy.deepcopy`` refuses.
    """
    replica = copy_model(model).eval()
    if bool(pruned.all()):
        with torch.no_grad():
            for name in (*unit.producers, *unit.batchnorms):
                module = replica.get_submodule(name)
                for tensor_name in ("weight", "bias"):
                    # A masked module recomputes its weight from weight_orig at every forward.
                    parameter = getattr(module, f"{tensor_name}_orig", None)
                    if parameter is None:
                        parameter = getattr(module, tensor_name)
                    if parameter is not None:
                        parameter.zero_()
    else:
        prune_channels(replica, unit, pruned)
    return replica


def negative_cross_entropy(logits: Tensor, targets: Tensor) -> float:
    return -F.cross_entropy(logits.float(), targets).item()


def pruned_values(
    model: nn.Module,
    unit: PrunableUnit,
    batches: list[tuple[Tensor, Tensor]],
    coalitions: Tensor,
    value: Callable[[Tensor, Tensor], float] = negative_cross_entropy,
) -> Tensor:
    """Values of boolean ``[m, n_channels]`` coalitions: the metric of the pruned model.

    For each coalition, a copy of the model with the unit's channels outside it pruned by
    ``masking.prune_channels`` runs every batch once.
    """
    targets = torch.cat([y for _, y in batches])
    values = []
    for coalition in torch.as_tensor(coalitions, dtype=torch.bool):
        replica = pruned_copy(model, unit, ~coalition)
        with torch.no_grad():
            logits = torch.cat([replica(x) for x, _ in batches])
        values.append(value(logits, targets))
    return torch.tensor(values, dtype=torch.float64)


def train_digits_cnn(
    train: Dataset, channels: tuple[int, ...], epochs: int, seed: int
) -> nn.Module:
    """A DigitsCNN trained with a plain loop (Adam, batches of 64), returned in eval mode."""
    torch.manual_seed(seed)
    net = DigitsCNN(channels=channels)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    loader = DataLoader(
        train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    net.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    return net.eval()
