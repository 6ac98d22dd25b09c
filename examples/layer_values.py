"""Value the channels of one layer of a trained model: no trainer, one function call.

Trains a small CNN on scikit-learn's digits for a few seconds, then values the 12
channels of its second convolution three ways: exactly (all 4096 coalitions), by sampling
with the surrogate control variate (the default), and with the pruning band of depth 1
(what removing each channel alone costs). Run: ``python examples/layer_values.py``
(``--quick``: 10 channels, 1024 coalitions, 3 epochs of training, as CI runs it).
"""

import argparse

import torch
import torch.nn.functional as F  # noqa: N812

from lightning_shapley import shapley_values
from lightning_shapley.app.data import digits_splits
from lightning_shapley.app.models import DigitsCNN


def train(net: torch.nn.Module, epochs: int = 8) -> torch.nn.Module:
    inputs, targets = digits_splits(seed=0).train.tensors
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        for start in range(0, len(inputs), 64):
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[start : start + 64]), targets[start : start + 64]).backward()
            optimizer.step()
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 10-channel layer (CI)")
    quick = parser.parse_args().quick
    torch.manual_seed(0)
    net = train(DigitsCNN(channels=(16, 10 if quick else 12, 32)), epochs=3 if quick else 8)
    score = digits_splits(seed=0).score.tensors  # 200 held-out images, one batch
    batches = [score]

    exact = shapley_values(net, "features.3", batches, method="exact")
    sampled = shapley_values(net, "features.3", batches, num_permutations=64, seed=0)
    band = shapley_values(net, "features.3", batches, weighting="band", depth=1, method="exact")

    print("channel | exact Shapley | sampled ± stderr | leave-one-out (band, depth 1)")
    for channel in torch.argsort(exact.values).tolist():
        print(
            f"{channel:7d} | {exact.values[channel]:13.4f} | "
            f"{sampled.values[channel]:7.4f} ± {sampled.stderr[channel]:.4f} | "
            f"{band.values[channel]:.4f}"
        )
    error = (sampled.values - exact.values).abs().mean()
    print(
        f"\nexact: {exact.evaluations} evaluations in {exact.seconds:.1f} s; "
        f"sampled: {sampled.evaluations} in {sampled.seconds:.1f} s, mean abs error {error:.4f}; "
        f"band depth 1: {band.evaluations} evaluations"
    )


if __name__ == "__main__":
    main()
