"""PruningReporter: the figures as PNG files, W&B charts read back from the offline run file,
TensorBoard images, and the pure figure functions."""

import json
import math
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb_offline import finished_records, history

from lightning_shapley import ChannelGame
from lightning_shapley.app.data import DigitsDataModule
from lightning_shapley.app.models import DigitsCNN, ImageClassifier
from lightning_shapley.callback import ShapleyPruning
from lightning_shapley.pruning.units import find_units
from lightning_shapley.reporting import (
    FIGURES,
    MAX_SIZES,
    STEP_COLUMNS,
    PruningReporter,
    accuracy_steps_figure,
    architecture_figure,
    coalition_size_figure,
    coalition_values_by_size,
    model_size_figure,
    ranked_values_figure,
    step_rows,
)

CHANNELS = (16, 16, 32)
UNITS = ("net.features.0", "net.features.3", "net.features.7")
CURVES = ("accuracy_before", "accuracy_after", "loss_before", "loss_after", "parameters")


def make_pruning(reporter: PruningReporter, **options) -> ShapleyPruning:
    return ShapleyPruning(reporter=reporter, **options)


def fit(tmp_path: Path, logger, reporter: PruningReporter, **options) -> ShapleyPruning:
    """Three short epochs on the digits, pruning at the end of epochs 0 and 1 (cheap scoring)."""
    torch.manual_seed(0)
    module = ImageClassifier(DigitsCNN(channels=CHANNELS))
    settings = {"amount": 0.5, "epochs": [0, 1], "method": "permutation", "num_permutations": 4}
    settings |= options
    pruning = make_pruning(reporter, **settings)
    trainer = lightning.Trainer(
        max_epochs=3,
        callbacks=[pruning],
        default_root_dir=tmp_path,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=4,
        limit_val_batches=2,
        deterministic=True,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return pruning


def assert_pngs(directory: Path, names=FIGURES) -> None:
    for name in names:
        path = directory / f"{name}.png"
        assert path.is_file(), f"{path} was not written"
        assert path.stat().st_size > 10_000, f"{path} is nearly empty"


def newly_pruned(entry: dict, unit: str) -> int:
    values, masks = entry["values"][unit], entry["masks"][unit]
    return sum(m and math.isfinite(v) for v, m in zip(values, masks, strict=True))


# --------------------------------------------------------------------------- loggers


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory):
    """One fit logging to W&B (offline, read back from its run file), TensorBoard and CSV."""
    import wandb

    tmp_path = tmp_path_factory.mktemp("logged_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            patch.setenv(name, str(tmp_path / "wandb_home"))
        reporter = PruningReporter()
        wandb_logger = WandbLogger(save_dir=tmp_path, offline=True, group="sweep-a")
        tensorboard = TensorBoardLogger(tmp_path, name="tb")
        try:
            loggers = [wandb_logger, tensorboard, CSVLogger(tmp_path, name="csv")]
            pruning = fit(tmp_path, loggers, reporter)
            reporter.add_sizes({"dense": 40_000, "compact": 20_000, "compact+int8": 6_000})
            run_dir = Path(wandb_logger.experiment.dir).parent
        finally:
            wandb.finish()  # a run left open would be reused by the next WandbLogger
    (run_file,) = run_dir.glob("run-*.wandb")
    records = finished_records(run_file)
    return {
        "tmp_path": tmp_path,
        "reporter": reporter,
        "pruning": pruning,
        "run_dir": run_dir,
        "rows": history(records),
        "records": records,
        "tensorboard": tensorboard.log_dir,
    }


def test_wandb_logs_the_pruning_curves_against_the_sparsity(logged_run) -> None:
    steps, rows = logged_run["pruning"].history, logged_run["rows"]
    assert len(steps) == 2
    curve = [row for row in rows if "pruning/curve/sparsity" in row]
    assert [row["pruning/curve/sparsity"] for row in curve] == [e["sparsity"] for e in steps]
    for row, entry in zip(curve, steps, strict=True):
        assert all(f"pruning/curve/{name}" in row for name in CURVES)
        assert row["pruning/curve/accuracy_after"] == pytest.approx(entry["accuracy_after"])
        # value="loss": the loss is minus the callback's value, before and after the step.
        assert row["pruning/curve/loss_before"] == pytest.approx(-entry["value_before"])
        assert row["pruning/curve/parameters"] == entry["parameters"]
    records = logged_run["records"]
    axes = {r.metric.name: r.metric.step_metric for r in records if r.HasField("metric")}
    assert all(axes[f"pruning/curve/{name}"] == "pruning/curve/sparsity" for name in CURVES)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.run_group == "sweep-a"


def test_wandb_logs_a_ranked_bar_chart_and_figure_per_unit_and_step(logged_run) -> None:
    steps, rows, charts = (
        logged_run["pruning"].history,
        logged_run["rows"],
        custom_charts(logged_run),
    )
    for step, entry in enumerate(steps, start=1):
        for unit in UNITS:
            key = f"pruning/channel_values/{unit}/step_{step}"
            assert charts[key]["panelDefId"] == "wandb/bar/v0"
            (row,) = [row for row in rows if f"{key}_table/_type" in row]
            assert row[f"{key}_table/_type"] == "table-file"
            table = json.loads(
                (logged_run["run_dir"] / "files" / row[f"{key}_table/path"]).read_text()
            )
            live = [v for v in entry["values"][unit] if math.isfinite(v)]
            values = [r[table["columns"].index("value")] for r in table["data"]]
            assert values == sorted(live, reverse=True)
            pruned = table["columns"].index("pruned")
            assert sum(r[pruned] for r in table["data"]) == newly_pruned(entry, unit)
    images = [r for r in rows if r.get("pruning/ranked_values/_type") == "image-file"]
    assert [image["pruning/ranked_values/caption"] for image in images] == [
        f"step {step}, epoch {entry['epoch']}" for step, entry in enumerate(steps, start=1)
    ]


def test_wandb_logs_the_table_line_charts_and_figures_at_fit_end(logged_run) -> None:
    steps, rows, charts = (
        logged_run["pruning"].history,
        logged_run["rows"],
        custom_charts(logged_run),
    )
    (table_row,) = [row for row in rows if "pruning/steps/_type" in row]
    assert table_row["pruning/steps/_type"] == "table-file"
    assert table_row["pruning/steps/nrows"] == len(steps)
    assert table_row["pruning/steps/ncols"] == len(STEP_COLUMNS)
    for quantity in ("accuracy", "loss", "parameters"):
        for axis in ("sparsity", "step"):
            chart = charts[f"pruning/charts/{quantity}_vs_{axis}"]
            assert chart["panelDefId"] == "wandb/lineseries/v0"
    (chart_row,) = [row for row in rows if "pruning/charts/accuracy_vs_step_table/path" in row]
    path = logged_run["run_dir"] / "files" / chart_row["pruning/charts/accuracy_vs_step_table/path"]
    table = json.loads(path.read_text())
    series = [row[table["columns"].index("lineKey")] for row in table["data"]]
    # Both steps were fine-tuned (the last for the final epoch): three series of two points.
    assert sorted(set(series)) == ["after fine-tuning", "after pruning", "before pruning"]
    assert all(series.count(name) == len(steps) for name in set(series))
    for name in FIGURES:
        logged = [row for row in rows if row.get(f"pruning/figures/{name}/_type") == "image-file"]
        # The model size figure is sent again once add_sizes gives the bytes.
        assert len(logged) == (2 if name == "model_size" else 1)
    (sizes_row,) = [row for row in rows if "pruning/sizes/_type" in row]
    assert sizes_row["pruning/sizes/nrows"] == 3
    # The PNG files go to the first logger's folder (W&B's save_dir).
    directory = logged_run["tmp_path"] / "pruning_figures"
    assert_pngs(directory)
    assert logged_run["reporter"].paths["model_size"] == directory / "model_size.png"


def test_tensorboard_gets_every_figure(logged_run) -> None:
    events = EventAccumulator(logged_run["tensorboard"], size_guidance={"images": 0})
    events.Reload()
    tags = set(events.Tags()["images"])
    assert {f"pruning/figures/{name}" for name in FIGURES} <= tags
    steps = len(logged_run["pruning"].history)
    assert len(events.Images("pruning/ranked_values")) == steps
    assert len(events.Images("pruning/figures/model_size")) == 2  # again after add_sizes


def custom_charts(logged_run) -> dict[str, dict]:
    """The W&B custom charts (bar, line series) of the run, by key, from its config."""
    charts = {}
    for record in logged_run["records"]:
        for item in record.config.update if record.HasField("config") else ():
            if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                charts[item.nested_key[2]] = json.loads(item.value_json)["panel_config"]
    return charts


def test_without_figures_only_the_numbers_and_a_measured_loss(tmp_path: Path) -> None:
    reporter = PruningReporter(directory=tmp_path / "figures", figures=False)
    # value="accuracy": the loss is not the value, so the reporter measures it after a step.
    pruning = fit(tmp_path, CSVLogger(tmp_path, name="csv"), reporter, value="accuracy")

    assert not reporter.curves
    assert not (tmp_path / "figures").exists()
    rows = step_rows(pruning.history, reporter.final, False, reporter._losses_after)
    assert [row["loss_before"] for row in rows] == [None, None]
    assert all(row["loss_after"] > 0 for row in rows)
    assert rows[-1]["accuracy_finetuned"] == reporter.final["accuracy"]
    assert rows[0]["accuracy_finetuned"] == pruning.history[1]["accuracy_before"]


# --------------------------------------------------------------------------- pure functions


def test_coalition_values_by_size_follows_random_orderings(trained_cnn, score_batches) -> None:
    unit = find_units(trained_cnn, score_batches[0][0])[1]
    layers = (*unit.producers, *unit.batchnorms)
    curve = coalition_values_by_size(trained_cnn, layers, score_batches, samples=5, seed=3)

    n = unit.n_channels
    assert curve.n_players == n
    assert curve.sizes[0] == 0 and curve.sizes[-1] == n
    assert len(curve.sizes) == min(n + 1, MAX_SIZES)
    assert curve.values.shape == (len(curve.sizes), 5)
    game = ChannelGame(trained_cnn, layers, score_batches)
    ends = game(torch.tensor([[False] * n, [True] * n]))
    # Every ordering starts at the empty coalition and ends at the full one.
    assert torch.allclose(curve.values[0], ends[0].expand(5))
    assert torch.allclose(curve.values[-1], ends[1].expand(5))
    assert curve.mean[-1] > curve.mean[0]
    assert curve.std[0] == 0 and curve.std[len(curve.sizes) // 2] > 0

    again = coalition_values_by_size(trained_cnn, layers, score_batches, samples=5, seed=3)
    assert torch.equal(again.values, curve.values)
    few = coalition_values_by_size(trained_cnn, layers, score_batches, sizes=[n, 0, 4], samples=2)
    assert few.sizes == (0, 4, n)
    with pytest.raises(ValueError, match="samples=0"):
        coalition_values_by_size(trained_cnn, layers, score_batches, samples=0)
    with pytest.raises(ValueError, match="between 0 and"):
        coalition_values_by_size(trained_cnn, layers, score_batches, sizes=[n + 1])


def test_ranked_values_figure_leaves_out_earlier_pruned_and_marks_this_steps(
    tmp_path: Path,
) -> None:
    nan = math.nan
    values = {"a": [0.5, nan, -0.1, 0.2, 0.05], "b": [1.0, 2.0], "c": [nan, nan]}
    stderr = {"a": [0.1, nan, 0.05, 0.02, 0.01], "b": [0.0, 0.0], "c": [nan, nan]}
    pruned = {"a": [False, True, True, False, True], "b": [False, False], "c": [True, False]}
    figure = ranked_values_figure(values, stderr, pruned, value_label="Shapley value (nats)")

    first, second, third = figure.axes[:3]
    heights = [bar.get_height() for bar in first.patches]
    assert heights == [0.5, 0.2, 0.05, -0.1]  # ranked, the NaN channel left out
    red = [bar.get_facecolor() != first.patches[0].get_facecolor() for bar in first.patches]
    assert red == [False, False, True, True]
    assert [t.get_text() for t in first.get_xticklabels()] == ["0", "3", "4", "2"]
    # Pruned channels are marked beyond their bar's colour: red tick labels and a marker.
    colors = [t.get_color() for t in first.get_xticklabels()]
    assert colors == ["black", "black", "tab:red", "tab:red"]
    (markers,) = [c for c in first.collections if isinstance(c, PathCollection)]
    assert markers.get_offsets().tolist() == [[3, 0.05], [4, -0.1]]
    assert first.get_title() == "a: 2 of 4 pruned now, 1 before"
    assert second.get_title() == "b: 0 of 2 pruned now"
    assert third.get_title() == "c: not scored at this step, 1 before"
    assert first.get_ylabel() == "Shapley value (nats)"


def test_figures_read_well_and_leave_no_pyplot_state(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    curves = {
        "conv1": coalition_curve(8),
        "conv2": coalition_curve(32),
    }
    steps = [
        synthetic_step(epoch=1, sparsity=0.25, accuracy=(0.9, 0.7)),
        synthetic_step(epoch=2, sparsity=0.5, accuracy=(0.88, 0.6)),
        {**synthetic_step(epoch=3, sparsity=0.25, accuracy=(0.5, 0.86)), "rolled_back": True},
    ]
    figures = {
        "coalition": coalition_size_figure(curves, "coalition value (nats)"),
        "architecture": architecture_figure({"conv1": 8, "conv2": 32}, {"conv1": 6, "conv2": 16}),
        "accuracy": accuracy_steps_figure(steps, final_accuracy=0.87),
        "size": model_size_figure({"dense": 12_000, "step 1": 9_000}, {"dense": 48_000}),
    }
    for name, figure in figures.items():
        assert isinstance(figure, Figure)
        assert all(axes.get_ylabel() for axes in figure.axes), f"{name}: an axis has no label"
        figure.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert plt.get_fignums() == open_before

    coalition = figures["coalition"].axes[0]
    assert [t.get_text() for t in coalition.get_legend().get_texts()] == [
        "conv1 (8 ch.)",
        "conv2 (32 ch.)",
    ]
    assert len(figures["size"].axes) == 2
    bars = figures["accuracy"].axes[0].containers
    assert [len(c) for c in bars] == [3, 3, 3]
    # After fine-tuning: the next entry's "before", then the accuracy at the end of fit.
    assert [round(b.get_height(), 6) for b in bars[2]] == [88.0, 50.0, 87.0]
    ticks = [t.get_text() for t in figures["accuracy"].axes[0].get_xticklabels()]
    assert ticks[2].endswith("(rolled back)")
    # No epoch after the last entry: it has no "after fine-tuning" bar.
    untuned = accuracy_steps_figure(steps[:2], final_accuracy=None)
    assert [len(c) for c in untuned.axes[0].containers] == [2, 2, 1]


def coalition_curve(n: int):
    from lightning_shapley.reporting import CoalitionCurve

    sizes = tuple(range(0, n + 1, max(n // 8, 1)))
    base = torch.tensor(sizes, dtype=torch.float64).unsqueeze(1) / n - 2.3
    return CoalitionCurve(n, sizes, base + 0.05 * torch.randn(len(sizes), 4, dtype=torch.float64))


def synthetic_step(epoch: int, sparsity: float, accuracy: tuple[float, float]) -> dict:
    return {
        "epoch": epoch,
        "target_sparsity": sparsity,
        "sparsity": sparsity,
        "parameters": int(10_000 * (1 - sparsity)),
        "accuracy_before": accuracy[0],
        "accuracy_after": accuracy[1],
        "value_before": -0.3,
        "value_after": -0.6,
    }
