"""Scale benchmark: what one pruning step costs as the network grows, before and after.

Every network is trained briefly here, then one step prunes every unit to 50% at the
callback's defaults (band of depth 1 computed exactly, rounds of 2% of each unit, units
interleaved, BatchNorm statistics re-estimated after every turn), twice from the same
trained weights: with ``rescore="all"`` (every survivor valued again every round: exact
greedy elimination, the default before) and with ``rescore="near_cut"`` (the default now:
only the survivors near the cut). Both run in this one process, one after the other on
each network, on the same scoring and recalibration batches.

Networks (scoring on 128 held-out samples, re-estimation on 8 training batches of 64):

- ``cnn-<c>``: the embedded digits CNN, Conv-BN-ReLU ``w-w-2w`` (``c = 4w`` channels in
  play, 64 to 1,024), on scikit-learn's digits (8x8);
- ``resnet-20``, ``resnet-56``: CIFAR-style ResNets (3 stages of 16/32/64 channels, basic
  blocks, projection shortcuts) on the digits upsampled to 3x32x32;
- ``signals-cnn``: the 1-D CNN of the quality benchmark (32 channels per unit, 32-32-64)
  on its generated waveforms;
- ``bert``: the BERT-style encoder of the quality benchmark (attention heads and MLP
  neurons) on its generated token task.

Per step and version: the evaluations (coalition values computed), the scoring seconds,
the downstream forward-equivalents (each evaluation's FLOPs, counted by
``torch.utils.flop_counter`` on the unit's game, in units of one full forward pass of one
sample), the same in epochs of a 50,000-sample data set (forward passes only), the
engine's FLOP rate as a fraction of this machine's float32 matrix-multiply rate (measured
here on 1024x1024 products), the test accuracy after the step, and the share of exact
greedy's removed channels that the new default removed too. The growth exponent is the
least-squares slope of log(evaluations) against log(channels) over the ``cnn-*`` family.

Run ``python benchmarks/scale.py`` (about 30 minutes on 2 CPU cores). Exact greedy is
skipped above ``--exact-up-to`` channels (512 by default: a 1,024-channel step of exact
greedy takes the better part of an hour here) and on ResNet-56. It prints a markdown
table and writes ``benchmarks/results/scale.md`` and ``benchmarks/results/scale.json``.
No GPU figures: this benchmark has been run on CPU machines only.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from quality import RECALIBRATION_BATCHES, accuracy, batches_of, train
from tasks import BertClassifier, CifarResNet, SignalCNN, marker_splits, signal_splits
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_shapley import ShapleyPruning
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.model_io import call_model
from lightning_shapley.pruning.masking import copy_model, pruned_channels
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.units import PrunableUnit, find_units
from lightning_shapley.shapley.game import ChannelGame

RESULTS = Path(__file__).parent / "results"
AMOUNT = 0.5
SCORING_SAMPLES = 128
DATASET = 50_000
VERSIONS = ("all", "near_cut")

Split = tuple[Tensor, Tensor]


@dataclass
class Network:
    name: str
    make: Callable[[], nn.Module]
    splits: tuple[Split, Split, Split]
    epochs: int
    lr: float = 1e-2
    exact: bool = True


def digits() -> tuple[Split, Split, Split]:
    data = digits_splits(seed=0)
    return tuple(  # type: ignore[return-value]
        (x.reshape(-1, 1, 8, 8), y)
        for x, y in (data.train.tensors, data.score.tensors, data.test.tensors)
    )


def digits_rgb32() -> tuple[Split, Split, Split]:
    """The digits upsampled to 32x32, in three channels of different contrast."""
    scale = torch.tensor([1.0, 0.7, 0.4]).reshape(1, 3, 1, 1)
    return tuple(  # type: ignore[return-value]
        (F.interpolate(x, size=32, mode="bilinear", align_corners=False) * scale, y)
        for x, y in digits()
    )


def networks(widths: tuple[int, ...], exact_up_to: int) -> list[Network]:
    found = [
        Network(f"cnn-{4 * w}", lambda w=w: DigitsCNN(channels=(w, w, 2 * w)), digits(), 8)
        for w in widths
    ]
    for network in found:
        network.exact = int(network.name.split("-")[1]) <= exact_up_to
    images = digits_rgb32()
    found += [
        Network("resnet-20", lambda: CifarResNet(20), images, 4),
        Network("resnet-56", lambda: CifarResNet(56), images, 4, exact=False),
        Network("signals-cnn", SignalCNN, signal_splits(), 10),
        Network("bert", BertClassifier, marker_splits(), 8, lr=1e-3),
    ]
    return found


# --------------------------------------------------------------------------- measuring


def matmul_flops_per_second(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def evaluation_flops(model: nn.Module, units: list[PrunableUnit], batches: list) -> dict:
    """FLOPs of one coalition evaluation of each unit's game on the dense network."""
    costs = {}
    for unit in units:
        game = ChannelGame.from_unit(model, unit, batches)
        costs[unit.name] = flops(lambda g=game: g(torch.ones(1, g.n_players, dtype=torch.bool)))
        game.release()
    return costs


