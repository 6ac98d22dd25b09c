"""Step-cost benchmark: the wall time of one default pruning step, before and after a change.

For each width ``w`` the digits CNN with channels ``w-w-2w`` (Conv-BN-ReLU, the package's
embedded model) is trained dense for 3 epochs by a real ``lightning.Trainer.fit`` on the
embedded digits (CPU, no logger, no checkpoints), and at the end of the last epoch a
``ShapleyPruning(amount=0.5, reporter=False)``, every other setting at its default, prunes
every unit to 50% in one step. Per width the table gives the channels in play (summed over
the units), the coalition evaluations the step made and its scoring time (the callback's
own ``scoring_seconds``), the median of ``--repeats`` fits; and whether both versions
pruned the same channels. The details table adds the wall clock of the whole
``on_train_epoch_end`` hook (scoring plus the measurements and fetches around it), the
dense test accuracy and the scoring accuracy after the step (``accuracy_after``).

Two versions of the package are measured in one run, taking turns fit by fit (so that a
machine busy for a while slows both alike): a baseline git ref, checked out with
``git worktree add`` into a temporary folder (removed at the end), and the working tree
(or, with ``--current-ref``, another ref). Each runs this same script as a worker
subprocess with ``PYTHONPATH`` pointing at its code and the working directory outside the
repository, the same seeds and ``torch.set_num_threads(--threads)``.

Run ``python benchmarks/step_cost.py`` (width 32, 3 repeats: about a minute on an idle
2-core machine). Wider networks cost far more per step (the channels to value times the
cost of each evaluation): on an idle machine the baseline's step took about 4 s at width
32 and 25-28 s at width 64, so ``--widths 32 64 --repeats 2`` runs about six minutes;
wider ones are left to an explicit ``--widths``. On a shared machine other jobs can
stretch a step several times over, even between repeats a minute apart: the details
table gives the fastest repeat too. It prints
markdown tables and writes ``benchmarks/results/step_cost.md`` and
``benchmarks/results/step_cost.json`` (``--out`` to change the stem).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_BASELINE = "d4a9b8d"
DEFAULT_WIDTHS = (32,)
AMOUNT = 0.5
SEED = 0


# --------------------------------------------------------------------------- worker


def _import_digits() -> tuple[Any, Any, Any]:
    """``DigitsDataModule``, ``DigitsCNN``, ``ImageClassifier``, wherever this version has them."""
    try:
        from lightning_shapley.app.data import DigitsDataModule
        from lightning_shapley.app.models import DigitsCNN, ImageClassifier
    except ImportError:
        # Before the restructuring they lived at the top of the package.
        from lightning_shapley.data import DigitsDataModule
        from lightning_shapley.models import DigitsCNN, ImageClassifier
    return DigitsDataModule, DigitsCNN, ImageClassifier


def _test_accuracy(module: Any, datamodule: Any) -> float:
    """Accuracy on the digits test split, the module left in the mode it was in."""
    import torch

    was_training = module.training
    module.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((module(x).argmax(dim=1) == y).sum())
            total += len(y)
    module.train(was_training)
    return correct / total


def _bracket(clock: dict[str, float], datamodule: Any, epoch: int) -> tuple[Any, Any]:
    """Two callbacks to put either side of the pruning callback, timing its epoch-end hook.

    Lightning calls the callbacks' hooks in list order, so the first one's hook runs just
    before the pruning's and the second one's just after.
    """
    from lightning.pytorch.callbacks import Callback

    class Before(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == epoch:
                clock["dense_test_accuracy"] = _test_accuracy(pl_module, datamodule)
                clock["start"], clock["start_cpu"] = time.perf_counter(), time.process_time()

    class After(Callback):
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == epoch:
                clock["step_cpu_seconds"] = time.process_time() - clock.pop("start_cpu")
                clock["step_seconds"] = time.perf_counter() - clock.pop("start")

    return Before(), After()


def _one_fit(width: int, epochs: int) -> dict[str, Any]:
    """Train a ``w-w-2w`` digits CNN and prune it to 50% at the end of its last epoch."""
    import lightning

    from lightning_shapley import ShapleyPruning

    DigitsDataModule, DigitsCNN, ImageClassifier = _import_digits()  # noqa: N806
    lightning.seed_everything(SEED, workers=True, verbose=False)
    module = ImageClassifier(DigitsCNN(channels=(width, width, 2 * width)))
    datamodule = DigitsDataModule(seed=SEED)
    pruning = ShapleyPruning(amount=AMOUNT, epochs=epochs - 1, reporter=False)
    clock: dict[str, float] = {}
    before, after = _bracket(clock, datamodule, epochs - 1)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # The callback fetches its scoring batches from the datamodule itself.
        limit_val_batches=0,
        callbacks=[before, pruning, after],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    step = pruning.history[-1]
    # One string per unit, "1" for a pruned channel, keeps the JSON readable.
    masks = {name: "".join("1" if p else "0" for p in mask) for name, mask in step["masks"].items()}
    return {
        "channels": sum(len(mask) for mask in masks.values()),
        "units": len(masks),
        "evaluations": int(step["evaluations"]),
        "scoring_seconds": float(step["scoring_seconds"]),
        "step_seconds": clock["step_seconds"],
        "step_cpu_seconds": clock["step_cpu_seconds"],
        "fit_seconds": fit_seconds,
        "sparsity": float(step["sparsity"]),
        "dense_test_accuracy": clock["dense_test_accuracy"],
        "pruned_test_accuracy": _test_accuracy(module, datamodule),
        "accuracy_before": float(step["accuracy_before"]),
        "accuracy_after": float(step["accuracy_after"]),
        "masks": masks,
    }


def worker(width: int, epochs: int, threads: int) -> None:
    """One fit with whatever ``lightning_shapley`` imports; its numbers as JSON on stdout."""
    import lightning
    import torch

    import lightning_shapley

    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning and the callback may print; only the JSON line may reach stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = _one_fit(width, epochs)
    info = {
        "package": str(Path(lightning_shapley.__file__).resolve().parent),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"info": info, "result": {"width": width, **result}}))


# --------------------------------------------------------------------------- driver


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _commit(ref: str) -> str:
    return _git("rev-parse", "--verify", f"{ref}^{{commit}}")


@contextlib.contextmanager
def checked_out(ref: str) -> Iterator[Path]:
    """A detached worktree of ``ref`` in a temporary folder, removed on the way out."""
    folder = Path(tempfile.mkdtemp(prefix="step-cost-"))
    tree = folder / "tree"
    try:
        _git("worktree", "add", "--detach", str(tree), ref)
        yield tree
    finally:
        try:
            _git("worktree", "remove", "--force", str(tree))
        except subprocess.CalledProcessError:
            # A half-made worktree: drop the files, then git's record of it.
            shutil.rmtree(tree, ignore_errors=True)
            _git("worktree", "prune")
        shutil.rmtree(folder, ignore_errors=True)


def run_worker(
    root: Path, width: int, args: argparse.Namespace, workdir: Path
) -> tuple[dict, dict]:
    """Run :func:`worker` in a subprocess importing the package from ``root``.

    Raises:
        RuntimeError: If the worker fails, or imported the package from somewhere else.
    """
    env = dict(os.environ, PYTHONPATH=str(root))
    # Thread pools sized before torch starts must match too.
    env |= {name: str(args.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--widths",
        str(width),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
    ]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"the worker for {root} at width {width} failed (exit {done.returncode}):\n"
            f"{done.stderr[-4000:]}"
        )
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    # An installed copy of the package would otherwise be measured silently.
    if Path(reply["info"]["package"]) != (root / "lightning_shapley").resolve():
        raise RuntimeError(
            f"the worker imported lightning_shapley from {reply['info']['package']}, "
            f"not from {root}"
        )
    return reply["info"], reply["result"]


def describe_versions(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """What ``before`` and ``after`` are: refs, commits, and whether the tree was edited."""
    versions = {"before": {"ref": args.baseline, "commit": _commit(args.baseline)}}
    if args.current_ref is None:
        edited = bool(_git("status", "--porcelain", "--untracked-files=no"))
        versions["after"] = {
            "ref": "working tree",
            "commit": _commit("HEAD"),
            "uncommitted_changes": edited,
        }
    else:
        versions["after"] = {"ref": args.current_ref, "commit": _commit(args.current_ref)}
    return versions


TIMED = ("scoring_seconds", "step_seconds", "step_cpu_seconds", "fit_seconds")


def summarize(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """One version's numbers at one width: the medians of the timings, the rest of fit one.

    Args:
        fits: the workers' results, one per repeat.

    Returns:
        The first fit's numbers with each timing replaced by its median over the fits
        (the least under ``<timing>_min``, every fit's under ``<timing>_all``) and whether
        the fits agree.
    """
    first = fits[0]
    summary = {key: value for key, value in first.items() if key not in TIMED}
    for key in TIMED:
        summary[key] = statistics.median(fit[key] for fit in fits)
        summary[f"{key}_min"] = min(fit[key] for fit in fits)
        summary[f"{key}_all"] = [fit[key] for fit in fits]
    # Training and scoring are seeded: a repeat that chose differently would not be a repeat.
    summary["repeats_agree"] = all(
        fit["masks"] == first["masks"] and fit["evaluations"] == first["evaluations"]
        for fit in fits
    )
    return summary


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One row of the comparison: both versions' numbers and the ratios between them."""
    return {
        "width": before["width"],
        "channels": before["channels"],
        "speedup": before["scoring_seconds"] / after["scoring_seconds"],
        "step_speedup": before["step_seconds"] / after["step_seconds"],
        "step_cpu_speedup": before["step_cpu_seconds"] / after["step_cpu_seconds"],
        "fastest_speedup": before["scoring_seconds_min"] / after["scoring_seconds_min"],
        "same_masks": before["masks"] == after["masks"],
        "before": before,
        "after": after,
    }


def _label(version: dict[str, Any]) -> str:
    if version["ref"] == "working tree":
        edited = " + uncommitted changes" if version["uncommitted_changes"] else ""
        return f"the working tree (HEAD {version['commit'][:7]}{edited})"
    if version["commit"].startswith(version["ref"]):
        return f"`{version['commit'][:7]}`"
    return f"`{version['ref']}` ({version['commit'][:7]})"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown(rows: list[dict[str, Any]], versions: dict, settings: dict[str, Any]) -> str:
    """The two tables, under a header saying what was measured on what."""
    lines = [
        "# Cost of one default pruning step, before and after",
        "",
        f"Before: {_label(versions['before'])}. After: {_label(versions['after'])}.",
        "",
        f"Digits CNNs w-w-2w trained dense for {settings['epochs']} epochs, then one "
        f"`ShapleyPruning(amount={AMOUNT})` step at its defaults at the end of the last; "
        f"median of {settings['repeats']} fits per version, the versions taking turns; "
        f"{settings['threads']} torch threads, torch {settings['torch']}, lightning "
        f"{settings['lightning']}, {settings['machine']}.",
        "",
        "| width | channels | evaluations (before, after) | scoring s (before, after) "
        "| speed-up | same masks |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        b, a = row["before"], row["after"]
        lines.append(
            f"| {row['width']} | {row['channels']} | {b['evaluations']}, {a['evaluations']} "
            f"| {b['scoring_seconds']:.2f}, {a['scoring_seconds']:.2f} "
            f"| {row['speedup']:.2f}x | {_yes(row['same_masks'])} |"
        )
    lines += [
        "",
        "Details: the whole epoch-end hook (scoring, plus the measurements before and after "
        "it and fetching the recalibration batches) in wall-clock and process CPU seconds, "
        "the fastest repeat's scoring time (other jobs on a shared machine only ever slow a "
        "step down), the dense test accuracy, the scoring accuracy after the step "
        "(`accuracy_after`), and whether every repeat of each version chose the same channels.",
        "",
        "| width | hook s (before, after) | hook CPU s (before, after) "
        "| fastest scoring s (before, after) | fastest speed-up "
        "| dense test acc (before, after) | scoring acc after step (before, after) "
        "| repeats agree |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        b, a = row["before"], row["after"]
        lines.append(
            f"| {row['width']} | {b['step_seconds']:.2f}, {a['step_seconds']:.2f} "
            f"| {b['step_cpu_seconds']:.2f}, {a['step_cpu_seconds']:.2f} "
            f"| {b['scoring_seconds_min']:.2f}, {a['scoring_seconds_min']:.2f} "
            f"| {row['fastest_speedup']:.2f}x "
            f"| {b['dense_test_accuracy']:.4f}, {a['dense_test_accuracy']:.4f} "
            f"| {b['accuracy_after']:.4f}, {a['accuracy_after']:.4f} "
            f"| {_yes(b['repeats_agree'] and a['repeats_agree'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref measured first")
    parser.add_argument(
        "--current-ref",
        default=None,
        help="git ref measured second instead of the working tree",
    )
    parser.add_argument("--repeats", type=int, default=3, help="fits per width and version")
    parser.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    parser.add_argument("--epochs", type=int, default=3, help="dense epochs before the step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "step_cost",
        help="stem of the results: <out>.md and <out>.json",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.repeats, args.epochs, args.threads, *args.widths) < 1:
        parser.error("--repeats, --epochs, --threads and --widths must be positive")
    if args.worker:
        worker(args.widths[0], args.epochs, args.threads)
        return

    try:
        versions = describe_versions(args)
    except subprocess.CalledProcessError as error:
        parser.error(f"git could not resolve a ref: {error.stderr.strip()}")
    rows = []
    with contextlib.ExitStack() as stack:
        roots = {"before": stack.enter_context(checked_out(args.baseline))}
        roots["after"] = (
            REPO if args.current_ref is None else stack.enter_context(checked_out(args.current_ref))
        )
        # Outside the repository, so that the working tree is not importable from the cwd.
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="step-cost-")))
        for width in args.widths:
            fits: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
            for repeat in range(args.repeats):
                # Taking turns, so that a machine busy for a while slows both versions alike.
                for name, root in roots.items():
                    start = time.perf_counter()
                    info, fit = run_worker(root, width, args, workdir)
                    fits[name].append(fit)
                    seconds = time.perf_counter() - start
                    print(
                        f"width {width}, {name}, repeat {repeat + 1}/{args.repeats}: "
                        f"{fit['evaluations']} evaluations, scoring "
                        f"{fit['scoring_seconds']:.2f} s (worker {seconds:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            rows.append(compare(summarize(fits["before"]), summarize(fits["after"])))

    settings = {
        "epochs": args.epochs,
        "repeats": args.repeats,
        "threads": info["threads"],
        "torch": info["torch"],
        "lightning": info["lightning"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "amount": AMOUNT,
        "seed": SEED,
    }
    table = markdown(rows, versions, settings)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table)
    report = {"versions": versions, "settings": settings, "rows": rows}
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
