"""The benchmarks' networks and the data sets they make themselves (nothing is downloaded).

Images: the residual CNN on the digits, He et al.'s CIFAR ResNets, and generated pictures of
shapes (:func:`shape_splits`). Sequences: noisy waveforms (:func:`signal_splits`), token
sequences to count markers in (:func:`marker_splits`) or to find a spaced motif in
(:func:`motif_splits`). Transformers: Hugging Face's BERT and ViT, tiny and randomly
initialized.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

Split = tuple[Tensor, Tensor]
Splits = tuple[Split, Split, Split]


def split_three(x: Tensor, y: Tensor, train: int, score: int) -> Splits:
    """The first ``train`` examples, the next ``score``, and the rest as the test split."""
    cuts = (train, train + score)
    return (
        (x[: cuts[0]], y[: cuts[0]]),
        (x[cuts[0] : cuts[1]], y[cuts[0] : cuts[1]]),
        (x[cuts[1] :], y[cuts[1] :]),
    )


# --------------------------------------------------------------------------- images


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


class ResidualCNN(nn.Module):
    """Stem 32, a residual block, max-pool, a 64-channel stage with a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.block1 = ResidualBlock(32)
        self.pool = nn.MaxPool2d(2)
        self.widen = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self.block2 = ResidualBlock(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.widen(self.pool(self.block1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet-(6n+2): 3 stages of n basic blocks, 16/32/64 channels."""

    def __init__(self, depth: int, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        )
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for index in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage and not index else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


SHAPES = ("disk", "ring", "square", "frame", "plus", "cross", "triangle", "dots")


def shape_splits(size: int = 16, train: int = 2000, score: int = 200, test: int = 800) -> Splits:
    """Colour pictures of one of 8 shapes (:data:`SHAPES`), the class, on a noisy background.

    Each shape has a random place, size and colour (so the colour says nothing of the
    class) over a random colour gradient, with pixel noise strong enough that the small
    shapes are easy to confuse: a task a network learns well but not perfectly.
    """
    generator = np.random.default_rng(2024)
    total = train + score + test
    labels = np.arange(total) % len(SHAPES)
    generator.shuffle(labels)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((total, 3, size, size), dtype=np.float32)
    for i, label in enumerate(labels):
        radius = generator.uniform(0.16, 0.31) * size
        cy, cx = generator.uniform(radius, size - 1 - radius, size=2)
        dy, dx = rows - cy, cols - cx
        mask = _shape_mask(SHAPES[label], dy, dx, radius)
        colour = generator.uniform(0.4, 1.0, size=3) * generator.choice([-1, 1], size=3)
        slope = generator.normal(scale=0.4, size=(3, 2))
        background = slope[:, :1, None] * (rows / size - 0.5) + slope[:, 1:, None] * (
            cols / size - 0.5
        )
        noise = generator.normal(scale=0.3, size=(3, size, size))
        images[i] = background + mask * colour[:, None, None] + noise
    x = torch.as_tensor(images)
    return split_three(x, torch.as_tensor(labels, dtype=torch.int64), train, score)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    distance, box = np.hypot(dy, dx), np.maximum(abs(dy), abs(dx))
    masks = {
        "disk": distance <= radius,
        "ring": abs(distance - radius) <= 0.8,
        "square": box <= radius * 0.8,
        "frame": abs(box - radius * 0.8) <= 0.6,
        "plus": ((abs(dx) <= 0.8) | (abs(dy) <= 0.8)) & (box <= radius),
        "cross": (abs(abs(dx) - abs(dy)) <= 0.8) & (box <= radius),
        "triangle": (abs(dy) <= radius * 0.8) & (abs(dx) <= (dy + radius * 0.8) / 2),
        "dots": (np.hypot(dy, dx - radius * 0.7) <= 1.4) | (np.hypot(dy, dx + radius * 0.7) <= 1.4),
    }
    return masks[shape].astype(np.float32)


# --------------------------------------------------------------------------- sequences


class SignalCNN(nn.Module):
    """Conv1d-BN-ReLU 32-32-64 with pooling, global average pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 32), (32, 32), (32, 64)):
            layers += [
                nn.Conv1d(c_in, c_out, 5, padding=2, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(2))


def signal_splits(length: int = 48, train: int = 2000, score: int = 200, test: int = 800) -> Splits:
    """Noisy waveforms of 10 classes: a fixed random template per class, stretched,
    shifted, scaled, on a random slope, with white and low-frequency noise."""
    generator = np.random.default_rng(12345)
    knots = generator.normal(size=(10, 6))
    grid = np.linspace(0, 1, 16)
    templates = np.stack([np.interp(grid, np.linspace(0, 1, 6), k) for k in knots])
    total = train + score + test
    labels = np.arange(total) % 10
    generator.shuffle(labels)
    signals = np.zeros((total, length), dtype=np.float32)
    for i, label in enumerate(labels):
        width = int(generator.integers(12, 22))
        shape = np.interp(np.linspace(0, 1, width), grid, templates[label])
        start = int(generator.integers(0, length - width))
        signals[i, start : start + width] = shape * generator.uniform(0.7, 1.3)
        slope = generator.normal(scale=0.4) * np.linspace(-1, 1, length)
        drift = np.interp(np.arange(length), [0, length // 2, length - 1], generator.normal(size=3))
        signals[i] += slope + 0.3 * drift + generator.normal(scale=0.25, size=length)
    x = torch.as_tensor(signals).unsqueeze(1)
    return split_three(x, torch.as_tensor(labels, dtype=torch.int64), train, score)


class MotifTCN(nn.Module):
    """Token embedding, three dilated Conv1d-BN-ReLU layers (32-32-64), max over time, a head."""

    def __init__(self, vocab: int = 12, classes: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 16)
        layers: list[nn.Module] = []
        for c_in, c_out, dilation in ((16, 32, 1), (32, 32, 2), (32, 64, 4)):
            layers += [
                nn.Conv1d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm1d(c_out),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, classes)

    def forward(self, ids: Tensor) -> Tensor:
        features = self.features(self.embed(ids).transpose(1, 2))
        return self.head(features.amax(2))


def motif_splits(
    length: int = 48, vocab: int = 12, train: int = 2000, score: int = 200, test: int = 800
) -> Splits:
    """Token sequences whose class is the spaced motif (``a . b . c``) of 8 planted in them.

    Every sequence also holds two decoys: the motif of another class with one token
    wrong. One motif in ten has a token wrong as well, which makes it a decoy too: no
    network can be right on those, so accuracy stays below 100% and the scorers differ.
    """
    generator = np.random.default_rng(77)
    motifs = np.stack([generator.choice(vocab, size=3, replace=False) for _ in range(8)])
    total = train + score + test
    labels = np.arange(total) % 8
    generator.shuffle(labels)
    ids = generator.integers(0, vocab, size=(total, length))
    for i, label in enumerate(labels):
        starts = generator.choice(np.arange(0, length - 5, 6), size=3, replace=False)
        decoys = generator.choice([c for c in range(8) if c != label], size=2, replace=False)
        for start, motif, corrupt in (
            (starts[0], motifs[label], generator.random() < 0.1),
            (starts[1], motifs[decoys[0]], True),
            (starts[2], motifs[decoys[1]], True),
        ):
            tokens = motif.copy()
            if corrupt:
                slot = generator.integers(3)
                tokens[slot] = (tokens[slot] + generator.integers(1, vocab)) % vocab
            ids[i, start : start + 5 : 2] = tokens
    x = torch.as_tensor(ids, dtype=torch.int64)
    return split_three(x, torch.as_tensor(labels, dtype=torch.int64), train, score)


# --------------------------------------------------------------------------- transformers


class BertClassifier(nn.Module):
    """A small BERT-style encoder (Hugging Face's, randomly initialized) over token ids."""

    def __init__(self, vocab: int = 24, classes: int = 4) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, max_position_embeddings=32, num_labels=classes,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.model = BertForSequenceClassification(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


class DigitsViT(nn.Module):
    """A small ViT (Hugging Face's, randomly initialized) on the 8x8 digits, 2x2 patches."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=8, intermediate_size=64, num_labels=10,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.model = ViTForImageClassification(config)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits


def marker_splits(
    length: int = 20, vocab: int = 24, train: int = 2000, score: int = 200, test: int = 800
) -> Splits:
    """Token sequences whose class is the marker token (1 to 4) that occurs most often.

    The other markers occur 0 to 3 times each, the winning one exactly once more than the
    most frequent of them, at random places among filler tokens: the model must count
    across the sequence, and a margin of one leaves it no slack.
    """
    generator = torch.Generator().manual_seed(1234)
    n = train + score + test
    ids = torch.randint(5, vocab, (n, length), generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    for index in range(n):
        places = torch.randperm(length, generator=generator).tolist()
        counts = torch.randint(0, 4, (4,), generator=generator)
        label = int(labels[index])
        counts[label] = max(int(c) for marker, c in enumerate(counts) if marker != label) + 1
        for marker, count in enumerate(counts.tolist()):
            for _ in range(count):
                ids[index, places.pop()] = marker + 1
    return split_three(ids, labels, train, score)
