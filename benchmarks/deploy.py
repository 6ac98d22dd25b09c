"""Deployment benchmark: what removing pruned channels buys on the CPU, and int8 on top.

For two CNNs trained on the embedded 8x8 digits, the package's digits CNN (Conv-BN-ReLU
32-32-64) and a wide one (128-128-256), and for 25%, 50% and 75% channel sparsity in
every prunable unit, four variants run side by side:

- dense: the trained model;
- masked: the same model with the pruned channels masked by ``masking.prune_channels``
  (what the callback leaves after training), then fine-tuned briefly with the masks on;
- compact: ``export.compact`` of the masked model, the pruned channels removed;
- compact + int8: ``export.quantize`` of the compact model, static int8 convolutions
  calibrated on the 200 held-out scoring images, dynamic int8 Linear layers.

The channels pruned are those whose producer weights have the lowest L1 norm, the same
fraction in every unit. Latency is the median of interleaved calls (one call of each
variant per round, so a busy machine slows all of them alike), at batch 1 and batch 64,
reported in milliseconds and as a speed-up over dense; the speed-up in the process's CPU
time is reported too, as other jobs on a shared machine inflate the wall clock.
Parameters count the stored weights (a masked model stores every channel, and its masks
besides); file sizes are of ``torch.save(state_dict)`` for dense and masked,
``export.save_compact`` for compact, and the int8 TorchScript file
``export.to_torchscript`` writes (torch's int8 modules load from no other format).
Accuracy is on the digits test split; the compact model's largest absolute logit
difference from the masked model's is checked on it.

Run ``python benchmarks/deploy.py`` (about six minutes on 2 CPU cores; ``--quick`` for a
smoke run). It prints markdown tables and writes ``benchmarks/results/deploy.json`` and
``benchmarks/results/deploy.md``. Timings use one thread by default (``--threads``): on a
shared 2-core machine a second intra-op thread mostly waits for its preempted partner.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_shapley import export
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning import masking, units

RESULTS = Path(__file__).parent / "results"
MODELS = {"digits CNN": (32, 32, 64), "wide CNN": (128, 128, 256)}
SPARSITIES = (0.25, 0.50, 0.75)
VARIANTS = ("dense", "masked", "compact", "compact + int8")
BATCHES = (1, 64)
TARGET_SPEEDUP = 1.6  # compact over dense at 50% sparsity, batch 64


def train(net: nn.Module, inputs: Tensor, targets: Tensor, epochs: int, lr: float) -> nn.Module:
    """Adam on batches of 64; masked channels stay zero (the masks are re-applied each forward)."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return net.eval()


def prune_lowest_l1(net: nn.Module, example: Tensor, sparsity: float) -> nn.Module:
    """A masked copy: in every unit, the ``sparsity`` fraction of channels with least L1."""
    masked = copy.deepcopy(net)
    for unit in units.find_units(masked, example):
        weight = masked.get_submodule(unit.producers[0]).weight.detach()
        pruned = torch.zeros(unit.n_channels, dtype=torch.bool)
        pruned[weight.abs().flatten(1).sum(1).argsort()[: round(sparsity * unit.n_channels)]] = True
        masking.prune_channels(masked, unit, pruned)
    return masked.eval()


def interleaved_latency(
    models: dict[str, Callable[[Tensor], Tensor]], x: Tensor, rounds: int, warmup: int = 5
) -> dict[str, tuple[float, float]]:
    """Median wall-clock and CPU milliseconds per call of each model, one call of each per round.

    The CPU time of the process leaves out the time other jobs hold the cores, which a
    shared machine adds to the wall clock in bursts; with one thread it is the latency a
    quiet machine would show.
    """
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(warmup):
                model(x)
        for _ in range(rounds):
            for name, model in models.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                model(x)
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
    return {
        name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name]))
        for name in models
    }


def stored_parameters(model: nn.Module) -> int:
    # A masked parameter is stored as <p>_orig (a parameter) and <p>_mask (a buffer).
    return sum(p.numel() for p in model.parameters())


