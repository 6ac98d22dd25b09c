"""The summary of a multirun: one table and one plot over the ``result.json`` of its jobs.

Every job of ``lightning-shapley`` writes ``result.json`` into its output folder. When a
multirun ends, :class:`SweepSummary` (a Hydra callback, registered in
``conf/hydra/default.yaml``) reads them all and writes into the sweep folder:

* ``sweep_summary.csv`` and ``sweep_summary.md``: one row per job (scorer, amount, the
  sparsity reached, dense and pruned test accuracy, parameters, scoring seconds and
  coalition evaluations, the job's overrides);
* ``sweep_cells.md``: one row per line and amount, the jobs that differ only by seed
  taken together: the pruned test accuracy as mean ± standard deviation, so that criteria
  are compared by more than one run each;
* ``sweep_accuracy.png``: the pruned test accuracy against the sparsity, one line per
  scorer (mean and spread over jobs that differ only by seed), the dense accuracy dashed.

A line is labelled by its scorer, plus any other override that varies across the sweep
(``estimator=band``, ``pruning.scope=global``...), so that different settings of one scorer
never share a line. This module imports nothing heavy: Hydra instantiates the callback for
every run, and matplotlib is loaded only to draw.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lightning_shapley.app.summary import RESULT_FILE

log = logging.getLogger(__name__)

# Overrides that place a job on a line (the scorer) or along it (amount, seed): never in labels.
_NOT_IN_LABEL = ("pruning", "pruning.scorer", "pruning.amount", "seed")
COLUMNS = (
    "job",
    "label",
    "scorer",
    "amount",
    "sparsity",
    "dense_accuracy",
    "pruned_accuracy",
    "accuracy_drop",
    "dense_parameters",
    "pruned_parameters",
    "scoring_seconds",
    "evaluations",
    "overrides",
)


class SweepSummary(Callback):
    """Writes the sweep's summary table and plot when a multirun ends.

    Args:
        name: stem of the files written into the sweep folder: ``<name>_summary.csv``,
            ``<name>_summary.md`` and ``<name>_accuracy.png``.
    """

    def __init__(self, name: str = "sweep") -> None:
        self.name = name
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Resolves the sweep folder once, before any job (``${now:}`` must not move)."""
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Collects the jobs' results and writes the summary files."""
        sweep_dir = self._sweep_dir or Path(str(config.hydra.sweep.dir))
        results = collect_results(sweep_dir)
        if not results:
            log.warning(f"no {RESULT_FILE} under {sweep_dir}: no sweep summary written")
            return
        paths = write_summary(results, sweep_dir, name=self.name)
        log.info(f"sweep summary of {len(results)} jobs: " + ", ".join(map(str, paths.values())))
        print(paths["markdown"].read_text())
        print(paths["cells"].read_text())


def collect_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """The ``result.json`` of every job under ``sweep_dir``, in job order.

    Args:
        sweep_dir: the multirun's folder (``hydra.sweep.dir``).

    Returns:
        The parsed results; a file that cannot be read is skipped with a warning.
    """
    results = []
    for path in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            log.warning(f"skipping {path}: {error}")
    return sorted(results, key=lambda r: (_job_number(r), str(r.get("job", {}).get("dir", ""))))


