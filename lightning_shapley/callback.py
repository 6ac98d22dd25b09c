"""``ShapleyPruning``: the Lightning callback that scores channels and prunes them on schedule."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm
from typing_extensions import override

from lightning_shapley.export import Artifact, check_formats, export_artifacts
from lightning_shapley.pruning.masking import (
    channel_state,
    load_channel_state,
    make_permanent,
    prune_channels,
    pruned_channels,
    set_pruned_channels,
)
from lightning_shapley.pruning.recalibration import batchnorms, statistic_buffers
from lightning_shapley.pruning.rounds import SCOPES, RoundPruner, channels_to_prune
from lightning_shapley.pruning.schedule import Decision, PruningSchedule, is_int, make_schedule
from lightning_shapley.pruning.scorers import ChannelScores, Scorer, resolve_scorer
from lightning_shapley.pruning.units import PrunableUnit, find_units
from lightning_shapley.reporting import PruningReporter
from lightning_shapley.shapley.values import Batch, ValueSetting, evaluate, resolve_value

SCORE_SOURCES = ("val", "train")
#: Bands up to this depth are enumerated exactly by default: ``1 + n + C(n, 2)`` coalitions.
EXACT_BAND_DEPTH = 2
BatchTransform = Callable[[Any], Batch]


def _default_batch(batch: Any) -> Batch:
    inputs, targets = batch[0], batch[1]
    return inputs, targets


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

    Under DDP every process scores on its own scoring batches (every ``world_size``-th
    batch of the loader, ``score_batches`` each), with the same random permutations; the
    scores are averaged over the processes, weighted by their samples, and the masks are
    decided on rank zero and broadcast, so every process prunes the same channels. With
    ``ddp_spawn`` the masks are baked into the weights when fit ends, so that the model in
    the main process receives the pruned weights; this callback's history stays in the
    spawned processes (the logged ``pruning/*`` metrics reach the logger as usual).

    **Critical threshold.** With ``schedule=UntilDrop(step, tolerance)`` (see
    :class:`~lightning_shapley.pruning.schedule.UntilDrop`) the sparsity rises by ``step`` at the
    end of every epoch until the metric falls more than ``tolerance`` below the dense
    model's; then the last step is rolled back and pruning stops. The metric is this
    callback's own measurement of ``value`` on its scoring batches (higher is better:
    the negative cross-entropy for ``"loss"``, so ``tolerance`` is in nats; a fraction
    for ``"accuracy"``), not a metric the module logs: it exists whether or not
    validation runs, agrees on every process, and is the quantity the scorers are asked
    to keep high; pass ``score_dataloader`` to judge on data of its own. The dense metric
    is measured once, just before the first step. A step is judged at the end of the
    next epoch, after an epoch of fine-tuning, so a step in the last epoch stays unjudged.
    Rolling back restores every unit's masks as they were before the step, and the
    channels it pruned get back the weights and BatchNorm statistics they had then; the
    history gains an entry with ``rolled_back=True`` and ``pruning/rolled_back`` is
    logged as 1 (0 at every step). Any schedule with ``record(metric, dense_metric)``
    answering a :class:`~lightning_shapley.pruning.schedule.Decision` is driven the same way.

    Args:
        amount: final fraction of channels removed, in ``[0, 1)``: in each unit, or over
            all units with ``scope="global"``.
        epochs: 0-based epochs at whose end a step runs, the sparsity ramping up to
            ``amount`` (cubic by default); an int or ``None`` (epoch 0) for one shot.
        layers: names of the layers to prune; ``None`` for every prunable Conv/Linear
            except the output layer.
        scorer: ``"shapley"`` | ``"loo"`` | ``"l1"`` | ``"bn_gamma"`` | ``"taylor"`` | ``"random"``
            or a :class:`~lightning_shapley.pruning.scorers.Scorer`.
        value: the coalition value of the Shapley scorer: ``"loss"`` | ``"accuracy"`` |
            a torchmetrics Metric | ``fn(logits, targets)``.
        num_permutations: the Shapley scorer's sampling budget per unit (sampling
            methods only).
        weighting: the Shapley scorer's coalition-size weighting: ``"band"`` (default),
            ``"shapley"`` (the classic value) or ``"banzhaf"``.
        depth: the band's depth; ``None`` is 1 with ``weighting="band"``.
        method: the Shapley scorer's estimator; ``None`` enumerates bands of depth 1 and
            2 exactly and samples the rest (``"surrogate"``).
        score_dataloader: held-out batches to score on; ``None`` for the datamodule's
            loader named by ``score_source``.
        score_batches: how many of its batches are used (by each process, under DDP).
        score_source: ``"val"`` (default) or ``"train"``, when no ``score_dataloader``.
        scope: ``"layer"`` or ``"global"`` (one ranking across units).
        min_channels: channels every unit keeps, whatever the amount.
        ramp: ``"cubic"`` (Zhu & Gupta, 2017) or ``"linear"``.
        batch_transform: turns a batch of the loader into ``(inputs, targets)``; by default
            its first two items.
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
        recalibrate: training batches on which the BatchNorm running statistics are
            re-estimated after every round (no gradient step); 0 leaves them alone.
        export: formats written when fit ends, from
            :data:`~lightning_shapley.export.EXPORT_FORMATS` (``"compact"``, ``"int8"``,
            ``"torchscript"``, ``"onnx"``): a physically smaller model, see
            :func:`~lightning_shapley.export.export_artifacts`; their sizes, latency and
            accuracy on the scoring batches go to the loggers as ``export/<format>/*``.
        export_dir: where they go: ``export/`` in it; ``None`` for the trainer's log
            directory.
        reporter: draws the figures of the run (PNG files, and images for every logger
            that takes them) and logs its W&B charts and tables; ``True`` for a default
            :class:`~lightning_shapley.reporting.PruningReporter`, ``False`` for none.

    Example:
        >>> pruning = ShapleyPruning(amount=0.5, epochs=[2, 4, 6])
        >>> trainer = lightning.Trainer(max_epochs=10, callbacks=[pruning])  # doctest: +SKIP
        >>> from lightning_shapley.pruning.schedule import UntilDrop
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
        seed: int = 0,
        schedule: PruningSchedule | None = None,
        removal_step: int | float | None = 0.02,
        interleave: bool | None = None,
        recalibrate: int = 8,
        reporter: PruningReporter | bool = True,
        export: Sequence[str] = (),
        export_dir: str | Path | None = None,
    ) -> None:
        if schedule is None:
            self.schedule: PruningSchedule = make_schedule(amount, epochs, ramp)
            self.amount: float | None = amount
        else:
            _check_schedule(schedule, amount=amount, epochs=epochs, ramp=ramp)
            self.schedule = schedule
            self.amount = getattr(schedule, "amount", None)  # None: no final amount known
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not known; use one of {SCOPES}")
        if score_source not in SCORE_SOURCES:
            raise ValueError(
                f"score_source={score_source!r} is not known; use one of {SCORE_SOURCES}"
            )
        for name, number in (("score_batches", score_batches), ("min_channels", min_channels)):
            if not is_int(number) or number < 1:
                raise ValueError(f"{name}={number!r} is not allowed; it must be a positive integer")
        if not is_int(recalibrate) or recalibrate < 0:
            raise ValueError(
                f"recalibrate={recalibrate!r} is not allowed; it must be a number of training "
                "batches, 0 to keep the BatchNorm statistics as they are"
            )
        if interleave is not None and not isinstance(interleave, bool):
            raise ValueError(f"interleave={interleave!r} is not allowed; use True, False or None")
        if weighting == "band" and depth is None:
            depth = 1
        if method is None:
            # The band's few coalitions are cheapest enumerated; the others are sampled.
            shallow = isinstance(depth, int) and depth <= EXACT_BAND_DEPTH
            method = "exact" if weighting == "band" and shallow else "surrogate"
        self.scorer = resolve_scorer(
            scorer,
            seed=seed,
            value=value,
            weighting=weighting,
            depth=depth,
            method=method,
            num_permutations=num_permutations,
        )
        # Checks removal_step and interleave against the scope now, before training.
        RoundPruner([], self.scorer, scope, min_channels, removal_step, interleave or False)
        self.layers = None if layers is None else list(layers)
        self.score_dataloader = score_dataloader
        self.score_batches = score_batches
        self.score_source = score_source
        self.scope = scope
        self.min_channels = min_channels
        self.batch_transform = batch_transform or _default_batch
        self.removal_step = removal_step
        self.interleave = scope == "layer" if interleave is None else interleave
        self.recalibrate = recalibrate
        #: The coalition value as a function ``(logits [k, N, C...], targets) -> [k]``.
        self.value_function = resolve_value(value)
        if not isinstance(reporter, PruningReporter | bool):
            raise ValueError(
                f"reporter={reporter!r} is not allowed; use a PruningReporter, True for the "
                "default one (figures in the log directory) or False for none"
            )
        #: Draws the figures and logs the W&B charts of the run (None: no reporting).
        self.reporter = PruningReporter() if reporter is True else reporter or None
        self.export = check_formats(export, setting="export") if export else ()
        self.export_dir = None if export_dir is None else Path(export_dir)
        #: What ``export`` wrote when fit ended (on global rank zero).
        self.artifacts: list[Artifact] = []
        self.units: list[PrunableUnit] = []
        self.history: list[dict[str, Any]] = []
        #: This process's scoring batches, ``(inputs, targets)``, fetched when fit sets up.
        self.scoring_batches: list[Batch] = []
        self._pending_masks: dict[str, list[bool]] | None = None
        #: The scoring value of the dense model, measured just before the first step.
        self.dense_metric: float | None = None
        # The last step, while a schedule that judges steps has not judged it yet: the
        # masks before it, the channels it pruned and their state then, the target before.
        self._unjudged: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up

    @override
    def setup(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, stage: str
    ) -> None:
        """Checks the whole configuration against the model before any training."""
        if stage != "fit":
            return
        self.schedule.validate(trainer.max_epochs)
        self.scoring_batches = self._fetch_batches(trainer)
        self.units = find_units(pl_module, self.scoring_batches[0][0], self.layers)
        self.rounds = RoundPruner(
            self.units,
            self.scorer,
            self.scope,
            self.min_channels,
            self.removal_step,
            self.interleave,
        )
        for unit in self.units:
            self.scorer.check(unit)
            # A global ranking decides per unit later; it can always keep min_channels. A
            # schedule with no final amount (a search) is capped at min_channels as it goes.
            amount = self.amount if self.scope == "layer" and self.amount is not None else 0.0
            kept = unit.n_channels - channels_to_prune(unit.n_channels, amount)
            if kept < self.min_channels:
                raise ValueError(
                    f"amount={self.amount} would leave unit {unit.name!r} with {kept} of its "
                    f"{unit.n_channels} channels, fewer than min_channels={self.min_channels}; "
                    "lower amount or min_channels, or leave the unit out with layers="
                )

    def _fetch_batches(self, trainer: lightning.Trainer) -> list[Batch]:
        loader = self.score_dataloader
        if loader is None:
            datamodule = trainer.datamodule
            if datamodule is None:
                raise ValueError(
                    "score_dataloader is None and the trainer has no datamodule to take the "
                    f"{self.score_source} loader from; pass score_dataloader="
                )
            loader = getattr(datamodule, f"{self.score_source}_dataloader")()
        # The loader is fetched here, not through the trainer, so it has no distributed
        # sampler and gives every process the same batches: they are shared out below.
        shards = 1 if _is_sharded(loader) else trainer.world_size
        batches = []
        for index, batch in enumerate(islice(loader, self.score_batches * shards)):
            try:
                inputs, targets = self.batch_transform(batch)
            except (TypeError, IndexError, KeyError, ValueError) as error:
                raise ValueError(
                    f"scoring batch {index} (a {type(batch).__name__}) cannot be unpacked into "
                    f"(inputs, targets): {error}; pass batch_transform= to say how"
                ) from error
            if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
                raise ValueError(
                    f"scoring batch {index} unpacked into ({type(inputs).__name__}, "
                    f"{type(targets).__name__}); inputs and targets must be tensors"
                )
            batches.append((inputs, targets))
        if not batches:
            raise ValueError("the scoring loader gave no batches; it must give at least one")
        return _shard(batches, shards, trainer.global_rank)

    # ------------------------------------------------------------------ the step

    @override
    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Re-applies the masks of a resumed run (its checkpoint holds plain weights)."""
        if self._pending_masks is None:
            return
        for unit in self.units:
            if unit.name in self._pending_masks:
                pruned = torch.tensor(self._pending_masks[unit.name], dtype=torch.bool)
                if pruned.any():
                    prune_channels(pl_module, unit, pruned)
        self._pending_masks = None

    @override
    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Judges the last step if the schedule does, then prunes if this epoch has a step."""
        if self._unjudged is not None and not self.rolled_back:
            self._judge(trainer, pl_module)
        if self.rolled_back:
            return  # rolling back ends the pruning, whatever the schedule says
        target = self.schedule.target(trainer.current_epoch)
        if target is not None:
            self._step(trainer, pl_module, target)

    @property
    def rolled_back(self) -> bool:
        """Whether a step was rolled back (which ends the pruning)."""
        return bool(self.history) and bool(self.history[-1].get("rolled_back", False))

    def _device_batches(self, pl_module: lightning.LightningModule) -> list[Batch]:
        device = pl_module.device
        return [(x.to(device), y.to(device)) for x, y in self.scoring_batches]

    def _step(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, target: float
    ) -> None:
        batches = self._device_batches(pl_module)
        if self.reporter is not None and not self.history:
            self.reporter.before_first_step(trainer, pl_module, self)
        before = self._measure(trainer, pl_module, batches)
        if self.dense_metric is None:
            self.dense_metric = before["value"]
        start = time.perf_counter()
        current = {unit.name: pruned_channels(pl_module, unit) for unit in self.units}
        # Rounds re-estimate the BatchNorm statistics of every channel: what a roll-back
        # gives back must be saved before the first round, for every channel in play.
        saved = (
            {unit.name: channel_state(pl_module, unit, ~current[unit.name]) for unit in self.units}
            if _judges_steps(self.schedule)
            else None
        )
        with self._progress(trainer, self.rounds.remaining(pl_module, target)) as progress:
            scores = self.rounds.prune(
                pl_module,
                batches,
                target,
                self._recalibration_inputs(trainer, pl_module),
                combine=lambda scores: _mean_over_ranks(trainer, scores, _samples(batches)),
                # Every process applies rank zero's plan: rounding can never make them disagree.
                agree=lambda plan: _from_rank_zero(trainer, plan),
                after_recalibration=lambda: _mean_statistics_over_ranks(trainer, pl_module),
                progress=progress.update,
            )
        seconds = _max_over_ranks(trainer, time.perf_counter() - start)
        if saved is not None:
            plan = {u.name: pruned_channels(pl_module, u) & ~current[u.name] for u in self.units}
            self._unjudged = {
                "masks": {name: pruned.tolist() for name, pruned in current.items()},
                "pruned": {name: pruned.tolist() for name, pruned in plan.items()},
                "state": {
                    name: _restrict(saved[name], ~current[name], plan[name]) for name in plan
                },
                "target": self.history[-1]["target_sparsity"] if self.history else 0.0,
            }
        after = self._measure(trainer, pl_module, batches)
        self._record(trainer, pl_module, target, scores, before, after, seconds)

    def _recalibration_inputs(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> list[Tensor]:
        """Training inputs to re-estimate the BatchNorm statistics on (none if switched off)."""
        if self.recalibrate == 0 or not batchnorms(pl_module):
            return []
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError(
                f"recalibrate={self.recalibrate} needs the trainer's training loader, and it "
                "has none; pass recalibrate=0 to keep the BatchNorm statistics as they are"
            )
        inputs = []
        for batch in islice(loader, self.recalibrate):
            batch_inputs, _ = self.batch_transform(batch)
            inputs.append(batch_inputs.to(pl_module.device))
        return inputs

    def _progress(self, trainer: lightning.Trainer, total: int) -> tqdm:
        """A progress bar over the channels to remove, when the trainer shows one."""
        return tqdm(
            total=total,
            desc=f"Pruning channels ({self.scorer.name})",
            unit="channel",
            leave=False,
            disable=trainer.progress_bar_callback is None or not trainer.is_global_zero,
        )

    def _measure(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, batches: list[Batch]
    ) -> dict[str, float]:
        """Value and accuracy on the scoring batches of all processes (a weighted mean)."""
        measured = evaluate(pl_module, batches, self.value_function)
        local = torch.tensor([measured.value, measured.accuracy], dtype=torch.float64)
        value, correct = _weighted_mean_over_ranks(trainer, local, _samples(batches))
        return {"value": float(value), "accuracy": float(correct)}

    def _record(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        target: float,
        scores: dict[str, ChannelScores],
        before: dict[str, float],
        after: dict[str, float],
        seconds: float,
    ) -> None:
        step = {
            **self._sparsity(trainer, pl_module, target),
            "rolled_back": False,
            "value_before": before["value"],
            "value_after": after["value"],
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "scoring_seconds": seconds,
            "evaluations": sum(s.evaluations for s in scores.values()),
            "values": {name: s.values.tolist() for name, s in scores.items()},
            "stderr": {name: s.stderr.tolist() for name, s in scores.items()},
        }
        self._append(pl_module, step)
        rank_zero_info(
            f"ShapleyPruning: epoch {step['epoch']}: sparsity {step['sparsity']:.3f} "
            f"(target {target:.3f}), scoring accuracy {before['accuracy']:.4f} -> "
            f"{after['accuracy']:.4f}, {step['evaluations']} evaluations in {seconds:.1f} s"
        )

    def _judge(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Hands the schedule the metric after the last step and an epoch of fine-tuning."""
        batches = self._device_batches(pl_module)
        # A weighted mean over the processes: the same number, so the same decision, on each.
        measured = self._measure(trainer, pl_module, batches)
        decision = Decision(self.schedule.record(measured["value"], self.dense_metric))
        metrics = {"pruning/metric": measured["value"], "pruning/dense_metric": self.dense_metric}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        if decision is Decision.ROLL_BACK_AND_STOP:
            self._roll_back(trainer, pl_module, measured, batches)
        self._unjudged = None

    def _roll_back(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        measured: dict[str, float],
        batches: list[Batch],
    ) -> None:
        """Restores the masks before the last step, and its channels' weights and statistics."""
        last = self._unjudged
        for unit in self.units:
            set_pruned_channels(pl_module, unit, _flags(last["masks"][unit.name]))
            revived = _flags(last["pruned"][unit.name])
            load_channel_state(pl_module, unit, revived, last["state"][unit.name])
        after = self._measure(trainer, pl_module, batches)
        entry = {
            **self._sparsity(trainer, pl_module, last["target"]),
            "rolled_back": True,
            "dense_metric": self.dense_metric,
            "value_before": measured["value"],
            "value_after": after["value"],
            "accuracy_before": measured["accuracy"],
            "accuracy_after": after["accuracy"],
        }
        self._append(pl_module, entry)
        rank_zero_info(
            f"ShapleyPruning: epoch {entry['epoch']}: the metric fell to {measured['value']:.4f} "
            f"from {self.dense_metric:.4f} dense; rolled back to sparsity "
            f"{entry['sparsity']:.3f} (target {last['target']:.3f}) and stopped pruning"
        )

    def _sparsity(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule, target: float
    ) -> dict[str, Any]:
        """Where the model stands now: sparsities, effective parameters and masks."""
        pruned = {unit.name: pruned_channels(pl_module, unit) for unit in self.units}
        total = sum(unit.n_channels for unit in self.units)
        removed = sum(int(p.sum()) for p in pruned.values())
        return {
            "epoch": trainer.current_epoch,
            "target_sparsity": target,
            "sparsity": removed / total,
            "unit_sparsity": {name: float(p.double().mean()) for name, p in pruned.items()},
            "parameters": _effective_parameters(pl_module),
            "masks": {name: p.tolist() for name, p in pruned.items()},
        }

    def _append(self, pl_module: lightning.LightningModule, entry: dict[str, Any]) -> None:
        """Adds an entry to the history and logs its numbers as ``pruning/*``."""
        self.history.append(entry)
        metrics = {f"pruning/{k}": float(v) for k, v in entry.items() if not isinstance(v, dict)}
        metrics |= {f"pruning/sparsity/{k}": v for k, v in entry["unit_sparsity"].items()}
        # The numbers agree on every process already; sync_dist keeps Lightning's epoch-level
        # reduction consistent with that (and keeps them usable as a monitor on every rank).
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
        if self.reporter is not None:
            self.reporter.after_step(pl_module.trainer, pl_module, self, entry)

    @override
    def on_fit_end(self, trainer: lightning.Trainer, pl_module: lightning.LightningModule) -> None:
        """Writes the export artifacts, then draws the run's figures and logs its charts."""
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
        metrics = {}
        for artifact in self.artifacts:
            numbers = {
                "size_bytes": artifact.size_bytes,
                "latency_ms": artifact.latency_ms,
                "parameters": artifact.parameters,
                "accuracy": artifact.accuracy,
            }
            metrics |= {
                f"export/{artifact.format}/{key}": float(number)
                for key, number in numbers.items()
                if number is not None
            }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.reporter is not None:
            dense = sum(
                t.numel() * t.element_size()
                for name, t in pl_module.state_dict().items()
                if not name.endswith("_mask")
            )
            sizes = {"masked (dense shapes)": dense}
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
        """The history, the schedule's state, the dense metric and any unjudged step.

        The history holds the masks after each entry; the unjudged step, what rolling it
        back needs (the masks before it, and its channels' weights and statistics).
        """
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
        self.dense_metric = state_dict.get("dense_metric")
        self._unjudged = state_dict.get("unjudged")
        self._pending_masks = self.history[-1]["masks"] if self.history else None

    @override
    def on_save_checkpoint(
        self,
        trainer: lightning.Trainer,
        pl_module: lightning.LightningModule,
        checkpoint: dict[str, Any],
    ) -> None:
        """Saves plain weights, ``weight = weight_orig * weight_mask``.

        The checkpoint then loads into a fresh model with no ``weight_orig`` or
        ``weight_mask`` keys; the masks travel in this callback's state.
        """
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.endswith("_orig")]:
            base = key[: -len("_orig")]
            mask = state.pop(f"{base}_mask", None)
            original = state.pop(key)
            state[base] = original if mask is None else original * mask


