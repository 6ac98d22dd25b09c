"""Estimator benchmark: how fast coalitions are evaluated, how close the estimates come.

Three parts, side by side in one run on the embedded digits CNN:

1. Throughput: coalition evaluations per second when scoring the second 32-channel block
   of the digits CNN (Conv-BN-ReLU 32-32-64) with 50 permutations over 200 held-out
   images: a naive loop (one full forward per coalition), Captum's
   ``ShapleyValueSampling`` with batched perturbations on the same value, and ours; ours
   also as a fraction of this machine's fp32 matmul rate. Then the same on the same
   network behind a forward torch.fx cannot trace (``RankBranching``).
2. Accuracy: error against exact values of a 14-channel block at budgets of 10n, 30n and
   100n evaluations for each estimator, the coverage of the reported standard errors, and
   how often the estimated bottom-25% set is exactly right.
3. Adaptive stop: evaluations and seconds until the bottom-25% set is certain.

Run ``python benchmarks/estimators.py`` (about five minutes on 2 CPU cores; ``--quick``
for a smoke run). It prints markdown tables and writes ``benchmarks/results/estimators.json``
and ``benchmarks/results/estimators.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from captum.attr import ShapleyValueSampling
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.shapley import estimators
from lightning_shapley.shapley.allocator import retain_freed_memory
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.values import scoring_mode

RESULTS = Path(__file__).parent / "results"
LAYER, BATCHNORM = "features.3", "features.4"  # the second block: its conv and its BN
ADAPTIVE_PERMUTATIONS = 1024  # the adaptive stop's budget


def train_cnn(channels: tuple[int, ...], epochs: int, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    splits = digits_splits(seed=0)
    net = DigitsCNN(channels=channels)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = splits.train.tensors
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return net.eval()


def score_batch() -> tuple[Tensor, Tensor]:
    """The 200 held-out scoring images, as one batch."""
    return digits_splits(seed=0).score.tensors


def matmul_rate() -> float:
    """Best fp32 matmul FLOP/s of this machine over a few sizes."""
    best = 0.0
    for size in (1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        reps = max(3, int(2e10 / (2 * size**3)))
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best


class NaiveValue:
    """One full forward pass per coalition, a hook zeroing channels after the BatchNorm."""

    def __init__(self, net: nn.Module, batch: tuple[Tensor, Tensor], batchnorm: str) -> None:
        self.net, (self.inputs, self.targets) = net, batch
        self.batchnorm = net.get_submodule(batchnorm)
        self.rows = 0

    def __call__(self, coalitions: Tensor) -> Tensor:
        values = []
        with scoring_mode(self.net):
            for mask in coalitions.float():
                hook = self.batchnorm.register_forward_hook(
                    lambda _m, _i, out, mask=mask: out * mask.view(1, -1, 1, 1)
                )
                try:
                    logits = self.net(self.inputs)
                finally:
                    hook.remove()
                values.append(-F.cross_entropy(logits, self.targets))
        self.rows += len(coalitions)
        return torch.stack(values).double()


class BatchedFullValue(NaiveValue):
    """Captum's view of the game: a batch of masks in, one value per mask out, the whole
    model run on the images repeated once per mask."""

    def __call__(self, coalitions: Tensor) -> Tensor:
        k, batch = len(coalitions), len(self.inputs)
        masks = coalitions.float()

        def zero(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
            return (out.view(k, batch, *out.shape[1:]) * masks.view(k, 1, -1, 1, 1)).flatten(0, 1)

        with scoring_mode(self.net):
            hook = self.batchnorm.register_forward_hook(zero)
            try:
                logits = self.net(self.inputs.repeat(k, 1, 1, 1))
            finally:
                hook.remove()
            losses = F.cross_entropy(logits, self.targets.repeat(k), reduction="none")
        self.rows += k
        return -losses.view(k, batch).mean(1).double()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class RankBranching(nn.Module):
    """The digits CNN behind an ``if x.dim() == 3``: torch.fx cannot trace it, torch.export can.

    The kind of Python users' forwards hold (a shape check, a squeeze for single images),
    which sends the fx engines to the full one.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.unsqueeze(1) if x.dim() == 3 else x)


