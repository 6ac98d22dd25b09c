"""Quality benchmark: how good is the network each scorer leaves behind?

Every prunable unit of a trained network loses the same fraction of its channels (25,
50, 62.5 and 75%), chosen by each scorer; the BatchNorm statistics are re-estimated on
training batches (no gradient step) and the test accuracy is measured ("one-shot"), then
again after a fixed fine-tune of 3 epochs. Mean and standard deviation over 3 seeds
(the seed of the network's initialisation and training, of the random scorer and of the
Shapley sampling; the data splits stay fixed).

Three networks, one of them on data the defaults were never tuned on:

- ``digits-cnn``: the embedded digits CNN (Conv-BN-ReLU 32-32-64) on scikit-learn's
  digits, train 1200 / score 200 / test 397 (the protocol of issue 6);
- ``digits-resnet``: a residual CNN with BatchNorm (identity skips couple the channels of
  a stage into one unit) on the same data;
- ``signals-cnn``: a 1-D CNN on a generated data set of noisy, shifted and stretched
  waveforms of 10 classes (made here, so nothing is downloaded).

And transformers (Hugging Face's BERT and ViT, tiny and randomly initialized, trained
here), each measured twice: pruning the MLP neurons (``*-mlp``) and pruning the attention
heads (``*-heads``), at 25 and 50%, with the default, classic Shapley, L1, Taylor and
random scorers:

- ``bert-*``: a 2-layer, 4-head BERT-style encoder (32 MLP neurons a layer) on
  generated token sequences whose class is the marker token that occurs most often, by
  a margin of one;
- ``vit-*``: a 2-layer, 8-head ViT (64 MLP neurons a layer) on the digits, 2x2 patches.

Scorers: ``shapley`` with the callback's default settings; the same with
``rescore="all"`` (every survivor valued again every round: exact greedy elimination,
the reference whose removed channels every scorer's are compared with in the last
column); the classic Shapley value (50 permutations, value -loss, one ranking); L1 filter
norm; BatchNorm ``|gamma|``; first-order Taylor; random; and greedy backward elimination
(leave-one-out loss measured of each channel alone, one channel per round, survivors
re-scored), per layer (all units scored on the same network each round) and interleaved
(units take turns).

Run ``python benchmarks/quality.py`` (about 20 minutes on 2 CPU cores; ``--quick`` for a
smoke run). It prints markdown tables and writes ``benchmarks/results/quality.json``,
``benchmarks/results/quality.md`` and ``benchmarks/results/quality.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_shapley import ShapleyPruning
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning.masking import copy_model, pruned_channels
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.scorers import (
    BatchNormScorer,
    L1Scorer,
    RandomScorer,
    Scorer,
    ShapleyScorer,
    TaylorScorer,
)
from lightning_shapley.pruning.units import PrunableUnit, attention_heads, find_units
from lightning_shapley.shapley.values import scoring_mode

RESULTS = Path(__file__).parent / "results"
SPARSITIES = (0.25, 0.5, 0.625, 0.75)
SEEDS = (0, 1, 2)
FINE_TUNE_EPOCHS = 3
RECALIBRATION_BATCHES = 8
BATCH_SIZE = 64
TRAIN_LR = 1e-2  # Adam, for training the dense networks
# Adam restarted at the training rate knocked the pruned residual CNN back to chance.
FINE_TUNE_LR = 3e-3

Split = tuple[Tensor, Tensor]


@dataclass
class Task:
    name: str
    make_model: Callable[[], nn.Module]
    train: Split
    score: Split
    test: Split
    epochs: int
    lr: float = TRAIN_LR
    sparsities: tuple[float, ...] = SPARSITIES
    #: Which units are pruned: all, or those this says yes to (MLP neurons, heads).
    unit_filter: Callable[[nn.Module, PrunableUnit], bool] | None = None
    #: The methods measured: all, or these names.
    method_names: tuple[str, ...] | None = None
    fine_tune_lr: float = FINE_TUNE_LR

    def units(self, model: nn.Module) -> list[PrunableUnit]:
        found = find_units(model, self.score[0][:2])
        chosen = [u for u in found if self.unit_filter is None or self.unit_filter(model, u)]
        if not chosen:
            raise SystemExit(f"{self.name}: no unit to prune among {[u.name for u in found]}")
        return chosen


@dataclass
class Method:
    """A scorer and how its choices are applied (one ranking, or rounds)."""

    name: str
    make_scorer: Callable[[int], Scorer]
    removal_step: int | float | None = None
    interleave: bool = False
    recalibrate_each_turn: bool = True
    #: Which survivors a round values again (``RoundPruner.rescore``); "all" is exact greedy.
    rescore: str = "all"

    @property
    def iterative(self) -> bool:
        return self.removal_step is not None


# --------------------------------------------------------------------------- networks


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


def signal_splits(length: int = 48, train: int = 2000, score: int = 200, test: int = 800):
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
    y = torch.as_tensor(labels, dtype=torch.int64)
    cuts = (train, train + score)
    return (
        (x[: cuts[0]], y[: cuts[0]]),
        (x[cuts[0] : cuts[1]], y[cuts[0] : cuts[1]]),
        (
            x[cuts[1] :],
            y[cuts[1] :],
        ),
    )


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
):
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
    return (
        (ids[:train], labels[:train]),
        (ids[train : train + score], labels[train : train + score]),
        (ids[train + score :], labels[train + score :]),
    )


def is_heads(model: nn.Module, unit: PrunableUnit) -> bool:
    """An attention unit: its channels are heads."""
    return attention_heads(model, unit.name) is not None


def is_mlp(model: nn.Module, unit: PrunableUnit) -> bool:
    """A transformer MLP's intermediate neurons: every unit but the heads and BERT's pooler."""
    return not is_heads(model, unit) and "pooler" not in unit.name


TRANSFORMER_METHODS = (
    "shapley (default)",
    "default, rescore=all",
    "classic shapley",
    "l1",
    "taylor",
    "random",
)


def tasks(quick: bool) -> list[Task]:
    digits = digits_splits(seed=0)
    splits = (digits.train.tensors, digits.score.tensors, digits.test.tensors)
    markers = marker_splits()
    images = tuple((x.reshape(-1, 1, 8, 8), y) for x, y in splits)
    transformer = {
        "sparsities": (0.25, 0.5),
        "method_names": TRANSFORMER_METHODS,
        "lr": 1e-3,
        "fine_tune_lr": 3e-4,
    }
    found = [
        Task("digits-cnn", DigitsCNN, *splits, epochs=15),
        Task("digits-resnet", ResidualCNN, *splits, epochs=15),
        Task("signals-cnn", SignalCNN, *signal_splits(), epochs=20),
        Task("bert-mlp", BertClassifier, *markers, epochs=10, unit_filter=is_mlp, **transformer),
        Task(
            "bert-heads", BertClassifier, *markers, epochs=10, unit_filter=is_heads, **transformer
        ),
        Task("vit-mlp", DigitsViT, *images, epochs=20, unit_filter=is_mlp, **transformer),
        Task("vit-heads", DigitsViT, *images, epochs=20, unit_filter=is_heads, **transformer),
    ]
    return found[:1] if quick else found


# --------------------------------------------------------------------------- methods


def leave_one_out(seed: int) -> Scorer:
    """Greedy elimination's criterion, through the game's fast engine: the band at depth 1
    is exactly ``LeaveOneOutScorer`` (tests/test_rounds.py checks the choices agree), which
    prunes each channel for real and runs the whole model, 2-3x slower."""
    return ShapleyScorer(weighting="band", depth=1, method="exact")


def methods() -> list[Method]:
    # The callback's defaults, whatever they are now; the scorer is built anew per seed.
    defaults = ShapleyPruning()

    def default_scorer(seed: int) -> Scorer:
        return ShapleyPruning(seed=seed).scorer

    return [
        Method(
            "shapley (default)",
            default_scorer,
            defaults.removal_step,
            defaults.interleave,
            rescore=defaults.rescore,
        ),
        # The default's rounds with every survivor valued again each round: exact greedy.
        Method(
            "default, rescore=all",
            default_scorer,
            defaults.removal_step,
            defaults.interleave,
            rescore="all",
        ),
        Method(
            "classic shapley",
            lambda seed: ShapleyScorer(seed=seed, method="permutation", num_permutations=50),
        ),
        Method("l1", lambda seed: L1Scorer()),
        Method("bn_gamma", lambda seed: BatchNormScorer()),
        Method("taylor", lambda seed: TaylorScorer()),
        Method("random", lambda seed: RandomScorer(seed)),
        Method("greedy per layer", leave_one_out, removal_step=1),
        # As measured in DESIGN.md: BatchNorm re-estimated after each round.
        Method(
            "greedy interleaved",
            leave_one_out,
            removal_step=1,
            interleave=True,
            recalibrate_each_turn=False,
        ),
    ]


# --------------------------------------------------------------------------- protocol


def batches_of(split: Split, seed: int, shuffle: bool) -> list[Split]:
    inputs, targets = split
    order = (
        torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
        if shuffle
        else torch.arange(len(inputs))
    )
    return [
        (inputs[order[i : i + BATCH_SIZE]], targets[order[i : i + BATCH_SIZE]])
        for i in range(0, len(inputs), BATCH_SIZE)
    ]


def train(model: nn.Module, split: Split, epochs: int, lr: float, seed: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for inputs, targets in batches_of(split, seed * 1000 + epoch, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, split: Split) -> float:
    inputs, targets = split
    with scoring_mode(model):
        return float((model(inputs).argmax(1) == targets).double().mean())


def run_method(task: Task, dense: nn.Module, method: Method, seed: int) -> list[dict]:
    score = batches_of(task.score, 0, shuffle=False)
    recalibration = [x for x, _ in batches_of(task.train, seed, shuffle=True)][
        :RECALIBRATION_BATCHES
    ]
    units = task.units(dense)
    counter = CostCounter(method.make_scorer(seed))
    # A ranking is computed once, on the dense network, and cut at every sparsity.
    scorer = counter if method.iterative else RankingOnce(counter)
    rows, model = [], copy_model(dense)
    for sparsity in task.sparsities:
        if not method.iterative:
            model = copy_model(dense)
        pruner = RoundPruner(
            units,
            scorer,
            removal_step=method.removal_step,
            interleave=method.interleave,
            recalibrate_each_turn=method.recalibrate_each_turn,
            rescore=method.rescore,
        )
        pruner.prune(model, score, sparsity, recalibration)
        one_shot = accuracy(model, task.test)
        tuned = train(
            copy_model(model), task.train, FINE_TUNE_EPOCHS, task.fine_tune_lr, seed + 100
        )
        rows.append(
            {
                "task": task.name,
                "method": method.name,
                "seed": seed,
                "sparsity": sparsity,
                "one_shot": one_shot,
                "fine_tuned": accuracy(tuned, task.test),
                "evaluations": counter.evaluations,
                "seconds": counter.seconds,
                "removed": {
                    unit.name: pruned_channels(model, unit).nonzero().flatten().tolist()
                    for unit in units
                },
            }
        )
    return rows


class RankingOnce(Scorer):
    """Scores each unit once (on the dense network) and answers with that ever after."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer, self.name, self.cache = scorer, scorer.name, {}

    def score(self, model, unit, batches, pruned, candidates=None):
        if unit.name not in self.cache:
            self.cache[unit.name] = self.scorer.score(model, unit, batches, pruned)
        return self.cache[unit.name]


