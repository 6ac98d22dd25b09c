"""The figures of a pruning run, drawn from plain numbers.

Each function takes numbers (scores, channel counts, a history's entries) and returns a
:class:`matplotlib.figure.Figure`; none needs a trainer, a logger or a model, so a figure
can be redrawn from a saved history. Figures are built on
:class:`~matplotlib.figure.Figure` directly, never through ``pyplot``, so no global figure
state is created or left behind. :func:`save_figure` writes one as a PNG file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from lightning_shapley.reporting.steps import step_rows

if TYPE_CHECKING:
    from lightning_shapley.reporting.curves import CoalitionCurve

# Resolution of the PNG files.
_DPI = 150
_KEPT, _PRUNED, _DENSE = "tab:blue", "tab:red", "0.75"
# The colours of before pruning, after pruning and after fine-tuning.
_SERIES = ("tab:blue", "tab:red", "tab:green")


def coalition_size_figure(
    curves: Mapping[str, CoalitionCurve], value_label: str = "coalition value"
) -> Figure:
    """The coalition value against the coalition size, one line per unit.

    The size is the percentage of the unit's channels in the coalition, so units of any
    width share the axis; the band is one standard deviation over the random coalitions.

    Args:
        curves: each unit's :class:`CoalitionCurve`, by unit name.
        value_label: the y axis label (what the value is, with its unit).

    Returns:
        The figure.
    """
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    samples = 0
    for index, (name, curve) in enumerate(curves.items()):
        color = f"C{index % 10}"
        x = [100 * k / curve.n_players for k in curve.sizes]
        mean, std = curve.mean.tolist(), curve.std.tolist()
        axes.plot(
            x, mean, marker="o", markersize=3, color=color, label=f"{name} ({curve.n_players} ch.)"
        )
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        axes.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        samples = max(samples, curve.values.shape[1])
    axes.set_xlabel("coalition size (% of the unit's channels kept)")
    axes.set_ylabel(value_label)
    axes.set_xlim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(title="unit", fontsize="small")
    axes.set_title(
        f"Coalition value against coalition size (dense model)\n"
        f"mean ± 1 s.d. over {samples} random coalitions per size",
        fontsize="medium",
    )
    return figure


def ranked_values_figure(
    values: Mapping[str, Sequence[float]],
    stderr: Mapping[str, Sequence[float]] | None = None,
    pruned: Mapping[str, Sequence[bool]] | None = None,
    *,
    value_label: str = "channel score",
    title: str | None = None,
) -> Figure:
    """Each unit's channel scores ranked highest first, with error bars; pruned ones in red.

    Channels whose score is NaN (pruned at an earlier step, or not scored) are left out; a
    channel flagged in ``pruned`` whose score is finite was pruned by this step and is
    drawn red.

    Args:
        values: the scores of each unit's channels, by unit name.
        stderr: their standard errors (the error bars are one standard error).
        pruned: the pruned flags of each unit's channels after the step.
        value_label: the y axis label.
        title: the figure's title.

    Returns:
        The figure, one panel per unit (three per row).
    """
    names = list(values)
    columns = min(3, max(len(names), 1))
    rows = max(math.ceil(len(names) / columns), 1)
    figure = Figure(figsize=(4.6 * columns, 3.3 * rows + 0.7), layout="constrained")
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, name in zip(panels, names, strict=False):
        scores = [float(v) for v in values[name]]
        errors = [float(e) for e in (stderr or {}).get(name, [0.0] * len(scores))]
        flags = [bool(p) for p in (pruned or {}).get(name, [False] * len(scores))]
        live = [c for c, v in enumerate(scores) if math.isfinite(v)]
        live.sort(key=lambda c: -scores[c])
        now = sum(flags[c] for c in live)
        axes.bar(
            range(1, len(live) + 1),
            [scores[c] for c in live],
            yerr=[errors[c] if math.isfinite(errors[c]) else 0.0 for c in live],
            color=[_PRUNED if flags[c] else _KEPT for c in live],
            error_kw={"elinewidth": 0.8, "capsize": 1.5 if len(live) <= 40 else 0, "ecolor": "0.2"},
            width=0.8,
        )
        # A marker too, since a pruned channel's bar is often of zero height (a dead channel).
        marked = [rank for rank, c in enumerate(live, start=1) if flags[c]]
        axes.scatter(
            marked,
            [scores[live[r - 1]] for r in marked],
            marker="v",
            color=_PRUNED,
            s=14,
            zorder=3,
            clip_on=False,
        )
        axes.axhline(0, color="0.3", linewidth=0.6)
        if len(live) <= 24:
            # Few channels: the ticks name them, so a channel can be found in the weights.
            axes.set_xticks(range(1, len(live) + 1), [str(c) for c in live], fontsize="x-small")
            for tick, c in zip(axes.get_xticklabels(), live, strict=True):
                tick.set_color(_PRUNED if flags[c] else "black")
            axes.set_xlabel("channel, ranked by score")
        else:
            axes.set_xlabel("rank of the channel's score")
        axes.set_ylabel(value_label, fontsize="small")
        before = sum(flags[c] for c, v in enumerate(scores) if not math.isfinite(v))
        summary = f"{now} of {len(live)} pruned now" if live else "not scored at this step"
        axes.set_title(
            f"{name}: {summary}" + (f", {before} before" if before else ""), fontsize="small"
        )
        axes.grid(axis="y", alpha=0.3)
    for axes in panels[len(names) :]:
        axes.set_visible(False)
    marker = Line2D([], [], marker="v", color=_PRUNED, linestyle="none")
    figure.legend(
        [Patch(color=_KEPT), (Patch(color=_PRUNED), marker)],
        ["kept", "pruned at this step (bar, marker, red label)"],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
    )
    figure.suptitle(title or "Ranked channel scores (error bars: ±1 standard error)")
    return figure


def architecture_figure(dense: Mapping[str, int], kept: Mapping[str, int]) -> Figure:
    """Channels per unit: the dense model's and those kept after pruning, side by side.

    Args:
        dense: each unit's channels in the dense model, by unit name.
        kept: each unit's channels kept.

    Returns:
        The figure.
    """
    names = list(dense)
    figure = Figure(figsize=(max(6.0, 1.1 * len(names) + 2.5), 4.5), layout="constrained")
    axes = figure.add_subplot()
    x = [float(i) for i in range(len(names))]
    width = 0.38
    axes.bar(
        [i - width / 2 for i in x], [dense[n] for n in names], width, color=_DENSE, label="dense"
    )
    bars = axes.bar(
        [i + width / 2 for i in x], [kept[n] for n in names], width, color=_KEPT, label="kept"
    )
    labels = [f"{kept[n]}\n{100 * kept[n] / dense[n]:.0f}%" if dense[n] else "" for n in names]
    axes.bar_label(bars, labels, fontsize="x-small", padding=2)
    rotate = len(names) > 6 or max((len(n) for n in names), default=0) > 14
    axes.set_xticks(x, names, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    axes.set_xlabel("prunable unit")
    axes.set_ylabel("output channels")
    axes.set_ylim(0, max(dense.values(), default=1) * 1.2)
    total_dense, total_kept = sum(dense.values()), sum(kept[n] for n in names)
    axes.set_title(
        f"Architecture: channels per unit, dense vs pruned "
        f"({total_kept} of {total_dense} kept, {100 * total_kept / max(total_dense, 1):.0f}%)",
        fontsize="medium",
    )
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return figure


def accuracy_steps_figure(
    history: Sequence[Mapping[str, Any]], final_accuracy: float | None = None
) -> Figure:
    """Accuracy before pruning, after pruning and after fine-tuning, per step.

    Args:
        history: the callback's history; a rolled-back entry is shown as its own group,
            labelled so (its "before" is the accuracy that made the schedule roll back,
            its "after" the accuracy once the step was undone).
        final_accuracy: the accuracy at the end of fit, the last entry's "after
            fine-tuning"; ``None`` when no epoch followed it (no bar is drawn).

    Returns:
        The figure (accuracy in percent, on the scoring batches).
    """
    rows = step_rows(history, {"accuracy": final_accuracy})
    figure = Figure(figsize=(max(6.5, 1.6 * len(rows) + 2.5), 4.6), layout="constrained")
    axes = figure.add_subplot()
    width = 0.26
    series = (
        ("accuracy_before", "before pruning"),
        ("accuracy_after", "after pruning"),
        ("accuracy_finetuned", "after fine-tuning"),
    )
    for offset, ((key, label), color) in enumerate(zip(series, _SERIES, strict=True)):
        x = [i + (offset - 1) * width for i in range(len(rows)) if rows[i][key] is not None]
        heights = [100 * row[key] for row in rows if row[key] is not None]
        bars = axes.bar(x, heights, width, color=color, label=label)
        axes.bar_label(bars, [f"{h:.1f}" for h in heights], fontsize="x-small", padding=1)
    ticks = [
        f"step {row['step']}\nepoch {row['epoch']}\n{100 * row['sparsity']:.0f}% sparse"
        + ("\n(rolled back)" if row["rolled_back"] else "")
        for row in rows
    ]
    axes.set_xticks(range(len(rows)), ticks, fontsize="small")
    axes.set_ylabel("accuracy on the scoring batches (%)")
    axes.set_ylim(0, 112)
    axes.legend(loc="upper center", ncols=3, fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    title = "Accuracy per pruning step"
    if any(row["rolled_back"] for row in rows):
        title += (
            "\nrolled back: 'before' is the accuracy that made the schedule undo the last "
            "step, 'after' the accuracy once undone"
        )
    axes.set_title(title, fontsize="medium")
    return figure


def model_size_figure(
    parameters: Mapping[str, int], sizes: Mapping[str, int] | None = None
) -> Figure:
    """Model size: parameters of the dense model and after pruning; sizes in bytes.

    Args:
        parameters: parameter counts by label, the dense model first (the reference of
            the percentages), e.g. ``{"dense": ..., "step 1": ...}``; pruned counts are
            the effective ones (the parameters not held at zero by a mask).
        sizes: sizes in bytes by label, the first the reference, e.g. ``{"dense": ...,
            "compact": ..., "compact+int8": ...}``; a second panel when given.

    Returns:
        The figure.
    """
    panels = [("parameters", parameters, "parameters")]
    if sizes:
        panels.append(("bytes", sizes, "size"))
    widths = [max(3.2, 0.9 * len(data) + 1.5) for _, data, _ in panels]
    figure = Figure(figsize=(sum(widths) + 0.5, 4.6), layout="constrained")
    grid = figure.subplots(1, len(panels), squeeze=False, width_ratios=widths).ravel()
    for axes, (kind, data, what) in zip(grid, panels, strict=True):
        labels, counts = list(data), list(data.values())
        scale, unit = _scale(max(counts, default=1), kind)
        bars = axes.bar(
            range(len(counts)),
            [c / scale for c in counts],
            color=[_DENSE, *[_KEPT] * (len(counts) - 1)],
            width=0.6,
        )
        reference = counts[0] if counts and counts[0] else 1
        notes = [f"{c / scale:.3g}\n{100 * c / reference:.0f}%" for c in counts]
        axes.bar_label(bars, notes, fontsize="x-small", padding=2)
        longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
        rotate = len(labels) > 6 or longest > 14
        axes.set_xticks(
            range(len(labels)),
            labels,
            rotation=30 if rotate else 0,
            ha="right" if rotate else "center",
            fontsize="small",
        )
        axes.set_ylabel(f"{what} ({unit})")
        axes.set_ylim(0, max(counts, default=1) / scale * 1.25)
        axes.grid(axis="y", alpha=0.3)
        axes.set_title(
            "parameters (effective, masked ones not counted)"
            if kind == "parameters"
            else "size in bytes",
            fontsize="small",
        )
    figure.suptitle("Model size before and after pruning" + (" and compression" if sizes else ""))
    return figure


def _scale(largest: float, kind: str) -> tuple[float, str]:
    """A divisor and its unit name for axis values of this magnitude."""
    if kind == "bytes":
        steps = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "bytes"))
    else:
        steps = ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands"), (1, "count"))
    return next((s, name) for s, name in steps if largest >= s or s == 1)


def save_figure(figure: Figure, path: Path) -> Path:
    """Writes ``figure`` as a PNG file (creating its folder) and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    return path