def throughput(
    net: nn.Module, prefix: str, engines: tuple[str, ...], permutations: int, flops: float
) -> list[dict]:
    """Evaluations per second of each evaluator on ``prefix + LAYER``, side by side."""
    batch = score_batch()
    rows: list[dict] = []

    def add(name: str, per_forward: int | str, evaluations: int, seconds: float) -> None:
        rows.append(
            {
                "evaluator": name,
                "coalitions_per_forward": per_forward,
                "evaluations": evaluations,
                "seconds": seconds,
                "evals_per_s": evaluations / seconds,
            }
        )

    naive = NaiveValue(net, batch, prefix + BATCHNORM)
    estimate, seconds = timed(
        lambda: estimators.permutation(naive, 32, num_permutations=permutations, seed=0)
    )
    add("naive loop (one forward per coalition)", 1, estimate.evaluations, seconds)

    for per_eval in (1, 4, 16, 33):
        captum_value = BatchedFullValue(net, batch, prefix + BATCHNORM)
        sampler = ShapleyValueSampling(captum_value)
        _, seconds = timed(
            lambda sampler=sampler, per_eval=per_eval: sampler.attribute(
                torch.ones(1, 32),
                baselines=torch.zeros(1, 32),
                n_samples=permutations,
                perturbations_per_eval=per_eval,
            )
        )
        add("captum ShapleyValueSampling", per_eval, captum_value.rows, seconds)

    for engine in engines:

        def run(engine: str = engine) -> tuple[estimators.ShapleyEstimate, ChannelGame]:
            game = ChannelGame(net, prefix + LAYER, [batch], engine=engine)
            return estimators.permutation(game, 32, num_permutations=permutations, seed=0), game

        (estimate, game), seconds = timed(run)
        name = f"ours, engine {engine}" + (f" ({game.engine})" if engine == "auto" else "")
        add(name, game.coalitions_per_forward, estimate.evaluations, seconds)

    rate = matmul_rate()
    naive_rate = rows[0]["evals_per_s"]
    best_captum = max(r["evals_per_s"] for r in rows if r["evaluator"].startswith("captum"))
    for row in rows:
        row["vs_naive"] = row["evals_per_s"] / naive_rate
        row["vs_best_captum"] = row["evals_per_s"] / best_captum
        row["fraction_of_matmul_rate"] = row["evals_per_s"] * flops / rate
    return rows


def downstream_flops(net: nn.Module) -> float:
    """FLOPs of one coalition's evaluation downstream of the masked layer."""
    game = ChannelGame(net, LAYER, [score_batch()], engine="split")
    with scoring_mode(net), FlopCounterMode(display=False) as counter:
        game._forward(torch.ones(1, 32), 0)
    return counter.get_total_flops()


def exact_table(n_channels: int) -> tuple[Callable[[Tensor], Tensor], float, int]:
    """All 2^n coalition values of a trained block, and a lookup value function over them."""
    net = train_cnn((32, n_channels, 64), epochs=15)
    game = ChannelGame(net, LAYER, [score_batch()])
    codes = torch.arange(2**n_channels)
    everything = (codes[:, None] >> torch.arange(n_channels)) & 1 == 1
    table, seconds = timed(lambda: game(everything))
    weights = 2 ** torch.arange(n_channels)
    return (lambda c: table[(c.long() * weights).sum(1)]), seconds, game.coalitions_per_forward


