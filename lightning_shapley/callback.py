"""``ShapleyPruning``: the Lightning callback that scores channels and prunes them on schedule.

The callback decides *when* (its schedule) and *what* (units, scoring data, settings);
how channels are valued and removed is :mod:`~lightning_shapley.pruning`'s and
:mod:`~lightning_shapley.shapley`'s. It is about 650 lines long because about 100 of
them are the argument reference in the class docstring; the rest are the hooks, the
checks at set-up and their decisions.
"""

from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_shapley.checks import check_int
from lightning_shapley.export import (
    Artifact,
    artifact_metrics,
    check_formats,
    export_artifacts,
    masked_size_bytes,
)
from lightning_shapley.model_io import eager
from lightning_shapley.preflight import dry_run
from lightning_shapley.pruning import distributed, monitors, record
from lightning_shapley.pruning.batches import (
    BatchTransform,
    inputs_and_targets,
    loader_given_to_fit,
    recalibration_inputs,
    scoring_batches,
    to_device,
)
from lightning_shapley.pruning.masking import bake_masks, make_permanent, plain_copy
from lightning_shapley.pruning.recalibration import batchnorms
from lightning_shapley.pruning.resume import check_covered, pruned_units, reapply_masks
from lightning_shapley.pruning.rollback import ModelState, before_step, roll_back
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.schedule import (
    Decision,
    MiddleOfTraining,
    PruningSchedule,
    resolve_schedule,
)
from lightning_shapley.pruning.scorers import Scorer, ShapleyScorer, make_scorer
from lightning_shapley.pruning.units import PrunableUnit, check_layer_names, find_units
from lightning_shapley.reporting import PruningReporter
from lightning_shapley.shapley.values import (
    Batch,
    Evaluation,
    OutputTransform,
    ValueSetting,
    evaluate,
    resolve_value,
)

SCORE_SOURCES = ("val", "train")

Hook = TypeVar("Hook", bound=Callable[..., Any])


def _on_the_eager_model(hook: Hook) -> Hook:
    """Runs a hook with every compiled submodule of the module swapped for its original.

    Units are named, masked and scored on the eager layers (see ``model_io.eager``), in
    every hook alike, whether the module compiles its network before fit or in ``setup``.
    """

    @functools.wraps(hook)
    def run(
        self: Callback, trainer: lightning.Trainer, pl_module: Any, *args: Any, **kwargs: Any
    ) -> Any:
        with eager(pl_module):
            return hook(self, trainer, pl_module, *args, **kwargs)

    return run  # type: ignore[return-value]


