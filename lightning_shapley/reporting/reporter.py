"""The reporter of a pruning run: it follows the callback and hands figures to the loggers.

:class:`PruningReporter` measures the coalition curves before the first step, logs each
step as it comes, and at the end of fit draws the figures of
:mod:`~lightning_shapley.reporting.figures`, writes them as PNG files and sends them to
every logger that takes images; with a ``WandbLogger`` it also logs the curves, tables
and charts W&B draws itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from lightning_shapley.pruning.batches import to_device
from lightning_shapley.reporting.curves import CoalitionCurve, coalition_values_by_size
from lightning_shapley.reporting.figures import (
    accuracy_steps_figure,
    architecture_figure,
    coalition_size_figure,
    model_size_figure,
    ranked_values_figure,
    save_figure,
)
from lightning_shapley.reporting.steps import STEP_COLUMNS, step_rows
from lightning_shapley.shapley.values import Evaluation, ValueFunction, evaluate

#: The figures drawn at the end of fit, by file stem.
FIGURES = ("coalition_values", "ranked_values", "architecture", "accuracy_steps", "model_size")
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
# What a channel score is, by scorer, where it is not a Shapley value.
_SCORES = {"l1": "L1 norm of the filter", "bn_gamma": r"BatchNorm $|\gamma|$"}
# The unit of a Shapley value, by value function: that of a difference of two values.
_SHAPLEY_UNITS = {"loss": "nats of \N{MINUS SIGN}cross-entropy", "accuracy": "accuracy"}


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
        #: The model on the scoring batches at the end of fit: "value", "accuracy", "loss".
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
        # The callback keeps its copies of the batches where they came from.
        batches = to_device(pruning.scoring_batches, pl_module.device)
        self.curves = {
            unit.name: coalition_values_by_size(
                pl_module,
                (*unit.producers, *unit.batchnorms),
                batches,
                value=pruning.value_function,
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
        if not _loss_is_value(pruning.value_function):
            # The value is not the loss: the loss after the step is measured here (the one
            # before it, after an epoch of fine-tuning, was never measured).
            del self._losses_after[step - 1 :]
            self._losses_after += [None] * (step - 1 - len(self._losses_after))
            self._losses_after.append(_evaluate(pl_module, pruning).loss)
        label = _score_label(pruning.scorer.name, pruning.value_function)
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
        self.final = dataclasses.asdict(_evaluate(pl_module, pruning))
        # The last entry was fine-tuned only if an epoch ended after its own.
        self._tuned = pruning.history[-1]["epoch"] + 1 < trainer.current_epoch
        final = self.final if self._tuned else None
        loss_is_value = _loss_is_value(pruning.value_function)
        rows = step_rows(pruning.history, final, loss_is_value, self._losses_after)
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
            label = f"coalition value: {pruning.value_function.label}"
            figures["coalition_values"] = coalition_size_figure(self.curves, label)
        if scored:
            last = scored[-1]
            step = history.index(last) + 1
            figures["ranked_values"] = ranked_values_figure(
                last["values"],
                last["stderr"],
                last["masks"],
                value_label=_score_label(pruning.scorer.name, pruning.value_function),
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
        (row,) = step_rows([entry], None, _loss_is_value(pruning.value_function), losses)
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


def _parameters(module: nn.Module) -> int:
    """All parameters; a masked ``weight_orig`` counts whole, as in the dense model."""
    return sum(p.numel() for p in module.parameters())


def _evaluate(module: nn.Module, pruning: Any) -> Evaluation:
    """The model as it is now, on the callback's scoring batches, with its value."""
    batches = to_device(pruning.scoring_batches, next(module.parameters()).device)
    return evaluate(module, batches, pruning.value_function)


def _loss_is_value(value_function: ValueFunction) -> bool:
    """Whether the value is the negative cross-entropy, so that the loss is minus the value."""
    return value_function.name == "loss"


def _score_label(scorer: str, value_function: ValueFunction) -> str:
    """The y label of the channel scores: the scorer, and its unit for Shapley values."""
    if scorer != "shapley":
        return _SCORES.get(scorer, f"{scorer} score")
    unit = _SHAPLEY_UNITS.get(value_function.name)
    return f"Shapley value ({unit})" if unit else "Shapley value"
