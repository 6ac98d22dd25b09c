"""The printed summary of a job: its result (``result.json``) as Markdown tables.

:func:`format_summary` turns the result that :func:`lightning_shapley.app.pipeline.run` writes
into the lines printed at the end of a run: dense against pruned, the layers, scoring and
the exported artifacts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# The file of a job's result in its output folder, read back by the sweep summary.
RESULT_FILE = "result.json"


def format_summary(result: dict[str, Any]) -> str:
    """The summary table of a job's result, as printed at the end of a run.

    Example:
        >>> result = {
        ...     "scorer": "l1", "estimator": None, "amount": 0.5, "schedule": "OneShot(...)",
        ...     "dense": {"test_accuracy": 0.98, "parameters": 1000},
        ...     "pruned": {"test_accuracy": 0.95, "parameters": 400, "sparsity": 0.5},
        ...     "layers": [{"layer": "conv", "kind": "Conv2d", "channels": 8, "kept": 4,
        ...                 "parameters_dense": 72, "parameters_pruned": 36}],
        ...     "scoring": {"steps": 1, "seconds": 0.25, "evaluations": 0}, "export": [],
        ...     "job": {"dir": "out"}}
        >>> print(format_summary(result))  # doctest: +NORMALIZE_WHITESPACE
        l1 scorer, amount 0.5, OneShot(...)
        <BLANKLINE>
        |  | dense | pruned |
        | --- | ---: | ---: |
        | test accuracy | 0.9800 | 0.9500 |
        | parameters | 1,000 | 400 |
        | channel sparsity | 0.0% | 50.0% |
        <BLANKLINE>
        | layer | kind | channels | sparsity | parameters dense | parameters pruned |
        | --- | --- | ---: | ---: | ---: | ---: |
        | conv | Conv2d | 4 / 8 | 50.0% | 72 | 36 |
        <BLANKLINE>
        scoring: 1 step, 0.2 s, 0 coalition evaluations
        result: out/result.json
    """
    dense, pruned = result["dense"], result["pruned"]
    how = _describe_estimator(result.get("estimator"))
    rounds = result.get("rounds") or {}
    step = rounds.get("removal_step")
    survivors = "survivors near the cut" if rounds.get("rescore") == "near_cut" else "survivors"
    if isinstance(step, float):  # a fraction of each unit's channels (at least one)
        how += f", removed in rounds of {step:.0%} of each unit ({survivors} re-scored)"
    elif isinstance(step, int):
        how += f", removed in rounds of {step} per unit ({survivors} re-scored)"
    amount = "" if result.get("amount") is None else f", amount {result['amount']:g}"
    lines = [f"{result['scorer']} scorer{how}{amount}, {result['schedule']}", ""]
    lines += [
        "|  | dense | pruned |",
        "| --- | ---: | ---: |",
        f"| test accuracy | {_num(dense['test_accuracy'], '.4f')} | "
        f"{_num(pruned['test_accuracy'], '.4f')} |",
        f"| parameters | {dense['parameters']:,} | {pruned['parameters']:,} |",
        f"| channel sparsity | 0.0% | {pruned['sparsity']:.1%} |",
        "",
        "| layer | kind | channels | sparsity | parameters dense | parameters pruned |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["layers"]:
        sparsity = 1 - row["kept"] / row["channels"] if row["channels"] else 0.0
        lines.append(
            f"| {row['layer']} | {row['kind'] or ''} | {row['kept']} / {row['channels']} | "
            f"{sparsity:.1%} | {_num(row['parameters_dense'], ',')} | "
            f"{_num(row['parameters_pruned'], ',')} |"
        )
    scoring = result["scoring"]
    steps = f"{scoring['steps']} step{'s' if scoring['steps'] != 1 else ''}"
    lines += [
        "",
        f"scoring: {steps}, {scoring['seconds']:.1f} s, "
        f"{scoring['evaluations']:,} coalition evaluations",
    ]
    if result.get("export"):
        batch = result.get("export_batch_size")
        latency = f"latency ({batch} images)" if batch else "latency"
        lines += [
            "",
            f"| export | parameters | size | {latency} | test accuracy | file |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for a in result["export"]:
            lines.append(
                f"| {a['format']} | {_num(a['parameters'], ',')} | {_size(a['size_bytes'])} | "
                f"{_num(a['latency_ms'], '.3f')} ms | {_num(a['accuracy'], '.4f')} | "
                f"{_short(a['path'])} |"
            )
    lines.append(f"result: {_short(Path(result['job']['dir']) / RESULT_FILE)}")
    return "\n".join(lines)


def _describe_estimator(estimator: dict[str, Any] | None) -> str:
    """`` (band of depth 1, exact)`` or `` (shapley weighting, surrogate, 16 permutations)``."""
    if not estimator:
        return ""
    if estimator["weighting"] == "band":
        parts = [f"band of depth {estimator['depth']}"]
    else:
        parts = [f"{estimator['weighting']} weighting"]
    parts.append(estimator["method"])
    if estimator["method"] != "exact":
        parts.append(f"{estimator['num_permutations']} permutations")
    parts += [f"{name}={value}" for name, value in estimator.get("options", {}).items()]
    return f" ({', '.join(parts)})"


def _short(path: str | Path) -> str:
    """The path relative to the working folder when it lies inside it, else as it is."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    return f"{size_bytes / 1024:.1f} KiB" if size_bytes >= 1024 else f"{size_bytes} B"