def accuracy(n: int, seeds: int) -> tuple[list[dict], dict]:
    value, seconds, _ = exact_table(n)
    truth = estimators.exact(value, n).values
    k = max(1, round(n / 4))
    true_bottom = set(truth.argsort()[:k].tolist())
    methods = {
        "permutation (antithetic)": (estimators.permutation, {}),
        "tmc (truncation 0.02)": (estimators.truncated_monte_carlo, {"truncation": 0.02}),
        "surrogate (control variate)": (estimators.surrogate, {}),
        "adaptive (bottom-25%)": (estimators.adaptive, {"bottom_k": k}),
    }
    rows = []
    budgets = [("10n", {"num_permutations": None, "max_evaluations": 10 * n})]
    budgets += [("30n", {"num_permutations": None, "max_evaluations": 30 * n})]
    budgets += [("100n", {"num_permutations": None, "max_evaluations": 100 * n})]
    budgets += [("100 permutations", {"num_permutations": 100})]
    for budget_name, budget in budgets:
        for name, (method, options) in methods.items():
            if name.startswith("adaptive") and budget_name == "100 permutations":
                continue
            errors, stderrs, covered, exact_sets, used, times = [], [], [], [], [], []
            for seed in range(seeds):
                est = method(value, n, seed=seed, **budget, **options)
                error = (est.values - truth).abs()
                errors.append(error.mean().item())
                stderrs.append(est.stderr.mean().item())
                covered.append((error <= 1.96 * est.stderr).double().mean().item())
                exact_sets.append(set(est.values.argsort()[:k].tolist()) == true_bottom)
                used.append(est.evaluations)
                times.append(est.seconds)
            rows.append(
                {
                    "budget": budget_name,
                    "estimator": name,
                    "evaluations": statistics.mean(used),
                    "mae": statistics.mean(errors),
                    "mae_se": statistics.stdev(errors) / len(errors) ** 0.5,
                    "mean_stderr": statistics.mean(stderrs),
                    "coverage_95": statistics.mean(covered),
                    "bottom_25_exact": statistics.mean(exact_sets),
                    "estimator_seconds": statistics.mean(times),
                }
            )
    summary = {"players": n, "exact_table_seconds": seconds, "seeds": seeds, "bottom_k": k}
    return rows, summary


def adaptive_stop(n: int, seeds: int) -> list[dict]:
    rows = []
    for channels, label in (
        ((32, n, 64), f"{n}-channel block"),
        ((32, 32, 64), "32-channel block"),
    ):
        net = train_cnn(channels, epochs=15)
        width = channels[1]
        k = max(1, round(width / 4))
        truth = None
        if width <= 16:
            game = ChannelGame(net, LAYER, [score_batch()])
            truth = set(estimators.exact(game, width).values.argsort()[:k].tolist())
        for bound, seed in itertools.product(estimators.BOUNDS, range(seeds)):
            game, build_seconds = timed(lambda net=net: ChannelGame(net, LAYER, [score_batch()]))
            est = estimators.adaptive(
                game,
                width,
                bottom_k=k,
                bound=bound,
                seed=seed,
                num_permutations=ADAPTIVE_PERMUTATIONS,
            )
            found = set(est.values.argsort()[:k].tolist())
            rows.append(
                {
                    "block": label,
                    "bottom_k": k,
                    "bound": bound,
                    "seed": seed,
                    "evaluations": est.evaluations,
                    "seconds": est.seconds + build_seconds,
                    "matches_exact": None if truth is None else found == truth,
                    # Sampling ends before the budget only once the set is certain.
                    "certain": int(est.samples.max()) < ADAPTIVE_PERMUTATIONS // 2,
                }
            )
    return rows


def throughput_table(rows: list[dict]) -> list[str]:
    lines = [
        "| evaluator | coalitions per forward | evaluations | seconds | evals/s | vs naive "
        "| vs best Captum | of matmul rate |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['evaluator']} | {r['coalitions_per_forward']} | {r['evaluations']} "
            f"| {r['seconds']:.2f} | {r['evals_per_s']:.0f} | {r['vs_naive']:.2f}x "
            f"| {r['vs_best_captum']:.2f}x | {r['fraction_of_matmul_rate']:.2f} |"
        )
    return lines


