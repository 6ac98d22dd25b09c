"""Figures and W&B charts of a pruning run: what a reader of a Shapley-pruning paper expects.

:class:`PruningReporter` follows a :class:`~lightning_shapley.callback.ShapleyPruning` run
and draws five figures, saved as PNG files and sent to every logger that takes images
(W&B and TensorBoard: as images; other loggers, such as CSV: the files only):

* ``coalition_values.png``: the coalition value against the coalition size, per unit, on
  the dense model (random coalitions of each size: mean and spread);
* ``ranked_values.png``: each unit's channel scores of the last step, ranked, with their
  standard errors as error bars and the channels that step pruned in red;
* ``architecture.png``: channels per unit, dense and kept;
* ``accuracy_steps.png``: the scoring accuracy before pruning, after pruning and after
  fine-tuning, per step;
* ``model_size.png``: the parameters of the dense model and after each step, and the
  sizes in bytes given to :meth:`PruningReporter.add_sizes` (compacted, quantized...).

With a ``WandbLogger`` each step is also logged for W&B's charts: the pruning curves
(``pruning/curve/*``: accuracy, loss, value and parameters, against the sparsity), per
unit a ranked bar chart of the channel scores (``pruning/channel_values/<unit>/step_<k>``)
and the step's ranked figure with error bars (``pruning/ranked_values``); at the end of
fit, a table of all steps (``pruning/steps``), line charts against the sparsity and
against the step (``pruning/charts/*``) and the figures (``pruning/figures/*``).

Figures are built on :class:`matplotlib.figure.Figure` directly, never through
``pyplot``, so no global figure state is created or left behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import Tensor, nn

from lightning_shapley.shapley.game import Batch, ChannelGame, scoring_mode
from lightning_shapley.shapley.values import ValueSetting, accuracy, negative_loss

#: The figures drawn at the end of fit, by file stem.
FIGURES = ("coalition_values", "ranked_values", "architecture", "accuracy_steps", "model_size")
#: Most coalition sizes on a coalition curve's grid (all sizes for small units).
MAX_SIZES = 17
_DPI = 150
_KEPT, _PRUNED, _DENSE = "tab:blue", "tab:red", "0.75"
_SERIES = ("tab:blue", "tab:red", "tab:green")
# The pruning curves logged per step for W&B, plotted against ``pruning/curve/sparsity``.
_CURVE = "pruning/curve/"
_CURVES = (
    "target_sparsity",
    "parameters",
    "parameters_fraction",
    "accuracy_before",
    "accuracy_after",
    "loss_before",
    "loss_after",
    "value_before",
    "value_after",
    "rolled_back",
)


# --------------------------------------------------------------------------- coalitions


@dataclass(frozen=True)
class CoalitionCurve:
    """Values of random coalitions of a layer's channels, by coalition size.

    Attributes:
        n_players: the channels in play (all of the layer's, on a dense model).
        sizes: the coalition sizes, ascending, from 0 to ``n_players``.
        values: float64 ``[len(sizes), samples]``; sample ``j`` of every size comes from
            one random ordering of the channels (its first ``k``), so each column is the
            path of one permutation from the empty coalition to the full one.
    """

    n_players: int
    sizes: tuple[int, ...]
    values: Tensor

    @property
    def mean(self) -> Tensor:
        """The mean value at each size."""
        return self.values.mean(1)

    @property
    def std(self) -> Tensor:
        """The standard deviation over the samples at each size (0 with one sample)."""
        return self.values.std(1, correction=0)


def coalition_values_by_size(
    model: nn.Module,
    layer: str | Sequence[str],
    batches: Sequence[Batch],
    value: ValueSetting = "loss",
    sizes: Sequence[int] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> CoalitionCurve:
    """The values of random coalitions of a layer's channels, for a grid of sizes.

    Sample ``j`` draws one random ordering of the channels and takes its first ``k``
    channels for every size ``k``, so the coalitions of one sample are nested. All are
    evaluated in one call of a :class:`~lightning_shapley.shapley.game.ChannelGame`.

    Args:
        model: the model; it is left as found.
        layer: the module whose output channels are the players, or the names of all the
            modules producing and normalizing them (a unit's producers and BatchNorms).
        batches: the scoring batches, ``(inputs, targets)`` pairs.
        value: the coalition value, as
            :class:`~lightning_shapley.shapley.game.ChannelGame` takes it.
        sizes: coalition sizes to evaluate; ``None`` for an even grid of at most
            :data:`MAX_SIZES` sizes from 0 to the number of players, both included.
        samples: random coalitions per size.
        seed: seed of the random orderings.

    Returns:
        The values, as a :class:`CoalitionCurve`.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
        >>> curve = coalition_values_by_size(net, "0", data, samples=4)
        >>> curve.sizes, tuple(curve.values.shape)
        ((0, 1, 2, 3, 4, 5, 6), (7, 4))
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r} is not allowed; it must be a positive integer")
    game = ChannelGame(model, layer, batches, value=value)
    n = game.n_players
    if sizes is None:
        grid = torch.linspace(0, n, min(n + 1, MAX_SIZES), dtype=torch.float64)
        sizes = sorted({int(k) for k in grid.round().tolist()})
    else:
        sizes = sorted({int(k) for k in sizes})
        if sizes[0] < 0 or sizes[-1] > n:
            raise ValueError(f"sizes={sizes} must lie between 0 and the {n} players")
    generator = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=generator) for _ in range(samples)])
    # rank[j, c]: where channel c comes in ordering j; it is in the size-k coalition if < k.
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(samples, n))
    size_column = torch.tensor(sizes).view(-1, 1, 1)
    coalitions = rank.unsqueeze(0) < size_column  # [len(sizes), samples, n]
    values = game(coalitions.reshape(-1, n)).reshape(len(sizes), samples)
    return CoalitionCurve(n, tuple(sizes), values)