def step(
    dense: nn.Module, units: list[PrunableUnit], batches: list, recalibration: list, rescore: str
) -> tuple[nn.Module, dict]:
    defaults = ShapleyPruning(reporter=False)
    model = copy_model(dense)
    pruner = RoundPruner(
        units,
        defaults.scorer,
        removal_step=defaults.removal_step,
        interleave=defaults.interleave,
        rescore=rescore,
    )
    start = time.perf_counter()
    scores = pruner.prune(model, batches, AMOUNT, recalibration)
    wall = time.perf_counter() - start
    return model, {
        "evaluations": {name: s.evaluations for name, s in scores.items()},
        "scoring_seconds": sum(s.seconds for s in scores.values()),
        "step_seconds": wall,
    }


def measure(network: Network, matmul_rate: float) -> dict:
    train_split, score_split, test_split = network.splits
    torch.manual_seed(0)
    dense = train(network.make(), train_split, network.epochs, network.lr, seed=0)
    score = (score_split[0][:SCORING_SAMPLES], score_split[1][:SCORING_SAMPLES])
    batches = batches_of(score, 0, shuffle=False)
    recalibration = [x for x, _ in batches_of(train_split, 0, shuffle=True)]
    recalibration = recalibration[:RECALIBRATION_BATCHES]
    units = find_units(dense, batches[0][0][:2])
    per_evaluation = evaluation_flops(dense, units, batches)
    forward = flops(lambda: call_model(dense, score[0])) / SCORING_SAMPLES
    result = {
        "network": network.name,
        "channels": sum(unit.n_channels for unit in units),
        "units": len(units),
        "dense_accuracy": accuracy(dense, test_split),
        "forward_flops_per_sample": forward,
        "versions": {},
    }
    removed = {}
    for rescore in VERSIONS:
        if rescore == "all" and not network.exact:
            continue
        model, cost = step(dense, units, batches, recalibration, rescore)
        work = sum(cost["evaluations"][u.name] * per_evaluation[u.name] for u in units)
        cost |= {
            "total_evaluations": sum(cost["evaluations"].values()),
            "evaluation_flops": work,
            "forward_equivalents": work / forward,
            "epochs_of_50k": work / forward / DATASET,
            "matmul_fraction": work / max(cost["scoring_seconds"], 1e-9) / matmul_rate,
            "accuracy": accuracy(model, test_split),
        }
        removed[rescore] = {u.name: pruned_channels(model, u) for u in units}
        result["versions"][rescore] = cost
        print(
            f"{network.name} rescore={rescore}: {cost['total_evaluations']} evaluations, "
            f"{cost['scoring_seconds']:.1f} s scoring, accuracy {cost['accuracy']:.4f}",
            flush=True,
        )
    if len(removed) == 2:
        greedy = sum(int(m.sum()) for m in removed["all"].values())
        both = sum(int((removed["all"][n] & removed["near_cut"][n]).sum()) for n in removed["all"])
        result["same_channels_as_greedy"] = both / greedy
    return result


