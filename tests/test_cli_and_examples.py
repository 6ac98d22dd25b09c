"""The command line, its sweeps and the examples, run as a user runs them.

Importing torch and Lightning costs seconds on a small machine, so everything that can
runs in this process: the Hydra app through its console-script entry point
(``cli.main`` with ``sys.argv`` set), the joblib sweep included (its workers are new
processes anyway), and the Python examples through ``runpy``. Only the shell example of
a sweep runs the installed console script in a process of its own.
"""

import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from lightning_shapley.app import cli
from lightning_shapley.app.sweep import (
    cell_rows,
    collect_results,
    summary_rows,
    write_summary,
)

ROOT = Path(__file__).resolve().parent.parent
# Hydra's logging would replace the handlers of the test process's root logger.
QUIET = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def run_app(monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """``lightning-shapley *args``, in this process."""
    monkeypatch.setattr(sys, "argv", ["lightning-shapley", *args, *QUIET])
    cli.main()


def test_main_job_runs_the_whole_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_app(monkeypatch, "experiment=quick", "logger=csv", f"hydra.run.dir={tmp_path}")
    out = capsys.readouterr().out
    for line in ("| test accuracy |", "| channel sparsity | 0.0% | 50.0% |", "scoring: 2 steps"):
        assert line in out
    assert "| net.features.3 | Conv2d | 4 / 8 | 50.0% | 576 | 144 |" in out

    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["scorer"], result["amount"], result["pruned"]["sparsity"]) == (
        "shapley",
        0.5,
        0.5,
    )
    assert result["estimator"] == {
        "method": "exact",
        "weighting": "band",
        "depth": 1,
        "num_permutations": None,
        "options": {},
    }
    assert 0.0 <= result["pruned"]["test_accuracy"] <= 1.0
    assert result["dense"]["parameters"] == 2034 > result["pruned"]["parameters"] == 590
    assert len(result["layers"]) == 7  # 3 convolutions, 3 BatchNorms, the classifier
    assert [s["epoch"] for s in result["steps"]] == [1, 2]
    assert result["scoring"]["evaluations"] > 0 and result["scoring"]["seconds"] > 0
    (artifact,) = result["export"]
    assert artifact["format"] == "compact" and Path(artifact["path"]).is_file()
    assert artifact["parameters"] == 590

    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "summary/pruned_test_acc" in metrics and "pruning/sparsity" in metrics


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["pruning.amout=0.3"], ["pruning.amout=0.3", "did you mean pruning.amount?", "scope"]),
        (["trainer.max_epoch=3"], ["did you mean trainer.max_epochs?"]),
        (["-m", "pruning=l1,shapley", "pruning.method=exact"], ["no key 'method'", "scorer"]),
        (["logger.csv.name=x"], ["choose one first: logger=csv|many|tensorboard|wandb"]),
        (["shapley.layer=features.3"], ["the config has no key 'shapley'", "pruning"]),
        (["pruning.epochs.7=3"], ["is a list of 2"]),
        (["-m", "estimator=band,magic"], ["'estimator' has no option 'magic'", "adaptive|band"]),
    ],
)
def test_unknown_keys_are_refused_with_the_keys_that_exist(
    argv: list[str], expected: list[str]
) -> None:
    message = cli.check_overrides(argv)
    assert message is not None
    for text in expected:
        assert text in message