# --------------------------------------------------------------------------- figures


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
    x = torch.arange(len(names), dtype=torch.float64).tolist()
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


def step_rows(
    history: Sequence[Mapping[str, Any]],
    final: Mapping[str, float] | None = None,
    loss_from_value: bool = False,
    losses_after: Sequence[float | None] = (),
) -> list[dict[str, Any]]:
    """One row per history entry, with what came after it: fine-tuned accuracy and loss.

    The accuracy (and loss) after fine-tuning of a step is the one before the next entry
    (the next step, or the judgement that rolled it back); for the last entry, ``final``'s
    (``None`` when it is not given: no epoch of fine-tuning followed the last entry).

    Args:
        history: the callback's history.
        final: ``{"accuracy": ..., "loss": ..., "value": ...}`` measured at the end of fit.
        loss_from_value: whether the value is the negative cross-entropy, so that the
            loss before and after each step is minus the value.
        losses_after: otherwise, the cross-entropy measured after each entry, if known
            (the loss before a step is then not known).

    Returns:
        Rows with the keys of :data:`STEP_COLUMNS`.
    """
    final = final or {}
    rows = []
    for index, entry in enumerate(history):
        after = history[index + 1] if index + 1 < len(history) else None
        tuned = after["accuracy_before"] if after is not None else final.get("accuracy")
        # The loss before a step is known only as minus the value; at the end, as measured.
        loss = {"before": None, "after": None, "finetuned": None if after else final.get("loss")}
        if loss_from_value:
            loss["before"], loss["after"] = -entry["value_before"], -entry["value_after"]
            if after is not None:
                loss["finetuned"] = -after["value_before"]
        elif index < len(losses_after):
            loss["after"] = losses_after[index]
        rows.append(
            {
                "step": index + 1,
                "epoch": entry["epoch"],
                "target_sparsity": entry["target_sparsity"],
                "sparsity": entry["sparsity"],
                "parameters": entry["parameters"],
                "accuracy_before": entry["accuracy_before"],
                "accuracy_after": entry["accuracy_after"],
                "accuracy_finetuned": tuned,
                "loss_before": loss["before"],
                "loss_after": loss["after"],
                "loss_finetuned": loss["finetuned"],
                "value_before": entry["value_before"],
                "value_after": entry["value_after"],
                "scoring_seconds": entry.get("scoring_seconds"),
                "evaluations": entry.get("evaluations"),
                "rolled_back": bool(entry.get("rolled_back", False)),
            }
        )
    return rows