def _check_schedule(
    schedule: object, amount: float, epochs: int | Sequence[int] | None, ramp: str
) -> None:
    """A schedule must be one, and replaces ``amount``, ``epochs`` and ``ramp`` entirely."""
    if not isinstance(schedule, PruningSchedule):
        raise ValueError(
            f"schedule={schedule!r} is not a pruning schedule; it needs the methods target, "
            "validate, state_dict and load_state_dict (see lightning_shapley.pruning.schedule)"
        )
    settings = (("amount", amount, 0.5), ("epochs", epochs, None), ("ramp", ramp, "cubic"))
    given = [f"{name}={value!r}" for name, value, default in settings if value != default]
    if given:
        raise ValueError(
            f"schedule={schedule!r} replaces amount, epochs and ramp, but got {', '.join(given)} "
            "as well; pass either schedule= or those settings"
        )


def _restrict(state: dict[str, Tensor], saved: Tensor, wanted: Tensor) -> dict[str, Tensor]:
    """The part of a ``channel_state`` of the ``saved`` channels that holds ``wanted``."""
    rows = wanted[saved.nonzero().flatten()]
    return {key: tensor[rows] for key, tensor in state.items()}


def _judges_steps(schedule: PruningSchedule) -> bool:
    """Whether the schedule judges each step by the metric after it (``UntilDrop``)."""
    return callable(getattr(schedule, "record", None))