def test_a_launcher_without_its_plugin_is_named() -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None:
        pytest.skip("hydra-submitit-launcher is installed here")
    message = cli.check_overrides(["-m", "hydra/launcher=slurm", "pruning=l1"])
    assert message == (
        "hydra/launcher=slurm needs the hydra-submitit-launcher plugin: "
        "pip install hydra-submitit-launcher"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["pruning=l1", "pruning.amount=0.3"],
        ["-m", "pruning=shapley,l1", "pruning.amount=0.25,0.5"],
        ["logger=csv", "logger.csv.name=x", "+pruning.recalibrate=2"],
        ["experiment=quick", "estimator=tmc", "estimator.num_permutations=8"],
        ["estimator=adaptive", "estimator.options.tolerance=0.01"],
    ],
)
def test_known_keys_pass_the_check(argv: list[str]) -> None:
    assert cli.check_overrides(argv) is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pruning.amount=2", "pruning: amount=2 is not allowed; it must lie in [0, 1)"),
        ("pruning.scorer=foo", "pruning: scorer='foo' is not known; use one of ('shapley'"),
        ("model.net.channels=[4]", "model.net: channels=(4,) must hold at least two"),
        ("export=[pdf]", "export: 'pdf' is not an export format; allowed: 'compact'"),
        ("pruning.layers=[net.nope]", "'net.nope' is not a producer of a prunable unit"),
        ("pruning.epochs=[1,9]", "has an epoch beyond max_epochs=4"),
        ("pruning.amout=0.3", "did you mean pruning.amount?"),
        ("trainer.strategy=ddp_spawn", "use strategy=ddp"),
        ("seed=-1", "seed=-1 is not allowed; it must be an integer in [0, 2**32)"),
        ("pruning=magic", "'pruning' has no option 'magic'; choose one of bn_gamma|l1|loo"),
        ("estimator.num_permutations=0", "num_permutations=0 is not allowed"),
        ("+estimator.options.bottom_kk=3", "['bottom_kk'] are not options of method="),
    ],
)
def test_bad_settings_fail_at_once_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: str,
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_app(monkeypatch, "experiment=quick", override, f"hydra.run.dir={tmp_path}")
    assert exit_info.value.code == cli.SETTING_ERROR_STATUS
    captured = capsys.readouterr()
    assert captured.err.startswith("lightning-shapley: ") and message in captured.err
    assert captured.err.count("\n") == 1  # one line, no traceback
    assert "ShapleyPruning: epoch" not in captured.out + captured.err  # nothing was trained
    assert not (tmp_path / "result.json").exists()