#: The columns of :func:`step_rows` and of the W&B table ``pruning/steps``.
STEP_COLUMNS = (
    "step",
    "epoch",
    "target_sparsity",
    "sparsity",
    "parameters",
    "accuracy_before",
    "accuracy_after",
    "accuracy_finetuned",
    "loss_before",
    "loss_after",
    "loss_finetuned",
    "value_before",
    "value_after",
    "scoring_seconds",
    "evaluations",
    "rolled_back",
)


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


# --------------------------------------------------------------------------- the reporter


class PruningReporter:
    """Draws and logs the figures and W&B charts of a ``ShapleyPruning`` run.

    :class:`~lightning_shapley.callback.ShapleyPruning` calls its hooks: before its first
    step, after every entry it adds to its history, and when fit ends. Only the process
    of global rank zero draws, writes and logs.

    Args:
        directory: where the PNG files go; ``None`` for ``pruning_figures`` in the
            trainer's log directory (its default root directory without one).
        figures: whether to draw the figures; without, only the W&B metrics, tables and
            bar charts are logged (no matplotlib rendering, no coalition curves).
    """

    #: Random coalitions per size for the coalition curves.
    samples = 8

    def __init__(self, directory: str | Path | None = None, figures: bool = True) -> None:
        self.directory = None if directory is None else Path(directory)
        self.figures = figures
        #: The coalition curves of the dense model, by unit name.
        self.curves: dict[str, CoalitionCurve] = {}
        #: Sizes in bytes given to :meth:`add_sizes`.
        self.sizes: dict[str, int] = {}
        #: What was measured on the scoring batches at the end of fit.
        self.final: dict[str, float] | None = None
        #: The PNG files written, by figure name.
        self.paths: dict[str, Path] = {}
        self._trainer: Any = None
        self._folder = self.directory
        self._pruning: Any = None
        self._dense_parameters: int | None = None
        # The cross-entropy after each step, when the value is not the loss.
        self._losses_after: list[float | None] = []
        self._defined = False
        self._tuned = False

    # ------------------------------------------------------------------ hooks

    def before_first_step(self, trainer: Any, pl_module: nn.Module, pruning: Any) -> None:
        """Measures the coalition curves of every unit on the dense model."""
        if not trainer.is_global_zero:
            return
        self._dense_parameters = _parameters(pl_module)
        if not self.figures:
            return
        batches = _on_device(pruning.scoring_batches, pl_module)
        setting = _as_setting(pruning.value_function)
        self.curves = {
            unit.name: coalition_values_by_size(
                pl_module,
                (*unit.producers, *unit.batchnorms),
                batches,
                value=setting,
                samples=self.samples,
            )
            for unit in pruning.units
        }

    def after_step(
        self, trainer: Any, pl_module: nn.Module, pruning: Any, entry: Mapping[str, Any]
    ) -> None:
        """Logs the step's curve points and, per unit, its ranked channel scores."""
        if not trainer.is_global_zero:
            return
        if self._dense_parameters is None:
            self._dense_parameters = _parameters(pl_module)
        step = len(pruning.history)
        if not _loss_from_value(pruning):
            # The value is not the loss: the loss after the step is measured here (the one
            # before it, after an epoch of fine-tuning, was never measured).
            del self._losses_after[step - 1 :]
            self._losses_after += [None] * (step - 1 - len(self._losses_after))
            measured = _measure(pl_module, pruning.scoring_batches, pruning.value_function)
            self._losses_after.append(measured["loss"])
        label = _score_label(pruning)
        image = None
        if self.figures and "values" in entry and _image_loggers(trainer):
            # One figure per step, a panel per unit: rendering is what costs here.
            figure = ranked_values_figure(
                entry["values"],
                entry["stderr"],
                entry["masks"],
                value_label=label,
                title=f"Step {step} (epoch {entry['epoch']}, {100 * entry['sparsity']:.0f}% "
                "sparse): ranked channel scores, error bars ±1 s.e.",
            )
            image = _rgb(figure)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_step_to_wandb(logger, trainer, pruning, entry, step, image, label)
            elif isinstance(logger, TensorBoardLogger) and image is not None:
                tag = "pruning/ranked_values"
                logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")

    def on_fit_end(self, trainer: Any, pl_module: nn.Module, pruning: Any) -> None:
        """Measures the fine-tuned model; draws, saves and logs the figures and the table."""
        # trainer.log_dir broadcasts under DDP: every process must ask, not only rank zero.
        directory = self.directory
        if directory is None:
            directory = Path(trainer.log_dir or trainer.default_root_dir) / "pruning_figures"
        if not trainer.is_global_zero or not pruning.history:
            return
        self._folder = directory
        self._trainer, self._pruning = trainer, pruning
        if self._dense_parameters is None:
            self._dense_parameters = _parameters(pl_module)
        self.final = _measure(pl_module, pruning.scoring_batches, pruning.value_function)
        # The last entry was fine-tuned only if an epoch ended after its own.
        self._tuned = pruning.history[-1]["epoch"] + 1 < trainer.current_epoch
        final = self.final if self._tuned else None
        rows = step_rows(pruning.history, final, _loss_from_value(pruning), self._losses_after)
        figures = self._draw(pruning) if self.figures else {}
        self._send(trainer, figures)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                _log_steps_to_wandb(logger, rows, self._dense_parameters, trainer.global_step)
        self._log_sizes(trainer)

    def add_sizes(self, sizes: Mapping[str, int]) -> None:
        """Adds model sizes in bytes to the model size figure, e.g. after compression.

        Called after fit ended, it redraws ``model_size.png`` and sends it to the loggers
        again (W&B also gets the sizes as summary numbers and a table).

        Args:
            sizes: sizes in bytes by label, the dense model first, e.g. ``{"dense": ...,
                "compact": ..., "compact+int8": ...}``.
        """
        self.sizes.update({name: int(size) for name, size in sizes.items()})
        trainer = self._trainer
        if trainer is None:
            return  # fit has not ended: on_fit_end draws and logs them
        if self.figures:
            self._send(trainer, {"model_size": self._model_size(self._pruning)})
        self._log_sizes(trainer)

    def _log_sizes(self, trainer: Any) -> None:
        """The sizes in bytes to W&B: summary numbers and a table."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.sizes:
                run = logger.experiment
                for name, size in self.sizes.items():
                    run.summary[f"pruning/bytes/{name}"] = size
                table = _wandb().Table(
                    columns=["model", "bytes"], data=[[n, s] for n, s in self.sizes.items()]
                )
                run.log({"pruning/sizes": table, "trainer/global_step": trainer.global_step})

    # ------------------------------------------------------------------ internals

    def _draw(self, pruning: Any) -> dict[str, Figure]:
        """The figures of the whole run, by name (those that have data)."""
        history = pruning.history
        scored = [entry for entry in history if "values" in entry]
        figures = {}
        if self.curves:
            label = _value_label(pruning.value_function)
            figures["coalition_values"] = coalition_size_figure(self.curves, label)
        if scored:
            last = scored[-1]
            step = history.index(last) + 1
            figures["ranked_values"] = ranked_values_figure(
                last["values"],
                last["stderr"],
                last["masks"],
                value_label=_score_label(pruning),
                title=f"Ranked channel scores of the last step (step {step}, epoch "
                f"{last['epoch']}); error bars ±1 s.e., red: pruned at that step",
            )
        masks = history[-1]["masks"]
        figures["architecture"] = architecture_figure(
            {unit.name: unit.n_channels for unit in pruning.units},
            {unit.name: unit.n_channels - sum(masks[unit.name]) for unit in pruning.units},
        )
        final = self.final if self._tuned else None
        figures["accuracy_steps"] = accuracy_steps_figure(history, (final or {}).get("accuracy"))
        figures["model_size"] = self._model_size(pruning)
        return figures

    def _model_size(self, pruning: Any) -> Figure:
        parameters = {"dense": self._dense_parameters or 0}
        for index, entry in enumerate(pruning.history):
            state = "rolled back" if entry.get("rolled_back") else f"{entry['sparsity']:.0%} sparse"
            parameters[f"step {index + 1}\n{state}"] = entry["parameters"]
        return model_size_figure(parameters, self.sizes or None)

    def _send(self, trainer: Any, figures: Mapping[str, Figure]) -> None:
        """Saves the figures as PNG files and hands them to every logger taking images."""
        for name, figure in figures.items():
            self.paths[name] = save_figure(figure, self._folder / f"{name}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and figures:
                # The files, so that W&B shows exactly what was saved (and at its resolution).
                images = {
                    f"pruning/figures/{n}": _wandb().Image(str(self.paths[n])) for n in figures
                }
                logger.experiment.log({**images, "trainer/global_step": trainer.global_step})
            elif isinstance(logger, TensorBoardLogger):
                for name in figures:
                    # Read back from the file: each figure is rendered once only.
                    image = _read_png(self.paths[name])
                    tag = f"pruning/figures/{name}"
                    logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
                logger.experiment.flush()

    def _log_step_to_wandb(
        self,
        logger: WandbLogger,
        trainer: Any,
        pruning: Any,
        entry: Mapping[str, Any],
        step: int,
        image: np.ndarray | None,
        label: str,
    ) -> None:
        wandb = _wandb()
        run = logger.experiment
        if not self._defined:
            # Exact names take precedence over Lightning's "*" -> trainer/global_step, so
            # W&B draws these curves against the sparsity by default; the sparsity and the
            # step number are left as x axes a panel can be switched to.
            run.define_metric(f"{_CURVE}sparsity")
            run.define_metric(f"{_CURVE}step")
            for name in _CURVES:
                run.define_metric(f"{_CURVE}{name}", step_metric=f"{_CURVE}sparsity")
            self._defined = True
        losses = self._losses_after[step - 1 : step]
        (row,) = step_rows([entry], None, _loss_from_value(pruning), losses)
        point = {
            **{k: row[k] for k in _CURVES if k in row},
            "step": step,
            "sparsity": entry["sparsity"],
            "parameters_fraction": entry["parameters"] / self._dense_parameters,
        }
        record: dict[str, Any] = {
            f"{_CURVE}{k}": float(v) for k, v in point.items() if v is not None
        }
        for unit in pruning.units if "values" in entry else ():
            rows = _ranked_rows(
                entry["values"][unit.name], entry["stderr"][unit.name], entry["masks"][unit.name]
            )
            if not rows:
                continue  # the unit was not scored at this step
            table = wandb.Table(columns=["rank", "channel", "value", "stderr", "pruned"], data=rows)
            record[f"pruning/channel_values/{unit.name}/step_{step}"] = wandb.plot.bar(
                table,
                "channel",
                "value",
                title=f"{unit.name}, step {step}: {label} by rank ('pruned' marks this step's)",
            )
        if image is not None:
            caption = f"step {step}, epoch {entry['epoch']}"
            record["pruning/ranked_values"] = wandb.Image(image, caption=caption)
        run.log({**record, "trainer/global_step": trainer.global_step})


def _ranked_rows(
    values: Sequence[float], stderr: Sequence[float], pruned: Sequence[bool]
) -> list[list[Any]]:
    """Rows of the ranked bar chart: channels in play, highest score first.

    The label carries the mark, since W&B's bar chart colours every bar alike.
    """
    live = sorted((c for c, v in enumerate(values) if math.isfinite(v)), key=lambda c: -values[c])
    return [
        [rank, f"{c} (pruned)" if pruned[c] else str(c), values[c], stderr[c], bool(pruned[c])]
        for rank, c in enumerate(live, start=1)
    ]


def _log_steps_to_wandb(
    logger: WandbLogger, rows: list[dict[str, Any]], dense: int, global_step: int
) -> None:
    """The table of all steps and line charts against the sparsity and against the step."""
    wandb = _wandb()
    run = logger.experiment
    table = wandb.Table(
        columns=list(STEP_COLUMNS), data=[[r[c] for c in STEP_COLUMNS] for r in rows]
    )
    charts: dict[str, Any] = {"pruning/steps": table}
    steps = [r["step"] for r in rows]
    after = [r["sparsity"] for r in rows]
    before = [0.0, *after[:-1]]  # a step starts from where the one before left the model
    for quantity, unit in (("accuracy", "fraction"), ("loss", "cross-entropy, nats")):
        for axis, xname in (("sparsity", "sparsity"), ("step", "step")):
            series = []  # (name, xs, ys), each over the rows where it was measured
            for when, name, at in (
                ("before", "before pruning", before),
                ("after", "after pruning", after),
                ("finetuned", "after fine-tuning", after),
            ):
                xs = at if axis == "sparsity" else steps
                points = [(x, r[f"{quantity}_{when}"]) for x, r in zip(xs, rows, strict=True)]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    series.append((name, [x for x, _ in points], [y for _, y in points]))
            if series:
                charts[f"pruning/charts/{quantity}_vs_{axis}"] = wandb.plot.line_series(
                    xs=[xs for _, xs, _ in series],
                    ys=[ys for _, _, ys in series],
                    keys=[name for name, _, _ in series],
                    title=f"{quantity} ({unit}) against {xname}",
                    xname=xname,
                )
    parameters = [r["parameters"] for r in rows]
    for axis, xs, xname in (("sparsity", [0.0, *after], "sparsity"), ("step", [0, *steps], "step")):
        charts[f"pruning/charts/parameters_vs_{axis}"] = wandb.plot.line_series(
            xs=xs,
            ys=[[dense, *parameters]],
            keys=["parameters remaining"],
            title=f"parameters remaining (effective) against {xname}",
            xname=xname,
        )
    run.log({**charts, "trainer/global_step": global_step})


# --------------------------------------------------------------------------- helpers


def _image_loggers(trainer: Any) -> list[Any]:
    """The trainer's loggers that take images."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]


