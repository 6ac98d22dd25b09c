"""The command line and the examples, run as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_main_job_trains_and_prints_the_value_table(tmp_path: Path) -> None:
    result = run(
        [
            "-m",
            "lightning_shapley.cli",
            "trainer.max_epochs=3",
            "shapley.options.num_permutations=16",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "test accuracy:" in out
    table = [line for line in out.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(table) == 32 + 1  # the separator row and one row per channel of features.3
    assert "coalition evaluations in" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("shapley.method=magic", "method='magic' is not known"),
        ("shapley.layer=features.99", "layer='features.99' is not a module"),
        ("shapley.nonsense=1", "nonsense"),
    ],
)
def test_main_job_refuses_bad_settings(tmp_path: Path, override: str, message: str) -> None:
    result = run(
        [
            "-m",
            "lightning_shapley.cli",
            "trainer.max_epochs=1",
            override,
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_layer_values_example_runs(tmp_path: Path) -> None:
    result = run([str(ROOT / "examples" / "layer_values.py")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "exact: 4096 evaluations" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 12
