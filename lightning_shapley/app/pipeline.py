"""One job of ``lightning-shapley``: build, train and prune, test, export, report.

:func:`build` makes the objects a configuration names and refuses a bad setting with
:class:`SettingError` before any training; :func:`run` then trains the model, pruning it on
schedule while it fine-tunes, tests the dense model (as it was just before the first
pruning step) and the pruned one, exports the pruned model, prints the summary and writes
``result.json`` into the job's output folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_shapley import export
from lightning_shapley.app.summary import RESULT_FILE, format_summary
from lightning_shapley.checks import is_int
from lightning_shapley.pruning import record
from lightning_shapley.pruning.scorers import ShapleyScorer

log = logging.getLogger(__name__)


class SettingError(Exception):
    """A setting the run cannot take, found before any training."""


@dataclasses.dataclass
class Job:
    """The objects of one run, built and checked before any training."""

    cfg: DictConfig
    datamodule: lightning.LightningDataModule
    module: lightning.LightningModule
    pruning: Any  # ShapleyPruning
    snapshot: DenseSnapshot
    trainer: lightning.Trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs the pipeline of one job and returns its result (also written as ``result.json``).

    Args:
        cfg: the composed job configuration (``conf/config.yaml`` and its groups).

    Returns:
        The result: dense and pruned test accuracy and parameters, sparsity, per-layer
        channels and parameters, scoring seconds and evaluations, exported artifacts.

    Raises:
        SettingError: if a setting is refused, always before the first training step.
    """
    started = time.perf_counter()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    _set_threads(cfg.threads)
    _check_seed(cfg.seed)
    lightning.seed_everything(cfg.seed, workers=True)  # before building: weights are drawn
    job = build(cfg)
    for logger in job.trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    try:
        job.trainer.fit(job.module, datamodule=job.datamodule)
    except Exception as error:
        # The callback checks the model, layers and epochs when fit sets up; a failure
        # before the first epoch began is a setting the run cannot take.
        if job.snapshot.training_started:
            raise
        raise SettingError(f"refused before training: {_describe(error)}") from error

    dense_metrics = _test_dense(job)
    (pruned_metrics,) = job.trainer.test(job.module, datamodule=job.datamodule, verbose=False)
    if not job.trainer.is_global_zero:
        return {}
    result = _result(job, dense_metrics, pruned_metrics, output_dir)
    result["seconds"] = time.perf_counter() - started
    (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    _log_summary(job, result)
    print(format_summary(result))
    return result


def build(cfg: DictConfig) -> Job:
    """Builds the data, model, pruning callback, loggers and trainer; checks their settings.

    Raises:
        SettingError: naming the config node and what its constructor refused.
    """
    _check_export(cfg.export)
    datamodule = _instantiate(cfg.data, "data")
    module = _instantiate(cfg.model, "model")
    pruning = _instantiate(cfg.pruning, "pruning")
    loggers = [
        _instantiate(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()
    ]
    snapshot = DenseSnapshot(_first_step_epoch(pruning.schedule, cfg.trainer.get("max_epochs")))
    make_trainer = _instantiate(cfg.trainer, "trainer", _partial_=True)
    try:
        # The snapshot goes first: at the first step's epoch end it must see the dense model.
        trainer = make_trainer(callbacks=[snapshot, pruning], logger=loggers or False)
    except Exception as error:
        raise SettingError(f"trainer: {_describe(error)}") from error
    _check_launcher(trainer)
    return Job(cfg, datamodule, module, pruning, snapshot, trainer)


def _check_launcher(trainer: lightning.Trainer) -> None:
    """Refuses the process launchers this pipeline cannot run under."""
    launcher_object = getattr(trainer.strategy, "launcher", None)
    launcher = type(launcher_object).__name__
    strategy = type(trainer.strategy).__name__
    if launcher == "_MultiProcessingLauncher":
        # ddp_spawn / ddp_fork: fit runs in new processes, and the pruning history and the
        # dense snapshot stay there; the summary and the dense test need them here.
        raise SettingError(
            f"trainer: {strategy} with a spawning launcher (ddp_spawn, ddp_fork, "
            "ddp_notebook) is not supported here: the pruning history stays in the spawned "
            "processes; use strategy=ddp (trainer=ddp)"
        )
    extra_processes = getattr(launcher_object, "num_processes", 1) > 1
    if (
        launcher == "_SubprocessScriptLauncher"
        and extra_processes
        and HydraConfig.get().mode == RunMode.MULTIRUN
    ):
        # Lightning starts each extra process by re-running the command line: the sweep too.
        raise SettingError(
            "trainer: strategy=ddp on several devices cannot run inside a local multirun "
            "(Lightning re-runs the whole command line, sweep included, for each process); "
            "run the sweep with hydra/launcher=slurm, where SLURM starts one process per "
            "device, or run its jobs one by one without -m"
        )


def _instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    try:
        return hydra.utils.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        where = _full_key(str(error)) or key
        raise SettingError(f"{where}: {_describe(cause)}") from error
    except Exception as error:
        raise SettingError(f"{key}: {_describe(error)}") from error


def _full_key(message: str) -> str | None:
    # Hydra ends an instantiation error with "full_key: <node>": the nested node at fault.
    _, found, rest = message.rpartition("full_key: ")
    return rest.strip() if found and rest.strip() else None


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = " ".join(line.strip() for line in text) if text else ""
    return first if isinstance(error, ValueError) else f"{type(error).__name__}: {first}"


def _check_export(formats: Any) -> None:
    """An empty or null ``export`` writes nothing; anything else must name known formats."""
    if not formats:
        return
    listed = list(formats) if OmegaConf.is_list(formats) else formats
    try:
        export.check_formats(listed, setting="export")
    except ValueError as error:
        raise SettingError(str(error)) from None


def _check_seed(seed: Any) -> None:
    # Lightning seeds numpy too, which takes 0 to 2**32 - 1 only.
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise SettingError(f"seed={seed!r} is not allowed; it must be an integer in [0, 2**32)")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        threads = _joblib_share()
    if threads is None:
        return
    if not is_int(threads) or threads < 1:
        raise SettingError(f"threads={threads!r} is not allowed; use a positive integer or null")
    torch.set_num_threads(threads)


def _joblib_share() -> int | None:
    """Cores per job in a joblib sweep (``n_jobs`` jobs at once), else None."""
    launcher = HydraConfig.get().get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    cores = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1: all cores
    return max(1, cores // parallel)


def _first_step_epoch(schedule: Any, max_epochs: int | None) -> int | None:
    """The epoch at whose end the schedule first prunes (asked of a copy: some keep state)."""
    probe = copy.deepcopy(schedule)
    limit = max_epochs if isinstance(max_epochs, int) and max_epochs > 0 else 100_000
    return next((e for e in range(limit) if probe.target(e) is not None), None)


class DenseSnapshot(Callback):
    """Keeps the weights at the end of ``epoch``, before the pruning callback's first step.

    Put it before the pruning callback in the trainer's callbacks: Lightning calls their
    ``on_train_epoch_end`` in that order, so the copy is the dense model as it was pruned.

    Args:
        epoch: the first step's epoch; None keeps nothing (the model is never pruned).
    """

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch
        self.state: dict[str, torch.Tensor] | None = None
        self.training_started = False

    def on_train_start(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Marks that setup passed: a later failure is no longer a refused setting."""
        self.training_started = True

    def on_train_epoch_end(
        self, trainer: lightning.Trainer, pl_module: lightning.LightningModule
    ) -> None:
        """Copies the weights (to the CPU) at the end of the first step's epoch."""
        if trainer.current_epoch == self.epoch:
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


def _test_dense(job: Job) -> dict[str, float]:
    """Test metrics of the dense snapshot, kept out of the loggers (their test/* is pruned)."""
    if job.snapshot.state is None:
        log.warning("no pruning step ran: the dense and the pruned model are the same")
        dense = job.module
    else:
        dense = _instantiate(job.cfg.model, "model")
        dense.load_state_dict(job.snapshot.state)
    loggers, job.trainer.loggers = job.trainer.loggers, []
    try:
        (metrics,) = job.trainer.test(dense, datamodule=job.datamodule, verbose=False)
    finally:
        job.trainer.loggers = loggers
    job.dense_module = dense  # type: ignore[attr-defined]
    return metrics


# --------------------------------------------------------------------------- the result


def _result(
    job: Job, dense_metrics: dict[str, float], pruned_metrics: dict[str, float], output_dir: Path
) -> dict[str, Any]:
    cfg, pruning = job.cfg, job.pruning
    history = [h for h in pruning.history if not h.get("rolled_back")]
    final = pruning.history[-1] if pruning.history else None
    test_batches = [pruning.batch_transform(b) for b in job.datamodule.test_dataloader()]
    example = test_batches[0][0]
    dense = getattr(job, "dense_module", job.module)

    try:
        compacted = export.compact(job.module, example)
    except ValueError as error:  # a model whose pruned channels cannot be cut out
        log.warning(f"no per-layer parameters: {error}")
        compacted = None
    dense_parameters = sum(p.numel() for p in dense.parameters())
    if compacted is not None:
        pruned_parameters = sum(p.numel() for p in compacted.parameters())
    else:
        pruned_parameters = final["parameters"] if final else dense_parameters

    hydra_cfg = HydraConfig.get()
    scorer = getattr(pruning.scorer, "name", type(pruning.scorer).__name__)
    result: dict[str, Any] = {
        "job": {
            "num": hydra_cfg.job.get("num") if hydra_cfg.mode == RunMode.MULTIRUN else None,
            "overrides": list(hydra_cfg.overrides.task),
            "dir": str(output_dir),
        },
        "scorer": scorer,
        "estimator": _estimator(pruning.scorer) if scorer == "shapley" else None,
        "value": OmegaConf.to_container(cfg.pruning, resolve=True).get("value"),
        "amount": pruning.amount,
        "scope": pruning.scope,
        # How a step removes its channels: the callback's rounds.
        "rounds": {
            name: getattr(pruning, name) for name in ("removal_step", "interleave", "recalibrate")
        }
        # What a round re-values in effect: a criterion that cannot value a few scores all.
        | {"rescore": pruning.rescore if pruning.scorer.takes_candidates else "all"},
        "schedule": repr(pruning.schedule),
        "seed": cfg.seed,
        "dense": {
            "test_accuracy": _accuracy(dense_metrics),
            "test_metrics": dense_metrics,
            "parameters": dense_parameters,
        },
        "pruned": {
            "test_accuracy": _accuracy(pruned_metrics),
            "test_metrics": pruned_metrics,
            "parameters": pruned_parameters,
            "masked_parameters": final["parameters"] if final else dense_parameters,
            "sparsity": final["sparsity"] if final else 0.0,
        },
        "layers": _layer_rows(dense, compacted, final),
        "units": {
            name: {"channels": len(mask), "pruned": sum(mask), "sparsity": sum(mask) / len(mask)}
            for name, mask in (final["masks"] if final else {}).items()
        },
        "scoring": {
            "steps": len(history),
            "seconds": sum(h.get("scoring_seconds", 0.0) for h in history),
            "evaluations": sum(h.get("evaluations", 0) for h in history),
        },
        "steps": [record.scalars(h) for h in pruning.history],
        "export": _export(cfg, job.module, example, test_batches, output_dir / "export"),
        "export_batch_size": len(example),  # the latencies are per forward of this batch
    }
    return result


def _estimator(scorer: ShapleyScorer) -> dict[str, Any]:
    """The Shapley scorer's estimator as it was resolved (not as the config spelled it)."""
    options = dict(scorer.estimator.options)
    return {
        "method": scorer.estimator.method,
        "weighting": scorer.weighting.name,
        "depth": scorer.weighting.depth,
        "num_permutations": options.pop("num_permutations", None),  # None: exact, no budget
        "options": {name: value for name, value in options.items() if name != "seed"},
    }


def _accuracy(metrics: dict[str, float]) -> float | None:
    """The test accuracy among a module's logged test metrics (``test/acc`` for ours)."""
    for key in ("test/acc", "test_acc", "test/accuracy", "test_accuracy"):
        if key in metrics:
            return float(metrics[key])
    found = [k for k in metrics if "acc" in k.lower()]
    return float(metrics[found[0]]) if found else None


def _layer_rows(
    dense: torch.nn.Module, compacted: torch.nn.Module | None, final: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Channels and parameters of every layer with parameters, dense and pruned.

    With the compacted model the numbers are physical (a consumer also loses the input
    channels its producer lost); without it, only the pruned units' channels are known.
    """
    if compacted is None:
        masks = final["masks"] if final else {}
        return [
            {
                "layer": name,
                "kind": None,
                "channels": len(m),
                "kept": len(m) - sum(m),
                "parameters_dense": None,
                "parameters_pruned": None,
            }
            for name, m in masks.items()
        ]
    small = dict(compacted.named_modules())
    rows = []
    for name, module in dense.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or name not in small:
            continue
        pruned_own = list(small[name].parameters(recurse=False))
        rows.append(
            {
                "layer": name,
                "kind": type(module).__name__,
                "channels": own[0].shape[0] if own[0].dim() else 1,
                "kept": pruned_own[0].shape[0] if pruned_own[0].dim() else 1,
                "parameters_dense": sum(p.numel() for p in own),
                "parameters_pruned": sum(p.numel() for p in pruned_own),
            }
        )
    return rows


def _export(
    cfg: DictConfig,
    module: torch.nn.Module,
    example: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    directory: Path,
) -> list[dict[str, Any]]:
    formats = list(cfg.export or [])
    if not formats:
        return []
    artifacts = export.export_artifacts(
        module, example, directory, formats=tuple(formats), batches=batches
    )
    return [dataclasses.asdict(a) | {"path": str(a.path)} for a in artifacts]


def _log_summary(job: Job, result: dict[str, Any]) -> None:
    """The headline numbers, as ``summary/*`` metrics of every logger."""
    metrics = {
        "summary/dense_test_acc": result["dense"]["test_accuracy"],
        "summary/pruned_test_acc": result["pruned"]["test_accuracy"],
        "summary/sparsity": result["pruned"]["sparsity"],
        "summary/dense_parameters": result["dense"]["parameters"],
        "summary/pruned_parameters": result["pruned"]["parameters"],
        "summary/scoring_seconds": result["scoring"]["seconds"],
        "summary/evaluations": result["scoring"]["evaluations"],
    }
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    for logger in job.trainer.loggers:
        logger.log_metrics(metrics, step=job.trainer.global_step)
        logger.save()
        if isinstance(logger, WandbLogger):
            # Ends the run: the next job of a multirun in this process starts its own.
            logger.experiment.finish()