def file_bytes(model: nn.Module, variant: str, folder: Path, example: Tensor) -> int:
    path = folder / f"{variant.replace(' + ', '-')}.pt"
    if variant == "compact":
        export.save_compact(model, path)
    elif variant == "compact + int8":
        export.to_torchscript(model, example, path)
    else:
        torch.save(model.state_dict(), path)
    return export.file_size(path)


def predict(model: Callable[[Tensor], Tensor], inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(inputs[i : i + 200]) for i in range(0, len(inputs), 200)])


def benchmark_model(
    name: str, channels: tuple[int, ...], epochs: int, finetune: int, rounds: dict[int, int]
) -> list[dict]:
    splits = digits_splits(seed=0)
    train_x, train_y = splits.train.tensors
    score_x, _ = splits.score.tensors
    test_x, test_y = splits.test.tensors
    torch.manual_seed(0)
    start = time.perf_counter()
    dense = train(DigitsCNN(channels=channels), train_x, train_y, epochs, lr=1e-2)
    print(f"{name}: trained {epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for sparsity in SPARSITIES:
        torch.manual_seed(1)
        masked = prune_lowest_l1(dense, score_x, sparsity)
        train(masked, train_x, train_y, finetune, lr=1e-3)
        small = export.compact(masked, score_x).eval()
        calibration = [score_x[i : i + 50] for i in range(0, len(score_x), 50)]
        int8 = export.quantize(small, calibration_inputs=calibration)
        variants = {"dense": dense, "masked": masked, "compact": small, "compact + int8": int8}

        logits = {variant: predict(model, test_x) for variant, model in variants.items()}
        latency = {b: interleaved_latency(variants, test_x[:b], rounds[b]) for b in BATCHES}
        with tempfile.TemporaryDirectory() as folder:
            sizes = {
                variant: file_bytes(model, variant, Path(folder), test_x[:64])
                for variant, model in variants.items()
            }
        for variant, model in variants.items():
            row = {
                "model": name,
                "channels": list(channels),
                "sparsity": sparsity,
                "variant": variant,
                "parameters": stored_parameters(small if variant == "compact + int8" else model),
                "file_bytes": sizes[variant],
                "test_accuracy": float((logits[variant].argmax(1) == test_y).float().mean()),
                "max_abs_diff_vs_masked": float((logits[variant] - logits["masked"]).abs().max()),
            }
            for b in BATCHES:
                (wall, cpu), (dense_wall, dense_cpu) = latency[b][variant], latency[b]["dense"]
                row[f"batch{b}_ms"] = wall
                row[f"batch{b}_speedup"] = dense_wall / wall
                row[f"batch{b}_cpu_ms"] = cpu
                row[f"batch{b}_cpu_speedup"] = dense_cpu / cpu
            rows.append(row)
        compact_row = rows[-2]
        print(
            f"{name} {sparsity:.0%}: compact {compact_row['batch64_speedup']:.2f}x dense at "
            f"batch 64, max |compact - masked| {compact_row['max_abs_diff_vs_masked']:.1e}",
            flush=True,
        )
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """The issue's target, per model: compact >= 1.6x dense at 50% and batch 64."""
    out = []
    for name in MODELS:
        at_half = {r["variant"]: r for r in rows if r["model"] == name and r["sparsity"] == 0.5}
        compact, masked = at_half["compact"], at_half["masked"]
        out.append(
            {
                "model": name,
                "compact_speedup_batch64": compact["batch64_speedup"],
                "compact_cpu_time_speedup_batch64": compact["batch64_cpu_speedup"],
                "masked_speedup_batch64": masked["batch64_speedup"],
                "compact_vs_masked_max_abs_diff": compact["max_abs_diff_vs_masked"],
                "target_met": compact["batch64_speedup"] >= TARGET_SPEEDUP
                and compact["max_abs_diff_vs_masked"] <= 1e-5,
            }
        )
    return out


def markdown(rows: list[dict], summary: list[dict], info: dict) -> str:
    lines = [
        f"CPU latency with {info['threads']} thread(s), median of {info['rounds'][64]} "
        f"interleaved rounds at batch 64 and {info['rounds'][1]} at batch 1; torch "
        f"{info['torch']}, quantized engine {info['quantized_engine']}. Lowest-L1 channels "
        f"pruned in every unit, then {info['finetune_epochs']} fine-tuning epoch(s) with the "
        "masks on; accuracy on the 397-image digits test split. 'x dense' is the speed-up "
        "over the dense model measured in the same rounds (wall clock; 'CPU time' counts "
        "the process's CPU time instead, which leaves out the time other jobs hold the "
        "cores). 'met' uses the wall clock. Load average (1 min) of the "
        f"machine: {info['load_average_1min'][0]} at the start, {info['load_average_1min'][1]} "
        f"at the end, on {os.cpu_count()} CPUs.",
        "",
        "The masked model shows no speed-up: its masks zero the pruned channels but every "
        "channel is still computed (and the masks are re-applied at each forward). Only the "
        "compact model, with the channels removed, is faster.",
        "",
    ]
    for name, channels in MODELS.items():
        lines += [
            f"### {name}: Conv-BN-ReLU {'-'.join(map(str, channels))}, 8x8 digits",
            "",
            "| sparsity | variant | parameters | file KB | batch 1 ms | x dense | batch 64 ms "
            "| x dense | x dense, CPU time | test acc | max abs diff vs masked |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            if r["model"] != name:
                continue
            # Dense against masked measures what pruning changed, not an export error.
            diff = "-" if r["variant"] == "dense" else f"{r['max_abs_diff_vs_masked']:.1e}"
            lines.append(
                f"| {r['sparsity']:.0%} | {r['variant']} | {r['parameters']:,} "
                f"| {r['file_bytes'] / 1024:.1f} | {r['batch1_ms']:.3f} "
                f"| {r['batch1_speedup']:.2f}x | {r['batch64_ms']:.2f} "
                f"| {r['batch64_speedup']:.2f}x | {r['batch64_cpu_speedup']:.2f}x "
                f"| {r['test_accuracy']:.3f} "
                f"| {diff} |"
            )
        lines.append("")
    lines += [
        f"### Target: compact >= {TARGET_SPEEDUP}x dense at 50% sparsity, batch 64, "
        "outputs equal to the masked model's",
        "",
        "| model | compact x dense | compact x dense, CPU time | masked x dense "
        "| max abs diff compact vs masked | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['compact_speedup_batch64']:.2f}x "
            f"| {s['compact_cpu_time_speedup_batch64']:.2f}x "
            f"| {s['masked_speedup_batch64']:.2f}x | {s['compact_vs_masked_max_abs_diff']:.1e} "
            f"| {'yes' if s['target_met'] else 'no'} |"
        )
    lines += [
        "",
        "Parameters of compact + int8 are the compact model's (the same weights, stored as "
        "int8 in its quantized layers); its file is TorchScript, which also stores the code. "
        "Dense and masked files are `torch.save(state_dict)`, the masked one with its masks.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for the timings"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    epochs, finetune = (2, 1) if args.quick else (10, 3)
    rounds = {1: 20, 64: 5} if args.quick else {1: 300, 64: 100}
    rows = []
    for name, channels in MODELS.items():
        rows += benchmark_model(name, channels, epochs, finetune, rounds)
    summary = verdicts(rows)
    info = {
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "epochs": epochs,
        "finetune_epochs": finetune,
        # Other jobs sharing the CPUs slow every variant of a round alike, not the ratios.
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    report = markdown(rows, summary, info)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"deploy{suffix}.md").write_text(report)
    payload = {
        "command": "python benchmarks/deploy.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
        },
        **info,
        "target": {"speedup": TARGET_SPEEDUP, "sparsity": 0.5, "batch": 64, "models": summary},
        "rows": rows,
    }
    (RESULTS / f"deploy{suffix}.json").write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