def _flags(values: list[bool]) -> Tensor:
    return torch.tensor(values, dtype=torch.bool)


def _effective_parameters(module: torch.nn.Module) -> int:
    """Parameters not held at zero by a pruning mask."""
    total = 0
    for name, parameter in module.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        mask = (
            getattr(owner, leaf.replace("_orig", "_mask"), None) if leaf.endswith("_orig") else None
        )
        total += int(mask.sum()) if isinstance(mask, Tensor) else parameter.numel()
    return total


# --------------------------------------------------------------------------- processes


def _is_sharded(loader: Iterable[Any]) -> bool:
    """Whether a loader gives each process its own part of the data already."""
    return isinstance(getattr(loader, "sampler", None), DistributedSampler)


def _shard(batches: list[Batch], shards: int, rank: int) -> list[Batch]:
    """This process's share: every ``shards``-th batch, the same number on every process."""
    if shards == 1:
        return batches
    per_process = len(batches) // shards
    if per_process == 0:
        rank_zero_warn(
            f"the scoring loader gave {len(batches)} batches for {shards} processes; every "
            "process scores on all of them (give the loader more batches to share them out)"
        )
        return batches
    return batches[rank::shards][:per_process]


def _samples(batches: list[Batch]) -> int:
    return sum(len(targets) for _, targets in batches)


