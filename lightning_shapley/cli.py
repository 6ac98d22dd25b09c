"""The ``lightning-shapley`` command: a Hydra app over the embedded digits CNN."""

from itertools import islice
from pathlib import Path

import hydra
import lightning
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_shapley.data import DigitsDataModule
from lightning_shapley.functional import shapley_values
from lightning_shapley.models import DigitsCNN, ImageClassifier

# A wheel carries the configs inside the package; a source checkout keeps them at the repo root.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
_REPO_CONF = Path(__file__).resolve().parent.parent / "conf"
CONFIG_PATH = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _REPO_CONF)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> None:
    """Train the digits CNN, then print the Shapley values of one layer's channels."""
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = DigitsDataModule(batch_size=cfg.data.batch_size, seed=cfg.seed)
    net = DigitsCNN(channels=tuple(cfg.model.channels))
    module = ImageClassifier(net)
    trainer = lightning.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer.fit(module, datamodule=datamodule)
    (test_metrics,) = trainer.test(module, datamodule=datamodule, verbose=False)

    shapley = cfg.shapley
    batches = list(islice(datamodule.val_dataloader(), shapley.score_batches))
    est = shapley_values(
        net,
        shapley.layer,
        batches,
        value=shapley.value,
        weighting=shapley.weighting,
        depth=shapley.depth,
        method=shapley.method,
        **OmegaConf.to_container(shapley.options, resolve=True),
    )

    print(f"test accuracy: {test_metrics['test/acc']:.4f}")
    print()
    print(
        f"{shapley.layer}: {len(est.values)} channels, value={shapley.value}, "
        f"weighting={shapley.weighting}, method={shapley.method}, "
        f"{sum(len(y) for _, y in batches)} scoring samples"
    )
    print()
    print(format_value_table(est.values, est.stderr))
    print()
    print(f"{est.evaluations} coalition evaluations in {est.seconds:.1f} s")


def format_value_table(values: torch.Tensor, stderr: torch.Tensor) -> str:
    """A markdown table of channel values, lowest (first to prune) at the top.

    Args:
        values: Value of each channel, shape ``(n_channels,)``.
        stderr: Standard error of each value, same shape.

    Returns:
        The table: rank (1 = lowest value), channel index, value and standard error.

    Raises:
        ValueError: If the shapes are not one and the same 1-D shape.

    Example:
        >>> print(format_value_table(torch.tensor([0.5, -0.25]), torch.tensor([0.01, 0.02])))
        | rank | channel | value | ± stderr |
        | ---: | ---: | ---: | ---: |
        | 1 | 1 | -0.25 | 0.02 |
        | 2 | 0 | 0.5 | 0.01 |
    """
    if values.dim() != 1 or values.shape != stderr.shape:
        raise ValueError(
            f"values (shape {tuple(values.shape)}) and stderr (shape {tuple(stderr.shape)}) "
            "must have one and the same 1-D shape"
        )
    rows = [
        "| rank | channel | value | ± stderr |",
        "| ---: | ---: | ---: | ---: |",
    ]
    order = torch.argsort(values, stable=True).tolist()
    value_list, stderr_list = values.tolist(), stderr.tolist()
    for rank, channel in enumerate(order, start=1):
        rows.append(
            f"| {rank} | {channel} | {value_list[channel]:.4g} | {stderr_list[channel]:.2g} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