class ShapleyPruning(Callback):
    """Scores channels at the end of chosen epochs and prunes the lowest, structurally.

    At the end of each epoch in the schedule, every prunable unit (a convolution or
    linear layer with what is coupled to its output channels, see
    :func:`~lightning_shapley.pruning.units.find_units`) is scored on held-out batches, the
    lowest-scoring channels are masked through ``torch.nn.utils.prune`` until the unit
    reaches the schedule's sparsity, and the trainer fine-tunes the rest as usual. Masks
    are cumulative: a pruned channel stays at zero.

    The defaults are the pipeline that pruned best in ``benchmarks/quality.py``: the
    value of a channel is what removing it alone costs now (the pruning band at depth 1,
    computed exactly), channels go a few at a time (``removal_step``) with the survivors
    re-scored in between, the units take turns (``interleave``), and the BatchNorm
    statistics are re-estimated on training batches after every round (``recalibrate``).
    See :mod:`lightning_shapley.pruning.rounds`.

    Under DDP every process scores its own share of the scoring batches and all prune the
    same channels (see :mod:`~lightning_shapley.pruning.distributed`). With ``ddp_spawn``
    the masks are baked into the weights when fit ends, so the main process's model gets
    the pruned weights; the history stays in the spawned processes.

    **Critical threshold.** With ``schedule=UntilDrop(step, tolerance)`` the sparsity rises
    by ``step`` every epoch until the metric falls more than ``tolerance`` below the dense
    model's; then the last step is rolled back (masks, and the weights and BatchNorm
    statistics of its channels, as before it) and pruning stops. The metric is this
    callback's own measurement of ``value`` on its scoring batches (the negative
    cross-entropy for ``"loss"``, so ``tolerance`` is in nats), taken after an epoch of
    fine-tuning; the roll-back is a history entry with ``rolled_back=True``. Any schedule
    with ``record(metric, dense_metric)`` answering a
    :class:`~lightning_shapley.pruning.schedule.Decision` is driven the same way.

    Args:
        amount: final fraction of channels removed, in ``[0, 1)``: in each unit, or over
            all units with ``scope="global"``.
        epochs: 0-based epochs at whose end a step runs, the sparsity ramping up to
            ``amount`` (cubic by default); an int for one shot; ``None`` spreads the steps
            over the middle third of ``max_epochs`` (see
            :class:`~lightning_shapley.pruning.schedule.MiddleOfTraining`), so that an
            untrained model is never pruned.
        layers: names of the layers to prune; ``None`` for every prunable Conv/Linear
            except the output layer.
        scorer: a name of :data:`~lightning_shapley.pruning.scorers.SCORERS` or a
            :class:`~lightning_shapley.pruning.scorers.Scorer` instance, which carries its
            own settings: the Shapley settings below are then refused.
        value: the value of the network on the scoring batches, which the Shapley and
            leave-one-out scorers keep high and a judging schedule measures: ``"loss"`` |
            ``"accuracy"`` | a torchmetrics Metric | ``fn(logits, targets)``.
        num_permutations: the Shapley scorer's sampling budget per unit (sampling
            methods only).
        weighting: the Shapley scorer's coalition-size weighting, a name of
            :data:`~lightning_shapley.shapley.weighting.WEIGHTINGS`.
        depth: the band's depth; ``None`` is 1 with ``weighting="band"``.
        method: the Shapley scorer's estimator, a name of
            :data:`~lightning_shapley.shapley.registry.ESTIMATORS`; ``None`` enumerates
            bands of depth 1 and 2 exactly and samples the rest (``"surrogate"``).
        estimator_options: further options of that estimator, checked here, e.g.
            ``{"tolerance": 0.01}`` for ``method="adaptive"`` (its stop rule).
        score_dataloader: held-out batches to score on; ``None`` for the loader named by
            ``score_source`` that fit was given (loaders, a datamodule or the module's own
            ``*_dataloader``), else its training loader.
        score_batches: how many of its batches are used (by each process, under DDP).
        score_source: ``"val"`` (default) or ``"train"``, when no ``score_dataloader``.
        scope: ``"layer"`` or ``"global"`` (one ranking across units).
        min_channels: channels every unit keeps, whatever the amount.
        ramp: ``"cubic"`` (Zhu & Gupta, 2017) or ``"linear"``.
        batch_transform: turns a batch of the loader into ``(inputs, targets)``; by default
            :func:`~lightning_shapley.pruning.batches.inputs_and_targets` (a mapping's
            ``labels`` and the rest as keyword arguments, else the first two items). The
            inputs may be a tensor, a mapping of keyword arguments, a tuple of positional
            ones or an ``(args, kwargs)`` pair.
        output_transform: reads the logits out of what the model returns; by default a
            tensor, ``.logits`` or the first item of a tuple. Classes may be on dim 1 or
            last; per-token logits (``[B, T, V]`` or ``[B * T, V]``) are scored per token.
        seed: seed of the Shapley sampling and of the random scorer.
        schedule: a :class:`~lightning_shapley.pruning.schedule.PruningSchedule` used instead of
            ``amount``, ``epochs`` and ``ramp`` (leave those at their defaults), e.g.
            :class:`~lightning_shapley.pruning.schedule.UntilDrop` for the critical threshold.
        removal_step: a step's channels go in rounds of this many per unit (an int), or
            of this fraction of each unit's channels (a float, at least one channel), the
            survivors re-scored after each round; ``None`` removes them at once.
        interleave: within a round the units take turns, each scored with the ones before
            it already pruned; ``None`` is ``True`` for the layer scope, ``False`` (one
            ranking across units per round) for the global one.
        rescore: which survivors a round values again: ``"near_cut"`` (all in a step's
            first round, then those whose last values lie near the cut, more when values
            move) or ``"all"`` (every survivor every round: exact greedy elimination with
            the default scorer, about three times the evaluations). See
            :class:`~lightning_shapley.pruning.rounds.RoundPruner`.
        recalibrate: training batches on which the BatchNorm running statistics are
            re-estimated after every round (no gradient step); 0 leaves them alone.
        export: formats of :data:`~lightning_shapley.export.EXPORT_FORMATS` written when
            fit ends (see :func:`~lightning_shapley.export.export_artifacts`); their sizes,
            latency and accuracy go to the loggers as ``export/<format>/*``.
        export_dir: where they go: ``export/`` in it; ``None`` for the trainer's log
            directory.
        reporter: draws the figures of the run (PNG files, and images for every logger
            that takes them) and logs its W&B charts and tables; ``True`` for a default
            :class:`~lightning_shapley.reporting.PruningReporter`, ``False`` for none.

    Example:
        >>> pruning = ShapleyPruning(amount=0.5, epochs=[2, 4, 6])
        >>> trainer = lightning.Trainer(max_epochs=10, callbacks=[pruning])  # doctest: +SKIP
        >>> from lightning_shapley import UntilDrop
        >>> pruning = ShapleyPruning(schedule=UntilDrop(step=0.1, tolerance=0.01), value="accuracy")
    """

    def __init__(
        self,
        amount: float = 0.5,
        epochs: int | Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        scorer: str | Scorer = "shapley",
        value: ValueSetting = "loss",
        num_permutations: int = 32,
        weighting: str = "band",
        depth: int | None = None,
        method: str | None = None,
        score_dataloader: Iterable[Any] | None = None,
        score_batches: int = 4,
        score_source: str = "val",
        scope: str = "layer",
        min_channels: int = 1,
        ramp: str = "cubic",
        batch_transform: BatchTransform | None = None,
        output_transform: OutputTransform | None = None,
        seed: int = 0,
        schedule: PruningSchedule | None = None,
        removal_step: int | float | None = 0.02,
        interleave: bool | None = None,
        rescore: str = "near_cut",
        recalibrate: int = 8,
        reporter: PruningReporter | bool = True,
        export: Sequence[str] = (),
        export_dir: str | Path | None = None,
        estimator_options: Mapping[str, object] | None = None,
    ) -> None:
        # Every setting is checked and resolved here, once; nothing below resolves again.
        self.schedule = resolve_schedule(schedule, amount, epochs, ramp)
        #: The final amount, when the schedule has one (a search such as UntilDrop may not).
        self.amount: float | None = getattr(self.schedule, "amount", None)
        check_layer_names(layers)
        if score_source not in SCORE_SOURCES:
            raise ValueError(
                f"score_source={score_source!r} is not known; use one of {SCORE_SOURCES}"
            )
        check_int("score_batches", score_batches, 1)
        check_int("min_channels", min_channels, 1)
        check_int("recalibrate", recalibrate, 0)
        value_function = resolve_value(value, output_transform)
        self.scorer = make_scorer(
            scorer,
            value=value_function,
            seed=seed,
            weighting=weighting,
            depth=depth,
            method=method,
            num_permutations=num_permutations,
            estimator_options=dict(estimator_options) if estimator_options else None,
        )
        #: The value of the network on the scoring batches: the scorer's, if it has one.
        self.value_function = getattr(self.scorer, "value_function", None) or value_function
        interleave = scope == "layer" if interleave is None else interleave
        #: Removes a step's channels in rounds; its units are found when fit sets up.
        self.rounds = RoundPruner(
            [], self.scorer, scope, min_channels, removal_step, interleave, rescore=rescore
        )
        if not isinstance(reporter, PruningReporter | bool):
            raise ValueError(
                f"reporter={reporter!r} is not allowed; use a PruningReporter, True for the "
                "default one (figures in the log directory) or False for none"
            )
        #: Draws the figures and logs the W&B charts of the run (None: no reporting).
        self.reporter = PruningReporter() if reporter is True else reporter or None
        self.export = check_formats(export, setting="export") if export else ()
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.layers = None if layers is None else list(layers)
        self.score_dataloader = score_dataloader
        self.score_batches = score_batches
        self.score_source = score_source
        self.scope, self.removal_step, self.interleave = scope, removal_step, interleave
        self.rescore = rescore
        self.batch_transform = batch_transform or inputs_and_targets
        self.recalibrate = recalibrate
        #: What ``export`` wrote when fit ended (on global rank zero).
        self.artifacts: list[Artifact] = []
        self.units: list[PrunableUnit] = []
        self.history: list[record.StepRecord] = []
        #: This process's scoring batches, ``(inputs, targets)``, fetched when fit sets up.
        self.scoring_batches: list[Batch] = []
        #: The scoring value of the dense model, measured just before the first step.
        self.dense_metric: float | None = None
        self._pending_masks: dict[str, list[bool]] | None = None
        self._checkpoint_pruned: set[str] = set()
        # Monitored metrics marked stale after a step, and the values measured before it.
        self._stale_monitors: dict[str, Any] = {}
        # The last step, while a schedule that judges steps has not judged it yet: what
        # rolling it back needs (see pruning.rollback).
        self._unjudged: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        """Unique per layer group, so that two instances can share a trainer."""
        return self._generate_state_key(layers=self.layers)

    # ------------------------------------------------------------------ set-up

    @override
    @_on_the_eager_model
    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Checks the whole configuration against the model before any training."""
        if stage != "fit":
            return
        self.schedule.validate(trainer.max_epochs)
        if isinstance(self.schedule, MiddleOfTraining):
            rank_zero_info(
                f"ShapleyPruning: epochs=None: pruning at the end of epochs "
                f"{list(self.schedule.epochs)} (0-based), the middle third of "
                f"max_epochs={trainer.max_epochs}"
            )
        # A shuffling loader draws from the global generator: training must not notice.
        with torch.random.fork_rng(devices=[]):
            self.scoring_batches = scoring_batches(
                self._scoring_loader(trainer),
                self.batch_transform,
                self.score_batches,
                trainer.world_size,
                trainer.global_rank,
            )
        measured = evaluate(pl_module, self.scoring_batches, self.value_function).value
        if not math.isfinite(measured):
            raise ValueError(
                f"value={self.value_function.label!r} is {measured} on the scoring batches "
                "for the model as it is; a value must be a finite number"
            )
        self.units = self._checked_units(pl_module)
        self.rounds.units = self.units
        self.rounds.check_amount(self.amount)
        for unit in self.units:
            self.scorer.check(unit)

    def _checked_units(self, pl_module: lightning.LightningModule) -> list[PrunableUnit]:
        """The units to prune, each removed and scored once in a dry run (see preflight.py)."""
        found = find_units(pl_module, self.scoring_batches[0][0], self.layers)
        checked = dry_run(
            pl_module,
            found,
            self.scoring_batches[0],
            self.value_function,
            score=isinstance(self.scorer, ShapleyScorer),
        )
        if checked.refused:
            details = "; ".join(f"{name!r}: {why}" for name, why in checked.refused.items())
            if self.layers is not None:
                raise ValueError(f"layers: these cannot be pruned exactly: {details}")
            warnings.warn(
                f"ShapleyPruning leaves out units whose channels cannot be removed exactly: "
                f"{details}",
                stacklevel=2,
            )
        if not checked.units:
            raise ValueError(
                f"{type(pl_module).__name__} has no prunable unit (the warnings before this "
                "say why each layer was left out), so ShapleyPruning has nothing to prune"
            )
        summary = ", ".join(
            f"{unit.name} ({unit.n_channels} channels"
            + (f", {checked.engines[unit.name]} engine)" if checked.engines else ")")
            for unit in checked.units
        )
        rank_zero_info(f"ShapleyPruning: {len(checked.units)} units: {summary}")
        return checked.units

    def _scoring_loader(self, trainer: lightning.Trainer) -> Iterable[Any]:
        if self.score_dataloader is not None:
            return self.score_dataloader
        return loader_given_to_fit(trainer, self.score_source)

    # ------------------------------------------------------------------ the step

    @override
    @_on_the_eager_model
    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Re-applies the masks of a resumed run (its checkpoint holds plain weights)."""
        covered = [
            u.name for c in trainer.callbacks if isinstance(c, ShapleyPruning) for u in c.units
        ]
        check_covered(self._checkpoint_pruned, covered, self.layers)
        if self._pending_masks is not None:
            reapply_masks(pl_module, self.units, self._pending_masks)
        self._pending_masks = None

    @override
    @_on_the_eager_model
    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Judges the last step if the schedule does, then prunes if this epoch has a step.

        All or nothing: on any exception (Ctrl-C included) the model (masks,
        parametrizations, weights, BatchNorm statistics, train flags) and this callback's
        history and schedule are put back exactly as they were, and the exception goes on.
        """
        # A step only appends to the history and replaces the other fields: this is all
        # that putting them back takes.
        history_length, dense_metric, unjudged = (
            len(self.history),
            self.dense_metric,
            self._unjudged,
        )
        schedule_state = copy.deepcopy(self.schedule.state_dict())
        judge = self._unjudged is not None and not self.rolled_back
        model_state = ModelState(pl_module) if judge else None
        try:
            if judge:
                self._judge(trainer, pl_module)
            if self.rolled_back:
                return  # rolling back ends the pruning, whatever the schedule says
            target = self.schedule.target(trainer.current_epoch)
            if target is not None:
                model_state = model_state or ModelState(pl_module)
                self._step(trainer, pl_module, target)
                # The validation before the step measured other weights (see monitors.py).
                self._stale_monitors |= monitors.mark_stale(trainer)
        except BaseException:
            if model_state is not None:
                model_state.restore()
            del self.history[history_length:]
            self.dense_metric, self._unjudged = dense_metric, unjudged
            self.schedule.load_state_dict(schedule_state)
            raise

    @override
    def on_train_epoch_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Puts back the monitored values a step marked stale (the next validation runs on)."""
        monitors.restore(trainer, self._stale_monitors)
        self._stale_monitors = {}

    @property
    def rolled_back(self) -> bool:
        """Whether a step was rolled back (which ends the pruning)."""
        return bool(self.history) and bool(self.history[-1].get("rolled_back", False))

    def _step(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, target: float
    ) -> None:
        batches = to_device(self.scoring_batches, pl_module.device)
        if self.reporter is not None and not self.history:
            self.reporter.before_first_step(trainer, pl_module, self)
        before = self._evaluate(trainer, pl_module, batches)
        if self.dense_metric is None:
            self.dense_metric = before.value
        start = time.perf_counter()
        # Saved before the first round: the rounds re-estimate every channel's statistics.
        saved = before_step(pl_module, self.units) if _judges_steps(self.schedule) else None
        with self._progress(trainer, self.rounds.remaining(pl_module, target)) as progress:
            scores = self.rounds.prune(
                pl_module,
                batches,
                target,
                self._recalibration_inputs(trainer, pl_module),
                combine=lambda scores: distributed.mean_scores_over_ranks(
                    trainer, scores, distributed.samples(batches)
                ),
                # Every process applies rank zero's plan: rounding can never make them disagree.
                agree=lambda plan: distributed.from_rank_zero(trainer, plan),
                after_recalibration=lambda: distributed.mean_statistics_over_ranks(
                    trainer, pl_module
                ),
                progress=progress.update,
            )
        seconds = distributed.max_over_ranks(trainer, time.perf_counter() - start)
        if saved is not None:
            previous = self.history[-1]["target_sparsity"] if self.history else 0.0
            self._unjudged = saved.undo(pl_module, self.units, previous)
        after = self._evaluate(trainer, pl_module, batches)
        step = record.step_record(
            pl_module,
            self.units,
            epoch=trainer.current_epoch,
            target=target,
            before=before,
            after=after,
            scores=scores,
            seconds=seconds,
        )
        self._append(pl_module, step)
        rank_zero_info(
            f"ShapleyPruning: epoch {step['epoch']}: sparsity {step['sparsity']:.3f} "
            f"(target {target:.3f}), scoring accuracy {before.accuracy:.4f} -> "
            f"{after.accuracy:.4f}, {step['evaluations']} evaluations in {seconds:.1f} s"
        )

    def _recalibration_inputs(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> list:
        """Training inputs to re-estimate the BatchNorm statistics on (none if switched off)."""
        if self.recalibrate == 0 or not batchnorms(pl_module):
            return []
        return recalibration_inputs(
            trainer.train_dataloader, self.batch_transform, self.recalibrate, pl_module.device
        )

    def _progress(self, trainer: lightning.Trainer, total: int) -> tqdm:
        """A progress bar over the channels to remove, when the trainer shows one."""
        return tqdm(
            total=total,
            desc=f"Pruning channels ({self.scorer.name})",
            unit="channel",
            leave=False,
            disable=trainer.progress_bar_callback is None or not trainer.is_global_zero,
        )

    def _evaluate(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, batches: list
    ) -> Evaluation:
        return distributed.evaluate_over_ranks(trainer, pl_module, batches, self.value_function)

    def _judge(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Hands the schedule the metric after the last step and an epoch of fine-tuning."""
        batches = to_device(self.scoring_batches, pl_module.device)
        measured = self._evaluate(trainer, pl_module, batches)
        decision = Decision(self.schedule.record(measured.value, self.dense_metric))
        metrics = {"pruning/metric": measured.value, "pruning/dense_metric": self.dense_metric}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        if decision is Decision.ROLL_BACK_AND_STOP:
            undo = self._unjudged
            roll_back(pl_module, self.units, undo)
            entry = record.rollback_record(
                pl_module,
                self.units,
                epoch=trainer.current_epoch,
                target=undo["target"],
                dense_metric=self.dense_metric,
                before=measured,
                after=self._evaluate(trainer, pl_module, batches),
            )
            self._append(pl_module, entry)
            rank_zero_info(
                f"ShapleyPruning: epoch {entry['epoch']}: the metric fell to "
                f"{measured.value:.4f} from {self.dense_metric:.4f} dense; rolled back to "
                f"sparsity {entry['sparsity']:.3f} (target {undo['target']:.3f}) and stopped "
                "pruning"
            )
        self._unjudged = None

    def _append(self, pl_module: lightning.LightningModule, entry: record.StepRecord) -> None:
        """Adds an entry to the history and logs its numbers as ``pruning/*``."""
        self.history.append(entry)
        # The numbers agree on every process already; sync_dist keeps Lightning's epoch-level
        # reduction consistent with that (and keeps them usable as a monitor on every rank).
        pl_module.log_dict(record.metrics(entry), on_step=False, on_epoch=True, sync_dist=True)
        if self.reporter is not None:
            self.reporter.after_step(pl_module.trainer, pl_module, self, entry)

    # ------------------------------------------------------------------ the end of fit

    @override
    @_on_the_eager_model
    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Writes the export artifacts, then draws the run's figures and logs its charts."""
        monitors.restore(trainer, self._stale_monitors)
        self._stale_monitors = {}
        if self.export:
            # trainer.log_dir is broadcast under DDP: every process asks, rank zero writes.
            directory = self.export_dir or Path(trainer.log_dir or trainer.default_root_dir)
            if trainer.is_global_zero:
                self._write_artifacts(trainer, pl_module, directory / "export")
        if self.reporter is not None and self.history:
            self.reporter.on_fit_end(trainer, pl_module, self)

    def _write_artifacts(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, directory: Path
    ) -> None:
        """The compact (and other) files, with their sizes and latency sent to the loggers."""
        self.artifacts = export_artifacts(
            pl_module,
            self.scoring_batches[0][0],
            directory,
            self.export,
            batches=self.scoring_batches,
        )
        for logger in trainer.loggers:
            logger.log_metrics(artifact_metrics(self.artifacts), step=trainer.global_step)
        if self.reporter is not None:
            sizes = {"masked (dense shapes)": masked_size_bytes(pl_module)}
            sizes |= {artifact.format: artifact.size_bytes for artifact in self.artifacts}
            self.reporter.add_sizes(sizes)

    @override
    def teardown(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Bakes the masks into the weights when fit ran in spawned processes.

        After ``ddp_spawn`` (or ``ddp_fork``), Lightning loads rank zero's ``state_dict``
        into the main process's model with ``strict=False``: a masked parameter saved as
        ``<p>_orig`` and ``<p>_mask`` would silently not load, leaving that layer as it was
        before training. Baked in, the model there gets the trained, pruned weights.
        """
        if stage == "fit" and isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            make_permanent(pl_module)

    # ------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        """The history (with the masks), the schedule, the dense metric, any unjudged step."""
        return {
            "history": self.history,
            "schedule": self.schedule.state_dict(),
            "dense_metric": self.dense_metric,
            "unjudged": self._unjudged,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the history; the masks are re-applied when training starts."""
        self.history = list(state_dict["history"])
        self.schedule.load_state_dict(state_dict["schedule"])
        self.dense_metric = state_dict["dense_metric"]
        self._unjudged = state_dict["unjudged"]
        self._pending_masks = self.history[-1]["masks"] if self.history else None

    @override
    def on_load_checkpoint(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        checkpoint: dict[str, Any],
    ) -> None:
        """Notes every unit the checkpoint's pruning callbacks pruned, whatever their keys."""
        self._checkpoint_pruned = pruned_units(checkpoint, type(self).__qualname__)

    @override
    def on_save_checkpoint(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        checkpoint: dict[str, Any],
    ) -> None:
        """Saves plain weights, which load into a fresh model; the masks travel in our state.

        A network saved as a hyperparameter (``save_hyperparameters()`` with the module)
        is saved plain too, so ``load_from_checkpoint`` builds a model that takes them.
        """
        bake_masks(checkpoint["state_dict"])
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, Mapping) and any(
            isinstance(value, torch.nn.Module) for value in hparams.values()
        ):
            checkpoint["hyper_parameters"] = {
                key: plain_copy(value) if isinstance(value, torch.nn.Module) else value
                for key, value in hparams.items()
            }


def _judges_steps(schedule: PruningSchedule) -> bool:
    """Whether the schedule judges each step by the metric after it (``UntilDrop``)."""
    return callable(getattr(schedule, "record", None))
