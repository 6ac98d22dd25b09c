"""Quality benchmark: how good is the network each scorer leaves behind, and after how
much fine-tuning does that still matter?

Every prunable unit of a trained network loses the same fraction of its channels (25,
50, 62.5 and 75%), chosen by each scorer; the BatchNorm statistics are re-estimated on
training batches (no gradient step) and the test accuracy is measured ("one-shot").
For the default and the free criteria, at 50 and 75% (25 and 50% on the transformers),
the cut network is then fine-tuned for 1, 3 and 10 epochs, each budget its own run with
Adam's learning rate annealed to zero along a half cosine; and, as "gradual", the same
budgets of 3 and 10 epochs with the cut spread over them in three steps (the callback's
cubic ramp), each step scored on the network as fine-tuning has left it. Mean and
standard deviation over 3 seeds (the seed of the network's initialisation and training,
of the random scorer and of the Shapley sampling; the data splits stay fixed). The first
table of the report sets the default against the best free criterion in every cell.

The tasks (networks and data in ``tasks.py``; everything is generated or ships with
scikit-learn):

- ``digits-cnn``: the embedded digits CNN (Conv-BN-ReLU 32-32-64) on scikit-learn's
  digits, train 1200 / score 200 / test 397 (the protocol of issue 6);
- ``digits-resnet``: a residual CNN with BatchNorm (identity skips couple the channels of
  a stage into one unit) on the same data;
- ``signals-cnn``: a 1-D CNN on noisy, shifted and stretched waveforms of 10 classes;
- ``shapes-resnet14`` and ``motif-tcn``, on which no default was chosen: a CIFAR-style
  ResNet-14 on 12x12 pictures of 8 shapes, and a dilated 1-D TCN over token embeddings
  finding which of 8 spaced motifs a sequence holds;
- transformers (Hugging Face's BERT and ViT, tiny and randomly initialized, trained
  here), each measured twice, pruning the MLP neurons (``*-mlp``) and the attention heads
  (``*-heads``) at 25 and 50%: ``bert-*`` a 2-layer, 4-head encoder on token sequences
  whose class is the marker token that occurs most often, by a margin of one; ``vit-*`` a
  2-layer, 8-head ViT on the digits, 2x2 patches.

Scorers: ``shapley`` with the callback's default settings; the same with
``rescore="all"`` (every survivor valued again every round: exact greedy elimination,
the reference whose removed channels every scorer's are compared with in the last
column); the classic Shapley value (50 permutations, value -loss, one ranking); L1 filter
norm; BatchNorm ``|gamma|``; first-order Taylor; random; and greedy backward elimination
(leave-one-out loss measured of each channel alone, one channel per round, survivors
re-scored), per layer (all units scored on the same network each round) and interleaved
(units take turns). A task may measure a subset (:attr:`Task.method_names`).

Run ``python benchmarks/quality.py`` (about 70 minutes of one core; ``--task NAME`` for
one task, so that two run side by side, then ``--report``; ``--quick`` for a smoke run).
It prints markdown tables and writes ``benchmarks/results/quality.json``,
``benchmarks/results/quality.md`` and ``benchmarks/results/quality.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from tasks import (
    BertClassifier,
    CifarResNet,
    DigitsViT,
    MotifTCN,
    ResidualCNN,
    SignalCNN,
    marker_splits,
    motif_splits,
    shape_splits,
    signal_splits,
)
from torch import Tensor, nn

from lightning_shapley import ShapleyPruning
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning.masking import copy_model, pruned_channels
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.schedule import Gradual
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
#: Epochs of fine-tuning after the cut; each budget is its own run from the pruned network.
BUDGETS = (1, 3, 10)
#: A gradual schedule's steps, spread evenly over a budget's epochs (cubic ramp).
GRADUAL_STEPS = 3
RECALIBRATION_BATCHES = 8
BATCH_SIZE = 64
TRAIN_LR = 1e-2  # Adam, for training the dense networks
# Adam restarted at the training rate knocked the pruned residual CNN back to chance. The
# fine-tune starts at this rate and anneals to zero along a half cosine, batch by batch.
FINE_TUNE_LR = 3e-3
#: The methods fine-tuned: the default and the free criteria it must beat.
FINE_TUNED = ("shapley (default)", "l1", "bn_gamma", "taylor", "random")
#: The methods also run as a gradual schedule at the same total epochs.
GRADUAL = ("shapley (default)", "l1", "bn_gamma", "taylor")
#: The free criteria: no evaluation of the network's value.
FREE = ("l1", "bn_gamma", "taylor", "random")
DEFAULT = "shapley (default)"

Split = tuple[Tensor, Tensor]
#: Pruning steps within a fine-tune: the epoch each starts, and what it does to the model.
Steps = dict[int, Callable[[nn.Module], None]]


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
    #: The sparsities fine-tuned after (each budget, one-shot and gradual).
    tuned_sparsities: tuple[float, ...] = (0.5, 0.75)

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


#: On the TCN, a task no default was chosen on: no greedy baselines.
HELD_OUT_METHODS = (
    "shapley (default)",
    "default, rescore=all",
    "classic shapley",
    "l1",
    "bn_gamma",
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
        "tuned_sparsities": (0.25, 0.5),
        "method_names": TRANSFORMER_METHODS,
        "lr": 1e-3,
        "fine_tune_lr": 3e-4,
    }
    found = [
        Task("digits-cnn", DigitsCNN, *splits, epochs=15),
        Task("digits-resnet", ResidualCNN, *splits, epochs=15),
        Task("signals-cnn", SignalCNN, *signal_splits(), epochs=20),
        # Exact greedy and classic Shapley would take an hour here (about 70 ms an
        # evaluation): the default against the free criteria only.
        Task(
            "shapes-resnet14",
            lambda: CifarResNet(14, classes=8, in_channels=3),
            *shape_splits(size=12, score=128),
            epochs=15,
            sparsities=(0.5, 0.75),
            method_names=FINE_TUNED,
        ),
        Task(
            "motif-tcn",
            MotifTCN,
            *motif_splits(),
            epochs=12,
            sparsities=(0.5, 0.75),
            method_names=HELD_OUT_METHODS,
        ),
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


def train(
    model: nn.Module,
    split: Split,
    epochs: int,
    lr: float,
    seed: int,
    anneal: bool = False,
    steps: Steps | None = None,
) -> nn.Module:
    """Adam on cross-entropy for ``epochs``, at a constant ``lr`` or (``anneal``) one that
    falls to zero along a half cosine, batch by batch; ``steps`` prune the model at the start
    of the epochs they are keyed by (and restart Adam, whose moments the cut made stale)."""
    total = epochs * math.ceil(len(split[0]) / BATCH_SIZE)
    optimizer, done = None, 0
    for epoch in range(epochs):
        if steps and epoch in steps:
            steps[epoch](model)
            optimizer = None
        if optimizer is None:
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for inputs, targets in batches_of(split, seed * 1000 + epoch, shuffle=True):
            if anneal:
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * done / total))
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            done += 1
    return model.eval()


def accuracy(model: nn.Module, split: Split) -> float:
    inputs, targets = split
    with scoring_mode(model):
        return float((model(inputs).argmax(1) == targets).double().mean())


def fine_tune(
    task: Task, model: nn.Module, budget: int, seed: int, steps: Steps | None = None
) -> tuple[float, float]:
    """The test accuracy after ``budget`` annealed epochs on a copy, and the seconds taken."""
    start = time.perf_counter()
    tuned = train(copy_model(model), task.train, budget, task.fine_tune_lr, seed + 100, True, steps)
    return accuracy(tuned, task.test), time.perf_counter() - start


def scoring_data(task: Task, seed: int) -> tuple[list[Split], list[Tensor]]:
    """The batches the scorers value on, and the training batches BatchNorm is re-estimated on."""
    recalibration = [x for x, _ in batches_of(task.train, seed, shuffle=True)]
    return batches_of(task.score, 0, shuffle=False), recalibration[:RECALIBRATION_BATCHES]


def pruner_for(method: Method, units: list[PrunableUnit], scorer: Scorer) -> RoundPruner:
    return RoundPruner(
        units,
        scorer,
        removal_step=method.removal_step,
        interleave=method.interleave,
        recalibrate_each_turn=method.recalibrate_each_turn,
        rescore=method.rescore,
    )


def run_method(task: Task, dense: nn.Module, method: Method, seed: int) -> list[dict]:
    """Cut at each sparsity in turn; the one-shot accuracy, and for the sparsities and
    methods that are fine-tuned, the accuracy after each budget."""
    score, recalibration = scoring_data(task, seed)
    units = task.units(dense)
    counter = CostCounter(method.make_scorer(seed))
    # A ranking is computed once, on the dense network, and cut at every sparsity.
    scorer = counter if method.iterative else RankingOnce(counter)
    rows, model = [], copy_model(dense)
    for sparsity in task.sparsities:
        if not method.iterative:
            model = copy_model(dense)
        pruner_for(method, units, scorer).prune(model, score, sparsity, recalibration)
        row = {
            "task": task.name,
            "method": method.name,
            "schedule": "one-shot",
            "seed": seed,
            "sparsity": sparsity,
            "one_shot": accuracy(model, task.test),
            "evaluations": counter.evaluations,
            "seconds": counter.seconds,
            "fine_tuned": {},
            "fine_tune_seconds": {},
            "removed": {
                unit.name: pruned_channels(model, unit).nonzero().flatten().tolist()
                for unit in units
            },
        }
        if method.name in FINE_TUNED and sparsity in task.tuned_sparsities:
            for budget in BUDGETS:
                tuned, seconds = fine_tune(task, model, budget, seed)
                row["fine_tuned"][str(budget)] = tuned
                row["fine_tune_seconds"][str(budget)] = seconds
        rows.append(row)
    return rows


def run_gradual(task: Task, dense: nn.Module, method: Method, seed: int) -> list[dict]:
    """For each fine-tuned sparsity and each budget of at least :data:`GRADUAL_STEPS`
    epochs: the same epochs with the cut spread over them in steps (the callback's cubic
    ramp), each step scored on the network as the fine-tune has left it."""
    score, recalibration = scoring_data(task, seed)
    units = task.units(dense)
    rows = []
    for sparsity in task.tuned_sparsities:
        row = {
            "task": task.name,
            "method": method.name,
            "schedule": "gradual",
            "seed": seed,
            "sparsity": sparsity,
            "fine_tuned": {},
            "fine_tune_seconds": {},
        }
        for budget in (b for b in BUDGETS if b >= GRADUAL_STEPS):
            epochs = tuple(budget * k // GRADUAL_STEPS for k in range(GRADUAL_STEPS))
            ramp = Gradual(sparsity, epochs=epochs)
            counter = CostCounter(method.make_scorer(seed))
            pruner = pruner_for(method, units, counter)
            steps = {
                epoch: functools.partial(
                    pruner.prune,
                    batches=score,
                    target=ramp.target(epoch),
                    recalibration_inputs=recalibration,
                )
                for epoch in epochs
            }
            row["fine_tuned"][str(budget)], seconds = fine_tune(task, dense, budget, seed, steps)
            # The steps' scoring ran inside the fine-tune; it is counted once, as scoring.
            row["fine_tune_seconds"][str(budget)] = seconds - counter.seconds
            # The cost of the longest budget's run (its steps score better-trained networks).
            row["evaluations"], row["seconds"] = counter.evaluations, counter.seconds
        rows.append(row)
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


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per task, method, schedule and sparsity: means and sds over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    greedy = {}
    for row in rows:
        key = (row["task"], row["method"], row.get("schedule", "one-shot"), row["sparsity"])
        groups.setdefault(key, []).append(row)
        if row["method"] == EXACT_GREEDY:
            greedy[row["task"], row["seed"], row["sparsity"]] = row
    summary = []
    for (task, method, schedule, sparsity), group in groups.items():
        entry = {
            "task": task,
            "method": method,
            "schedule": schedule,
            "sparsity": sparsity,
            "seeds": len(group),
            "same_as": group[0].get("same_as"),
        }
        shares = [agreement(g, greedy.get((task, g["seed"], sparsity))) for g in group]
        entry["same_channels_as_greedy"] = None if None in shares else statistics.fmean(shares)
        for key in ("one_shot", "evaluations", "seconds"):
            if key in group[0]:
                entry[key], entry[f"{key}_std"] = mean_sd([g[key] for g in group])
        entry["fine_tuned"] = {
            budget: mean_sd([g["fine_tuned"][budget] for g in group])
            for budget in group[0]["fine_tuned"]
        }
        entry["fine_tune_seconds"] = {
            budget: statistics.fmean(g["fine_tune_seconds"][budget] for g in group)
            for budget in group[0]["fine_tune_seconds"]
        }
        summary.append(entry)
    return summary


def percent(mean_and_sd: tuple[float, float] | None) -> str:
    return "-" if mean_and_sd is None else f"{100 * mean_and_sd[0]:.1f}±{100 * mean_and_sd[1]:.1f}"


def markdown(summary: list[dict], dense: dict[str, list[float]]) -> str:
    lines = [verdicts(summary), ""]
    for task in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task]
        one_shot = [s for s in rows if s["schedule"] == "one-shot"]
        sparsities = sorted({s["sparsity"] for s in one_shot})
        lines += [
            f"### {task} (dense test accuracy {100 * statistics.fmean(dense[task]):.1f}%)",
            "",
            "One-shot: test accuracy (%), mean ± std over seeds, at per-layer channel sparsity "
            + " / ".join(f"{100 * s:g}%" for s in sparsities)
            + ", BatchNorm statistics re-estimated where there are any; value evaluations and "
            "seconds spent scoring to reach the highest sparsity.",
            "",
            "| scorer | one-shot | evaluations | seconds | same channels as exact greedy |",
            "| --- | --- | --- | --- | --- |",
        ]
        for method in dict.fromkeys(s["method"] for s in one_shot):
            cells = sorted(
                (s for s in one_shot if s["method"] == method), key=lambda s: s["sparsity"]
            )
            accuracies = " / ".join(percent((c["one_shot"], c["one_shot_std"])) for c in cells)
            last = cells[-1]
            name = method if last["same_as"] is None else f"{method} (= {last['same_as']})"
            same = [c["same_channels_as_greedy"] for c in cells]
            shares = "" if None in same else " / ".join(f"{100 * v:.0f}%" for v in same)
            lines.append(
                f"| {name} | {accuracies} | {last['evaluations']:.0f} "
                f"| {last['seconds']:.1f} | {shares} |"
            )
        lines += ["", *fine_tune_table(rows), ""]
    return "\n".join(lines)


def fine_tune_table(rows: list[dict]) -> list[str]:
    """Accuracy after each budget, one-shot and gradual, with what the run cost."""
    tuned = [s for s in rows if s["fine_tuned"]]
    sparsities = sorted({s["sparsity"] for s in tuned})
    header = " | ".join(
        f"{100 * s:g}%: " + " / ".join(f"{b} ep" for b in BUDGETS) for s in sparsities
    )
    lines = [
        "After fine-tuning (Adam, the learning rate annealed to zero over the budget): test "
        "accuracy (%) after 1 / 3 / 10 epochs. Gradual: the same epochs, the cut in "
        f"{GRADUAL_STEPS} steps spread over them (budgets of {GRADUAL_STEPS} epochs or more). "
        "Cost at the highest sparsity and 10 epochs: value evaluations, seconds scoring, "
        "seconds fine-tuning.",
        "",
        f"| scorer | schedule | {header} | evaluations | scoring s | fine-tune s |",
        "| --- | --- | " + "--- | " * len(sparsities) + "--- | --- | --- |",
    ]
    for method in dict.fromkeys(s["method"] for s in tuned):
        for schedule in ("one-shot", "gradual"):
            cells = sorted(
                (s for s in tuned if s["method"] == method and s["schedule"] == schedule),
                key=lambda s: s["sparsity"],
            )
            if not cells:
                continue
            accuracies = " | ".join(
                " / ".join(percent(c["fine_tuned"].get(str(b))) for b in BUDGETS) for c in cells
            )
            last = cells[-1]
            lines.append(
                f"| {method} | {schedule} | {accuracies} | {last['evaluations']:.0f} "
                f"| {last['seconds']:.1f} | {last['fine_tune_seconds'][str(BUDGETS[-1])]:.1f} |"
            )
    return lines


def verdicts(summary: list[dict]) -> str:
    """The targets of issue 14, cell by cell: the default (one-shot, then fine-tuned) against
    the best free criterion, and whether it is ahead by more than the spread (the larger of
    the two standard deviations), level within it, or behind."""
    lines = [
        "### The default against the best free criterion after fine-tuning",
        "",
        "Both cut one-shot, then fine-tuned for the budget; the spread is the larger of the "
        "two standard deviations over seeds. The last column is the best gradual run of any "
        "scorer at the same budget, for comparison.",
        "",
        "| task | sparsity | epochs | default | best free criterion | difference | verdict "
        "| best gradual |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    counts: dict[str, int] = {}
    for task in dict.fromkeys(s["task"] for s in summary):
        rows = [s for s in summary if s["task"] == task and s["fine_tuned"]]
        for sparsity in sorted({s["sparsity"] for s in rows}):
            at = [s for s in rows if s["sparsity"] == sparsity]
            for budget in map(str, BUDGETS):
                one_shot = {
                    s["method"]: s["fine_tuned"][budget] for s in at if s["schedule"] == "one-shot"
                }
                if DEFAULT not in one_shot:
                    continue
                default = one_shot[DEFAULT]
                free = max((m for m in FREE if m in one_shot), key=lambda m: one_shot[m][0])
                difference = default[0] - one_shot[free][0]
                spread = max(default[1], one_shot[free][1])
                verdict = (
                    "ahead"
                    if difference > spread
                    else "behind"
                    if difference < -spread
                    else "level"
                )
                counts[verdict] = counts.get(verdict, 0) + 1
                gradual = [
                    (s["fine_tuned"][budget], s["method"])
                    for s in at
                    if s["schedule"] == "gradual" and budget in s["fine_tuned"]
                ]
                best = max(gradual, default=None)
                lines.append(
                    f"| {task} | {100 * sparsity:g}% | {budget} | {percent(default)} "
                    f"| {free} {percent(one_shot[free])} | {100 * difference:+.1f} | {verdict} "
                    f"| {'-' if best is None else f'{best[1]} {percent(best[0])}'} |"
                )
    lines += ["", "Cells: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + "."]
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    """Per task: one-shot accuracy against sparsity, and at the highest fine-tuned sparsity
    the accuracy against the fine-tuning budget, one-shot (solid) and gradual (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(s["task"] for s in summary))
    per_row = 3  # tasks side by side, each as two panels
    rows = -(-len(task_names) // per_row)
    figure, axes = plt.subplots(rows, 2 * per_row, figsize=(24, 4.2 * rows), squeeze=False)
    # One colour per method on every panel, whichever methods a task has.
    colours = {method.name: f"C{index}" for index, method in enumerate(methods())}
    for index, task in enumerate(task_names):
        left, right = (axes[index // per_row][2 * (index % per_row) + k] for k in (0, 1))
        cells = [s for s in summary if s["task"] == task]
        top = max(s["sparsity"] for s in cells if s["fine_tuned"])
        for method in dict.fromkeys(s["method"] for s in cells):
            style = {"linewidth": 2.4} if method == DEFAULT else {}
            curve = sorted(
                (s for s in cells if s["method"] == method and s["schedule"] == "one-shot"),
                key=lambda s: s["sparsity"],
            )
            left.errorbar(
                [100 * c["sparsity"] for c in curve],
                [100 * c["one_shot"] for c in curve],
                yerr=[100 * c["one_shot_std"] for c in curve],
                marker="o", markersize=3, capsize=2, color=colours[method], label=method,
                **style,
            )  # fmt: skip
            for schedule, dash in (("one-shot", "-"), ("gradual", "--")):
                cell = next(
                    (c for c in cells if c["method"] == method and c["schedule"] == schedule
                     and c["sparsity"] == top and c["fine_tuned"]),
                    None,
                )  # fmt: skip
                if cell is None:
                    continue
                budgets = [b for b in BUDGETS if str(b) in cell["fine_tuned"]]
                right.errorbar(
                    budgets,
                    [100 * cell["fine_tuned"][str(b)][0] for b in budgets],
                    yerr=[100 * cell["fine_tuned"][str(b)][1] for b in budgets],
                    marker="o", markersize=3, capsize=2, linestyle=dash, color=colours[method],
                    **style,
                )  # fmt: skip
        left.set_title(f"{task}: one-shot")
        left.set_xlabel("channels removed per layer (%)")
        right.set_title(f"{task}: {100 * top:g}% after fine-tuning")
        right.set_xlabel("fine-tuning epochs (dashed: gradual)")
        right.set_xscale("log")
        right.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
        for panel in (left, right):
            panel.set_ylabel("test accuracy (%)")
            panel.grid(alpha=0.3)
    for panel in axes.flat[2 * len(task_names) :]:
        panel.set_visible(False)
    legend = {
        label: handle
        for panel in axes.flat
        for handle, label in zip(*panel.get_legend_handles_labels(), strict=True)
    }
    figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend))
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=100)
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
            if method.name in GRADUAL:
                found = found + run_gradual(task, model, method, seed)
            rows += found
            print(
                f"{task.name} seed {seed} {method.name}: "
                + " ".join(progress(r) for r in found)
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return rows, dense


def progress(row: dict) -> str:
    tuned = "/".join(f"{100 * v:.1f}" for v in row["fine_tuned"].values())
    first = f"{100 * row['one_shot']:.1f}" if "one_shot" in row else row["schedule"]
    return first + (f"[{tuned}]" if tuned else "")


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