def growth_exponent(results: list[dict], rescore: str) -> float | None:
    points = [
        (math.log(r["channels"]), math.log(r["versions"][rescore]["total_evaluations"]))
        for r in results
        if r["network"].startswith("cnn-") and rescore in r["versions"]
    ]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return covariance / sum((x - mean_x) ** 2 for x, _ in points)


def markdown(results: list[dict], exponents: dict, matmul_rate: float, header: str) -> str:
    lines = [
        "# Cost of one pruning step as the network grows",
        "",
        header,
        "",
        "| network | channels | evaluations (all, near_cut) | ratio | evaluations per channel "
        "(all, near_cut) | scoring s (all, near_cut) | forward-equivalents (all, near_cut) "
        "| epochs of 50k (all, near_cut) | FLOP rate / matmul (all, near_cut) "
        "| test accuracy (dense; all, near_cut) | same channels as exact greedy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pair(result: dict, key: str, fmt: str) -> str:
        cells = [
            format(result["versions"][v][key], fmt) if v in result["versions"] else "-"
            for v in VERSIONS
        ]
        return ", ".join(cells)

    for r in results:
        versions = r["versions"]
        totals = {v: versions[v]["total_evaluations"] for v in versions}
        ratio = f"{totals['near_cut'] / totals['all']:.2f}" if "all" in totals else "-"
        per_channel = ", ".join(
            f"{versions[v]['total_evaluations'] / r['channels']:.1f}" if v in versions else "-"
            for v in VERSIONS
        )
        same = r.get("same_channels_as_greedy")
        lines.append(
            f"| {r['network']} | {r['channels']} | {pair(r, 'total_evaluations', 'd')} "
            f"| {ratio} | {per_channel} | {pair(r, 'scoring_seconds', '.1f')} "
            f"| {pair(r, 'forward_equivalents', '.3g')} | {pair(r, 'epochs_of_50k', '.3g')} "
            f"| {pair(r, 'matmul_fraction', '.3f')} "
            f"| {r['dense_accuracy']:.3f}; {pair(r, 'accuracy', '.3f')} "
            f"| {'-' if same is None else f'{100 * same:.0f}%'} |"
        )
    lines += [
        "",
        "Growth exponent of evaluations in channels over the cnn-* family (least squares on "
        "log-log): "
        + ", ".join(
            f"rescore={v}: {'-' if e is None else f'{e:.2f}'}" for v, e in exponents.items()
        )
        + f". Matrix-multiply rate of this machine: {matmul_rate / 1e9:.1f} GFLOP/s (float32).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--exact-up-to", type=int, default=512)
    parser.add_argument("--networks", nargs="+", help="only these networks (names)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    matmul_rate = matmul_flops_per_second()
    chosen = [
        n
        for n in networks(tuple(args.widths), args.exact_up_to)
        if args.networks is None or n.name in args.networks
    ]
    results = [measure(network, matmul_rate) for network in chosen]
    exponents = {v: growth_exponent(results, v) for v in VERSIONS}
    header = (
        f"One step to {AMOUNT:.0%} of every unit at the callback's defaults; rescore=all "
        "(exact greedy, the default before) and rescore=near_cut (the default now) from "
        f"the same trained weights. torch {torch.__version__}, {args.threads} threads, "
        f"{platform.machine()}, CPU."
    )
    table = markdown(results, exponents, matmul_rate, header)
    print(table)
    (args.out / "scale.md").write_text(table)
    (args.out / "scale.json").write_text(
        json.dumps(
            {"matmul_flops_per_second": matmul_rate, "exponents": exponents, "results": results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