def _sum_over_ranks(trainer: lightning.Trainer, tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over the processes, on the CPU (itself with one process)."""
    if trainer.world_size == 1:
        return tensor
    device = trainer.strategy.root_device
    return trainer.strategy.reduce(tensor.to(device), reduce_op="sum").cpu()


def _weighted_mean_over_ranks(trainer: lightning.Trainer, local: Tensor, weight: int) -> Tensor:
    """The mean of ``local`` over the processes, each weighted by ``weight``."""
    if trainer.world_size == 1:
        return local
    weighted = torch.cat([local * weight, torch.tensor([weight], dtype=local.dtype)])
    totals = _sum_over_ranks(trainer, weighted)
    return totals[:-1] / totals[-1]


def _max_over_ranks(trainer: lightning.Trainer, number: float) -> float:
    if trainer.world_size == 1:
        return number
    tensor = torch.tensor(number, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="max"))


def _mean_over_ranks(
    trainer: lightning.Trainer, scores: dict[str, ChannelScores], weight: int
) -> dict[str, ChannelScores]:
    """Each channel's score averaged over the processes, weighted by their scoring samples.

    The processes score the same channels with the same permutations on different batches,
    so their sampling errors are nearly perfectly correlated: the standard error of the
    mean is taken as the weighted mean of the standard errors, the bound for fully
    correlated errors. (``sqrt(sum of variances) / world_size`` assumes independent errors;
    on the digits CNN, with two halves of the scoring data and shared seeds, it understated
    the spread of the mean over 20 seeds by a factor of about 1.45, while the mean of the
    standard errors matched it within 6%.) Pruned channels, NaN on every process, stay
    NaN and add nothing to the others; evaluations add up.
    """
    if trainer.world_size == 1:
        return scores
    names = list(scores)
    values = torch.cat([scores[name].values for name in names])
    stderr = torch.cat([scores[name].stderr for name in names])
    in_play = ~values.isnan()
    local = torch.stack(
        [in_play.double(), torch.where(in_play, values, 0.0), torch.where(in_play, stderr, 0.0)]
    )
    weights, value_sums, stderr_sums = _sum_over_ranks(trainer, local * weight)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    mean_values = torch.where(weights > 0, value_sums / weights, nan)
    mean_stderr = torch.where(weights > 0, stderr_sums / weights, nan)
    evaluations = torch.tensor([scores[name].evaluations for name in names])
    evaluations = _sum_over_ranks(trainer, evaluations).tolist()
    sizes = [len(scores[name].values) for name in names]
    return {
        name: ChannelScores(v, e, n, scores[name].seconds)
        for name, v, e, n in zip(
            names, mean_values.split(sizes), mean_stderr.split(sizes), evaluations, strict=True
        )
    }


def _mean_statistics_over_ranks(
    trainer: lightning.Trainer, pl_module: lightning.LightningModule
) -> None:
    """Averages the re-estimated BatchNorm statistics over the processes, so they agree."""
    if trainer.world_size == 1:
        return
    for buffer in statistic_buffers(pl_module):
        buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))


def _from_rank_zero(trainer: lightning.Trainer, plan: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rank zero's plan, on every process."""
    if trainer.world_size == 1:
        return plan
    agreed = trainer.strategy.broadcast({name: p.tolist() for name, p in plan.items()}, src=0)
    return {name: torch.tensor(agreed[name], dtype=torch.bool) for name in plan}