def summary_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per job with the :data:`COLUMNS`, sorted by label, then amount.

    Example:
        >>> result = {"job": {"num": 0, "overrides": ["pruning=l1"]}, "scorer": "l1",
        ...           "amount": 0.5, "dense": {"test_accuracy": 0.98, "parameters": 100},
        ...           "pruned": {"test_accuracy": 0.96, "parameters": 40, "sparsity": 0.5},
        ...           "scoring": {"seconds": 0.1, "evaluations": 0}}
        >>> row = summary_rows([result])[0]
        >>> row["label"], row["accuracy_drop"]
        ('l1', 0.02)
    """
    labels = _labels(results)
    rows = []
    for result, label in zip(results, labels, strict=True):
        dense, pruned = result.get("dense", {}), result.get("pruned", {})
        scoring = result.get("scoring", {})
        dense_acc, pruned_acc = dense.get("test_accuracy"), pruned.get("test_accuracy")
        drop = None if dense_acc is None or pruned_acc is None else dense_acc - pruned_acc
        rows.append(
            {
                "job": _job_number(result),
                "label": label,
                "scorer": result.get("scorer"),
                "amount": result.get("amount"),
                "sparsity": pruned.get("sparsity"),
                "dense_accuracy": dense_acc,
                "pruned_accuracy": pruned_acc,
                "accuracy_drop": None if drop is None else round(drop, 10),
                "dense_parameters": dense.get("parameters"),
                "pruned_parameters": pruned.get("parameters"),
                "scoring_seconds": scoring.get("seconds"),
                "evaluations": scoring.get("evaluations"),
                "overrides": " ".join(result.get("job", {}).get("overrides", [])),
            }
        )
    return sorted(rows, key=lambda r: (r["label"], _number(r["amount"]), r["job"]))


def write_summary(
    results: Sequence[dict[str, Any]], directory: Path, name: str = "sweep"
) -> dict[str, Path]:
    """Writes the CSV, the markdown table and (with matplotlib) the plot into ``directory``.

    Args:
        results: the jobs' results, as :func:`collect_results` returns them.
        directory: where the files go.
        name: stem of the file names.

    Returns:
        The paths written, under the keys ``"csv"``, ``"markdown"``, ``"cells"`` and
        ``"plot"`` (the last only when matplotlib is installed).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results)
    paths = {
        "csv": directory / f"{name}_summary.csv",
        "markdown": directory / f"{name}_summary.md",
        "cells": directory / f"{name}_cells.md",
    }
    with paths["csv"].open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    paths["markdown"].write_text(markdown_table(rows) + "\n")
    paths["cells"].write_text(cells_table(cell_rows(rows)) + "\n")
    try:
        plot = directory / f"{name}_accuracy.png"
        plot_accuracy(rows, plot)
        paths["plot"] = plot
    except ImportError:
        log.warning("matplotlib is not installed: no sweep plot (pip install matplotlib)")
    return paths


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table, numbers rounded for reading."""
    header = (
        "| job | scorer | amount | sparsity | dense acc. | pruned acc. | drop "
        "| params dense | params pruned | scoring s | evaluations | overrides |"
    )
    lines = [
        header,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        cells = [
            str(r["job"]),
            str(r["label"]),
            _fmt(r["amount"], "{:g}"),
            _fmt(r["sparsity"], "{:.3f}"),
            _fmt(r["dense_accuracy"], "{:.4f}"),
            _fmt(r["pruned_accuracy"], "{:.4f}"),
            _fmt(r["accuracy_drop"], "{:+.4f}"),
            _fmt(r["dense_parameters"], "{:,}"),
            _fmt(r["pruned_parameters"], "{:,}"),
            _fmt(r["scoring_seconds"], "{:.1f}"),
            _fmt(r["evaluations"], "{:,}"),
            f"`{r['overrides']}`" if r["overrides"] else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label and amount, over its jobs (the seeds).

    Means, and the sample standard deviation of the pruned accuracy (0 for a single job).

    Example:
        >>> jobs = [{"label": "l1", "amount": 0.5, "sparsity": 0.5, "dense_accuracy": 0.99,
        ...          "pruned_accuracy": a, "evaluations": 0} for a in (0.9, 0.94)]
        >>> cell = cell_rows(jobs)[0]
        >>> cell["jobs"], round(cell["pruned_accuracy"], 4), round(cell["pruned_accuracy_sd"], 4)
        (2, 0.92, 0.0283)
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["label"], _number(r["amount"])].append(r)
    cells = []
    for (label, _), group in groups.items():
        pruned = [(0.0, r["pruned_accuracy"]) for r in group if r["pruned_accuracy"] is not None]
        _, mean, spread = _mean_and_spread(pruned) if pruned else (0.0, None, None)
        cells.append(
            {
                "label": label,
                "amount": group[0]["amount"],
                "jobs": len(group),
                "sparsity": _mean(r["sparsity"] for r in group),
                "dense_accuracy": _mean(r["dense_accuracy"] for r in group),
                "pruned_accuracy": mean,
                "pruned_accuracy_sd": spread,
                "evaluations": _mean(r["evaluations"] for r in group),
            }
        )
    return sorted(cells, key=lambda c: (c["label"], _number(c["amount"])))


def cells_table(cells: Sequence[dict[str, Any]]) -> str:
    """The cells as a markdown table: the pruned accuracy as mean ± standard deviation."""
    lines = [
        "| scorer | amount | jobs | sparsity | dense acc. | pruned acc. (mean ± sd) "
        "| evaluations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        accuracy = (
            ""
            if c["pruned_accuracy"] is None
            else f"{c['pruned_accuracy']:.4f} ± {c['pruned_accuracy_sd']:.4f}"
        )
        cells_text = [
            str(c["label"]),
            _fmt(c["amount"], "{:g}"),
            str(c["jobs"]),
            _fmt(c["sparsity"], "{:.3f}"),
            _fmt(c["dense_accuracy"], "{:.4f}"),
            accuracy,
            _fmt(c["evaluations"], "{:,.0f}"),
        ]
        lines.append("| " + " | ".join(cells_text) + " |")
    return "\n".join(lines)


def plot_accuracy(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Draws the pruned test accuracy against the sparsity, one line per label.

    Jobs of one label at the same amount (other seeds) are averaged, with their spread as
    error bars; the dense accuracy (the mean over jobs) is a dashed line. The overrides
    every job shares are printed under the title.

    Raises:
        ImportError: if matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state
    from matplotlib.ticker import PercentFormatter

    lines: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    dense = []
    for r in rows:
        if r["sparsity"] is None or r["pruned_accuracy"] is None:
            continue
        lines[r["label"]][_number(r["amount"])].append((r["sparsity"], r["pruned_accuracy"]))
        if r["dense_accuracy"] is not None:
            dense.append(r["dense_accuracy"])

    figure = Figure(figsize=(7, 4.6), layout="constrained")
    axes = figure.add_subplot()
    if dense:
        mean = sum(dense) / len(dense)
        axes.axhline(
            mean, color="0.3", linestyle="--", linewidth=1.2, label=f"dense model ({mean:.1%})"
        )
    markers, any_spread = "osD^vP*X", False
    for index, label in enumerate(sorted(lines)):
        points = [_mean_and_spread(lines[label][a]) for a in sorted(lines[label])]
        xs, ys, spreads = (list(v) for v in zip(*points, strict=True))
        any_spread = any_spread or any(spreads)
        axes.errorbar(
            xs,
            ys,
            yerr=spreads if any(spreads) else None,
            marker=markers[index % len(markers)],
            markersize=6,
            capsize=3,
            linewidth=1.8,
            label=label,
        )
    axes.xaxis.set_major_formatter(PercentFormatter(1.0))
    axes.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    axes.set_xlabel("channels removed (sparsity)")
    axes.set_ylabel("test accuracy after fine-tuning")
    axes.set_xlim(0, max((x for r in rows if (x := r["sparsity"]) is not None), default=1) + 0.05)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small", framealpha=0.9)
    notes = [_shared_overrides(rows), "bars: ±1 s.d. over repeats" if any_spread else ""]
    subtitle = "; ".join(note for note in notes if note)
    axes.set_title(
        "Test accuracy against sparsity, per scorer" + (f"\n{subtitle}" if subtitle else ""),
        fontsize="medium",
    )
    figure.savefig(path, dpi=150)


def _shared_overrides(rows: Sequence[dict[str, Any]]) -> str:
    """The overrides every job has, in the order of the first job."""
    if not rows:
        return ""
    sets = [set(r["overrides"].split()) for r in rows]
    common = set.intersection(*sets)
    return " ".join(o for o in rows[0]["overrides"].split() if o in common)


def _labels(results: Sequence[dict[str, Any]]) -> list[str]:
    """Each job's scorer, plus the overrides that vary across the sweep (but not amount)."""
    parsed = [_overrides(r) for r in results]
    keys = {k for overrides in parsed for k in overrides if k not in _NOT_IN_LABEL}
    varying = sorted(k for k in keys if len({o.get(k) for o in parsed}) > 1)
    labels = []
    for result, overrides in zip(results, parsed, strict=True):
        extra = [f"{k}={overrides[k]}" for k in varying if k in overrides]
        labels.append(" ".join([str(result.get("scorer", "?")), *extra]))
    return labels


def _overrides(result: dict[str, Any]) -> dict[str, str]:
    pairs = (o.split("=", 1) for o in result.get("job", {}).get("overrides", []) if "=" in o)
    return {key.lstrip("+~"): value for key, value in pairs}


def _job_number(result: dict[str, Any]) -> int:
    number = result.get("job", {}).get("num")
    return number if isinstance(number, int) else -1


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _mean_and_spread(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean = sum(ys) / len(ys)
    spread = (sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else 0.0
    return sum(xs) / len(xs), mean, spread


def _mean(values: Any) -> float | None:
    """The mean of the values that are numbers, or ``None`` if there is none."""
    numbers = [v for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers) if numbers else None


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else spec.format(value)