class CostCounter(Scorer):
    """Adds up the evaluations and seconds of every call."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer, self.name, self.evaluations, self.seconds = scorer, scorer.name, 0, 0.0
        self.takes_candidates = scorer.takes_candidates

    def step(self):
        return self.scorer.step()

    def score(self, model, unit, batches, pruned, candidates=None):
        scores = self.scorer.score(model, unit, batches, pruned, candidates)
        self.evaluations += scores.evaluations
        self.seconds += scores.seconds
        return scores


#: The reference that the other methods' choices are compared with: exact greedy elimination.
EXACT_GREEDY = "default, rescore=all"


def agreement(row: dict, reference: dict | None) -> float | None:
    """The share of the reference's removed channels that ``row`` removed too."""
    if reference is None or "removed" not in row or "removed" not in reference:
        return None
    removed = {(unit, c) for unit, channels in row["removed"].items() for c in channels}
    wanted = {(unit, c) for unit, channels in reference["removed"].items() for c in channels}
    return len(removed & wanted) / len(wanted) if wanted else None


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    greedy = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"], row["sparsity"]), []).append(row)
        if row["method"] == EXACT_GREEDY:
            greedy[row["task"], row["seed"], row["sparsity"]] = row
    summary = []
    for (task, method, sparsity), group in groups.items():
        entry = {"task": task, "method": method, "sparsity": sparsity, "seeds": len(group)}
        entry["same_as"] = group[0].get("same_as")
        shares = [agreement(g, greedy.get((task, g["seed"], sparsity))) for g in group]
        entry["same_channels_as_greedy"] = None if None in shares else statistics.fmean(shares)
        for key in ("one_shot", "fine_tuned", "evaluations", "seconds"):
            values = [g[key] for g in group]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def markdown(summary: list[dict], dense: dict[str, list[float]]) -> str:
    lines = []
    for task in dict.fromkeys(s["task"] for s in summary):
        accs = dense[task]
        sparsities = sorted({s["sparsity"] for s in summary if s["task"] == task})
        lines += [
            f"### {task} (dense test accuracy {100 * statistics.fmean(accs):.1f}%)",
            "",
            "Test accuracy (%), mean ± std over seeds, at per-layer channel sparsity "
            + " / ".join(f"{100 * s:g}%" for s in sparsities)
            + "; value evaluations and seconds spent scoring to reach the highest sparsity.",
            "",
            "| scorer | one-shot (BatchNorm statistics re-estimated, where there are any) "
            "| after a 3-epoch fine-tune "
            "| evaluations | seconds | same channels as exact greedy |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        rows = [s for s in summary if s["task"] == task]
        for method in dict.fromkeys(s["method"] for s in rows):
            cells = sorted((s for s in rows if s["method"] == method), key=lambda s: s["sparsity"])
            one_shot = " / ".join(
                f"{100 * c['one_shot']:.1f}±{100 * c['one_shot_std']:.1f}" for c in cells
            )
            tuned = " / ".join(
                f"{100 * c['fine_tuned']:.1f}±{100 * c['fine_tuned_std']:.1f}" for c in cells
            )
            last = cells[-1]
            name = method if last["same_as"] is None else f"{method} (= {last['same_as']})"
            same = [c["same_channels_as_greedy"] for c in cells]
            shares = "" if None in same else " / ".join(f"{100 * v:.0f}%" for v in same)
            lines.append(
                f"| {name} | {one_shot} | {tuned} | {last['evaluations']:.0f} "
                f"| {last['seconds']:.1f} | {shares} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(s["task"] for s in summary))
    figure, axes = plt.subplots(
        2, len(task_names), figsize=(4.6 * len(task_names), 7.5), squeeze=False, sharex=True
    )
    for column, task in enumerate(task_names):
        rows = [s for s in summary if s["task"] == task]
        for method in dict.fromkeys(s["method"] for s in rows):
            cells = sorted((s for s in rows if s["method"] == method), key=lambda s: s["sparsity"])
            x = [100 * c["sparsity"] for c in cells]
            style = {"linewidth": 2.4} if method.startswith("shapley (default)") else {}
            for row, key in enumerate(("one_shot", "fine_tuned")):
                axes[row][column].errorbar(
                    x,
                    [100 * c[key] for c in cells],
                    yerr=[100 * c[f"{key}_std"] for c in cells],
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=method,
                    **style,
                )
        axes[0][column].set_title(f"{task}: one-shot")
        axes[1][column].set_title(f"{task}: after {FINE_TUNE_EPOCHS}-epoch fine-tune")
        for row in range(2):
            axes[row][column].set_ylabel("test accuracy (%)")
            axes[row][column].grid(alpha=0.3)
        axes[1][column].set_xlabel("channels removed per layer (%)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def same_computation(a: Method, b: Method, units: list, seed: int) -> bool:
    """Whether two methods make the same choices on these units: the same exact Shapley
    scorer, the same channels per round in every unit, the same interleaving."""
    first, second = a.make_scorer(seed), b.make_scorer(seed)
    if not (isinstance(first, ShapleyScorer) and isinstance(second, ShapleyScorer)):
        return False
    settings = ("value_function", "weighting", "estimator")
    if any(getattr(first, key) != getattr(second, key) for key in settings) or (
        first.estimator.method != "exact"
        or a.interleave != b.interleave
        or a.recalibrate_each_turn != b.recalibrate_each_turn
        or "near_cut" in (a.rescore, b.rescore)
    ):
        return False
    sizes = [
        [
            RoundPruner(units, first, removal_step=m.removal_step).round_size(u.n_channels)
            for u in units
        ]
        for m in (a, b)
    ]
    return sizes[0] == sizes[1]


def measure(
    task: Task, seeds: tuple[int, ...], only: set[str] | None = None
) -> tuple[list[dict], list[float]]:
    """The methods (all, or those named in ``only``) on one task, for each seed: the rows
    and the dense accuracies."""
    rows, dense = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = train(task.make_model(), task.train, task.epochs, task.lr, seed)
        dense.append(accuracy(model, task.test))
        units = task.units(model)
        done: dict[str, tuple[Method, list[dict]]] = {}
        for method in methods():
            if (only is not None and method.name not in only) or (
                task.method_names is not None and method.name not in task.method_names
            ):
                continue
            start = time.perf_counter()
            twin = next(
                (m for m, _ in done.values() if same_computation(m, method, units, seed)), None
            )
            if twin is not None:
                # The same choices, step by step: the rows are the twin's, not measured again.
                found = [
                    r | {"method": method.name, "same_as": twin.name} for r in done[twin.name][1]
                ]
            else:
                found = run_method(task, model, method, seed)
            done[method.name] = (method, found)
            rows += found
            print(
                f"{task.name} seed {seed} {method.name}: "
                + " ".join(f"{100 * r['one_shot']:.1f}/{100 * r['fine_tuned']:.1f}" for r in found)
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return rows, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one task, one seed: a smoke run")
    parser.add_argument(
        "--task",
        choices=[t.name for t in tasks(quick=False)],
        help="measure only this task and save its rows (runs of several tasks in parallel, "
        "then --report to merge them)",
    )
    parser.add_argument("--report", action="store_true", help="merge the saved task rows")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="measure only these methods and replace their rows in the saved ones (the "
        "dense networks are trained again and must match the saved accuracies)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = SEEDS[:1] if args.quick else SEEDS
    stem = "quality-quick" if args.quick else "quality"
    if not args.report:
        chosen = [t for t in tasks(args.quick) if args.task in (None, t.name)]
        for task in chosen:
            path = args.out / f"{stem}-{task.name}.json"
            only = None if args.methods is None else set(args.methods)
            rows, dense = measure(task, seeds, only)
            if only is not None:
                saved = json.loads(path.read_text())
                if saved["dense"] != dense:
                    raise SystemExit(f"{task.name}: the dense networks differ from {path}")
                rows = [r for r in saved["rows"] if r["method"] not in only] + rows
            saved = {"task": task.name, "rows": rows, "dense": dense}
            path.write_text(json.dumps(saved, indent=1))
        if args.task is not None:
            return
    parts = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"{stem}-*.json"))]
    order = {method.name: index for index, method in enumerate(methods())}
    rows = sorted((row for part in parts for row in part["rows"]), key=lambda r: order[r["method"]])
    dense = {part["task"]: part["dense"] for part in parts}
    summary = summarize(rows)
    table = markdown(summary, dense)
    print(table)
    (args.out / f"{stem}.md").write_text(table)
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "dense": dense,
                "rows": rows,
                "summary": summary,
            },
            indent=1,
        )
    )
    plot(summary, args.out / f"{stem}.png")


if __name__ == "__main__":
    main()