def markdown(
    throughput_rows: list[dict],
    untraceable_rows: list[dict],
    throughput_info: dict,
    accuracy_rows: list[dict],
    accuracy_info: dict,
    adaptive_rows: list[dict],
) -> str:
    lines = [
        f"### Throughput: scoring `{LAYER}` (32 channels) of the digits CNN, "
        f"{throughput_info['permutations']} permutations, {throughput_info['images']} images",
        "",
        f"fp32 matmul rate {throughput_info['matmul_gflops']:.0f} GFLOP/s; one downstream "
        f"evaluation is {throughput_info['downstream_mflop_per_evaluation']:.1f} MFLOP.",
        "",
        *throughput_table(throughput_rows),
        "",
        "### Throughput on a CNN torch.fx cannot trace: the same network and value, behind an "
        "`if x.dim() == 3` (`RankBranching`)",
        "",
        "The fx engines refuse it; `auto` captures it with torch.export instead.",
        "",
        *throughput_table(untraceable_rows),
    ]
    lines += [
        "",
        f"### Accuracy against exact values: a {accuracy_info['players']}-channel block, "
        f"{accuracy_info['seeds']} seeds per row (exact table: "
        f"{2 ** accuracy_info['players']} coalitions in "
        f"{accuracy_info['exact_table_seconds']:.1f} s)",
        "",
        "MAE is the mean absolute error of the values (± its standard error over seeds); "
        "coverage is the share of values within 1.96 reported standard errors of the truth; "
        f"bottom-25% is how often the estimated {accuracy_info['bottom_k']} lowest channels "
        "are exactly the true ones.",
        "",
        "| budget | estimator | evaluations used | MAE | mean stderr | coverage | "
        "bottom-25% exact | estimator s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in accuracy_rows:
        lines.append(
            f"| {r['budget']} | {r['estimator']} | {r['evaluations']:.0f} | {r['mae']:.4f} ± "
            f"{r['mae_se']:.4f} | {r['mean_stderr']:.4f} | {r['coverage_95']:.2f} "
            f"| {r['bottom_25_exact']:.2f} | {r['estimator_seconds']:.2f} |"
        )
    lines += [
        "",
        "### Adaptive stop: until the bottom-25% set is certain (95% confidence)",
        "",
        f"At most {ADAPTIVE_PERMUTATIONS} orderings; 'certain' says whether the bounds "
        "separated the set before that budget ran out.",
        "",
        "| block | bottom k | bound | seed | evaluations | seconds | certain | matches exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in adaptive_rows:
        match = "n/a" if r["matches_exact"] is None else ("yes" if r["matches_exact"] else "no")
        lines.append(
            f"| {r['block']} | {r['bottom_k']} | {r['bound']} | {r['seed']} | {r['evaluations']} "
            f"| {r['seconds']:.1f} | {'yes' if r['certain'] else 'no'} | {match} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    args = parser.parse_args()
    # Every contender runs under the malloc settings the game applies on the CPU.
    retain_freed_memory()
    permutations, n, seeds = (6, 8, 3) if args.quick else (50, 14, 20)
    net = train_cnn((32, 32, 64), epochs=10)
    flops = downstream_flops(net)
    throughput_rows = throughput(net, "", ("full", "split", "split+fold"), permutations, flops)
    untraceable_rows = throughput(RankBranching(net), "net.", ("full", "auto"), permutations, flops)
    throughput_info = {
        "matmul_gflops": matmul_rate() / 1e9,
        "downstream_mflop_per_evaluation": flops / 1e6,
        "permutations": permutations,
        "images": len(score_batch()[0]),
    }
    accuracy_rows, accuracy_info = accuracy(n, seeds)
    adaptive_rows = adaptive_stop(n, 1 if args.quick else 3)
    report = markdown(
        throughput_rows,
        untraceable_rows,
        throughput_info,
        accuracy_rows,
        accuracy_info,
        adaptive_rows,
    )
    print(report)
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"estimators{suffix}.md").write_text(report)
    payload = {
        "command": "python benchmarks/estimators.py" + (" --quick" if args.quick else ""),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "throughput": {"rows": throughput_rows, **throughput_info},
        "throughput_untraceable": {"rows": untraceable_rows, **throughput_info},
        "accuracy": {"rows": accuracy_rows, **accuracy_info},
        "adaptive": adaptive_rows,
    }
    (RESULTS / f"estimators{suffix}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