def _rgb(figure: Figure) -> np.ndarray:
    """The figure rendered once, as an ``[H, W, 3]`` uint8 array every image logger takes."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _read_png(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _wandb() -> Any:
    import wandb  # only with a WandbLogger, which needs it anyway

    return wandb


def _on_device(batches: Sequence[Batch], module: nn.Module) -> list[Batch]:
    device = next(module.parameters()).device
    return [(x.to(device), y.to(device)) for x, y in batches]


def _parameters(module: nn.Module) -> int:
    """All parameters; a masked ``weight_orig`` counts whole, as in the dense model."""
    return sum(p.numel() for p in module.parameters())


def _loss_from_value(pruning: Any) -> bool:
    """Whether the callback's value is the negative cross-entropy (so loss = -value)."""
    return getattr(pruning, "value_function", None) is negative_loss


def _as_setting(value_function: Callable[[Tensor, Tensor], Tensor]) -> ValueSetting:
    """A setting ``ChannelGame`` takes for a resolved value function ``fn(logits[k], targets)``."""
    known = {negative_loss: "loss", accuracy: "accuracy"}
    if value_function in known:
        return known[value_function]
    # The game would apply a user function to one coalition's [N, C] logits at a time.
    return lambda logits, targets: value_function(logits.unsqueeze(0), targets)[0]