def test_parallel_multirun_writes_the_sweep_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = tmp_path / "sweep"
    run_app(
        monkeypatch,
        "-m",
        "hydra/launcher=local",  # joblib: two worker processes, two jobs each
        "hydra.launcher.n_jobs=2",
        "experiment=quick",
        "pruning=shapley,l1",
        "pruning.amount=0.25,0.5",
        f"hydra.sweep.dir={sweep}",
    )
    results = collect_results(sweep)
    assert sorted(r["job"]["num"] for r in results) == [0, 1, 2, 3]
    assert {(r["scorer"], r["amount"]) for r in results} == {
        (scorer, amount) for scorer in ("shapley", "l1") for amount in (0.25, 0.5)
    }
    assert all(Path(r["job"]["dir"]).parent == sweep for r in results)  # a folder per job
    csv_lines = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("job,label,scorer,amount,sparsity,dense_accuracy")
    assert len(csv_lines) == 1 + 4
    table = (sweep / "sweep_summary.md").read_text()
    assert table.count("\n| ") == 1 + 4 and "| l1 | 0.25 | 0.250 |" in table
    assert (sweep / "sweep_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert table in capsys.readouterr().out  # printed when the sweep ends
    assert "JoblibLauncher" in (sweep / "multirun.yaml").read_text()


def fake_result(num: int, scorer: str, amount: float, accuracy: float, *extra: str) -> dict:
    overrides = [f"pruning={scorer}", f"pruning.amount={amount}", *extra]
    return {
        "job": {"num": num, "overrides": overrides},
        "scorer": scorer,
        "amount": amount,
        "dense": {"test_accuracy": 0.98, "parameters": 1000},
        "pruned": {"test_accuracy": accuracy, "parameters": 500, "sparsity": amount},
        "scoring": {"seconds": 1.5, "evaluations": 100},
    }


def test_sweep_cells_give_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    results = [
        fake_result(0, "shapley", 0.5, 0.95, "seed=0"),
        fake_result(1, "shapley", 0.5, 0.93, "seed=1"),
        fake_result(2, "shapley", 0.5, 0.88, "seed=2"),
        fake_result(3, "l1", 0.5, 0.90, "seed=0"),
    ]
    cells = {cell["label"]: cell for cell in cell_rows(summary_rows(results))}
    assert cells["shapley"]["jobs"] == 3
    assert cells["shapley"]["pruned_accuracy"] == pytest.approx((0.95 + 0.93 + 0.88) / 3)
    assert cells["shapley"]["pruned_accuracy_sd"] == pytest.approx(0.036055, abs=1e-6)
    assert (cells["l1"]["jobs"], cells["l1"]["pruned_accuracy_sd"]) == (1, 0.0)
    paths = write_summary(results, tmp_path)
    table = paths["cells"].read_text()
    assert "| shapley | 0.5 | 3 | 0.500 | 0.9800 | 0.9200 ± 0.0361 | 100 |" in table


def test_sweep_summary_labels_lines_by_what_varies(tmp_path: Path) -> None:
    results = [
        fake_result(0, "shapley", 0.5, 0.95, "estimator=band", "seed=0"),
        fake_result(1, "shapley", 0.5, 0.93, "estimator=band", "seed=1"),
        fake_result(2, "shapley", 0.5, 0.90, "estimator=surrogate", "seed=0"),
        fake_result(3, "l1", 0.5, 0.85, "estimator=band", "seed=0"),
    ]
    labels = {row["job"]: row["label"] for row in summary_rows(results)}
    # seed and amount vary along a line; the estimator tells lines apart.
    assert labels == {
        0: "shapley estimator=band",
        1: "shapley estimator=band",
        2: "shapley estimator=surrogate",
        3: "l1 estimator=band",
    }
    paths = write_summary(results, tmp_path)
    assert set(paths) == {"csv", "markdown", "cells", "plot"}
    assert paths["plot"].stat().st_size > 10_000


def test_wandb_logger_is_offline_and_grouped_by_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B key
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=cli.CONFIG_PATH):
        cfg = compose(
            "config",
            overrides=["logger=wandb", "pruning=l1", "hydra.mode=MULTIRUN"],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.override_dirname = "pruning=l1"
        cfg.hydra.sweep.dir = "multirun/sweep-1"
    HydraConfig.instance().set_config(cfg)
    logger = instantiate(cfg.logger.wandb)  # no run starts until the logger is used
    assert logger._offline is True
    assert logger._wandb_init["group"] == "multirun/sweep-1"
    assert logger._wandb_init["name"] == "pruning=l1"
    assert logger.save_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("example", "args", "expected"),
    [
        ("plain_lightning.py", ["--quick"], ["parameters: 5,178 dense, 1,442 compact"]),
        ("custom_value_and_batches.py", ["--quick"], ["macro F1 on the scoring batches"]),
        ("layer_values.py", ["--quick"], ["exact: 1024 evaluations"]),
        ("template_flow.py", ["--quick"], ["compact of the reloaded model: 5,226 -> "]),
    ],
)
def test_python_examples_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    example: str,
    args: list[str],
    expected: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # what the examples write (figures) lands here
    monkeypatch.setattr(sys, "argv", [example, *args])
    runpy.run_path(str(ROOT / "examples" / example), run_name="__main__")
    out = capsys.readouterr().out
    for text in expected:
        assert text in out
    if example == "template_flow.py":  # test on "best" scores the weights in that file
        best = re.search(r"best checkpoint: epoch=(\d+)-", out)
        assert best is not None and int(best.group(1)) not in (1, 2)  # not a pruning epoch
        tested, reloaded = re.search(r"test on best: ([\d.]+); reloaded: ([\d.]+)", out).groups()
        assert tested == reloaded


def test_hydra_sweep_example_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "QUICK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "WANDB_MODE": "offline",
        "MPLBACKEND": "Agg",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "hydra_sweep.sh"), str(sweep)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (sweep / "sweep_summary.md").read_text().splitlines()[2:]
    assert sorted(row.split(" | ")[1] for row in rows) == ["l1", "shapley"]
    assert (sweep / "sweep_accuracy.png").is_file()