def _value_label(value_function: Any) -> str:
    if value_function is negative_loss:
        return "coalition value: \N{MINUS SIGN}cross-entropy (nats)"
    if value_function is accuracy:
        return "coalition value: accuracy (fraction)"
    return "coalition value"


def _score_label(pruning: Any) -> str:
    """The y label of the channel scores: the scorer, and its unit for Shapley values."""
    name = getattr(getattr(pruning, "scorer", None), "name", "score")
    if name != "shapley":
        return {"l1": "L1 norm of the filter", "bn_gamma": r"BatchNorm $|\gamma|$"}.get(
            name, f"{name} score"
        )
    value_function = getattr(pruning, "value_function", None)
    if value_function is negative_loss:
        return "Shapley value (nats of \N{MINUS SIGN}cross-entropy)"
    if value_function is accuracy:
        return "Shapley value (accuracy)"
    return "Shapley value"


def _measure(
    module: nn.Module, batches: Sequence[Batch], value_function: Callable[[Tensor, Tensor], Tensor]
) -> dict[str, float]:
    """Accuracy, cross-entropy and value of the model on the scoring batches."""
    batches = _on_device(batches, module)
    with scoring_mode(module):
        logits = torch.cat([module(x) for x, _ in batches]).unsqueeze(0)
    targets = torch.cat([y for _, y in batches])
    return {
        "accuracy": float(accuracy(logits, targets)[0]),
        "loss": -float(negative_loss(logits, targets)[0]),
        "value": float(value_function(logits, targets)[0]),
    }
