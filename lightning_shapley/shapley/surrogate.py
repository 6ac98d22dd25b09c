"""A learned stand-in for a game: cheap to evaluate, used as a control variate.

A two-layer perceptron maps a coalition's membership vector to its value. It is fitted to
coalitions the real game already evaluated, then evaluated itself on as many coalitions
as an estimator likes, at a tiny fraction of a forward pass of the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from itertools import pairwise

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

#: Fitting uses at most this many coalitions (a random subset), to bound its cost.
MAX_FIT_ROWS = 4096


class SurrogateGame:
    """A fitted surrogate of a game: call it on boolean ``[m, n]`` coalitions.

    Build one with :meth:`fit`. Its parameters are private tensors, so fitting neither
    uses nor changes the global random state, and it runs with gradients enabled even
    when the caller disabled them.
    """

    def __init__(self, layers: list[tuple[Tensor, Tensor]], center: Tensor, scale: Tensor) -> None:
        self._layers = layers
        self._center = center
        self._scale = scale

    @classmethod
    def fit(
        cls,
        coalitions: Tensor,
        values: Tensor,
        *,
        hidden: int = 32,
        steps: int = 300,
        learning_rate: float = 1e-2,
        seed: int = 0,
    ) -> SurrogateGame:
        """Least-squares fit of a GELU perceptron to ``values`` of ``coalitions``.

        Example:
            >>> coalitions = torch.rand(256, 5) < 0.5
            >>> values = coalitions.double() @ torch.arange(5.0, dtype=torch.float64)
            >>> game = SurrogateGame.fit(coalitions, values, seed=0)
            >>> bool((game(coalitions) - values).abs().mean() < 0.3)
            True
        """
        generator = torch.Generator().manual_seed(seed)
        if len(coalitions) > MAX_FIT_ROWS:
            keep = torch.randperm(len(coalitions), generator=generator)[:MAX_FIT_ROWS]
            coalitions, values = coalitions[keep], values[keep]
        inputs = coalitions.float()
        center, scale = values.mean(), values.std().clamp(min=1e-12)
        targets = ((values - center) / scale).float()
        widths = [inputs.shape[1], hidden, hidden, 1]
        layers = [
            (
                (torch.randn(w_out, w_in, generator=generator) / w_in**0.5).requires_grad_(),
                torch.zeros(w_out).requires_grad_(),
            )
            for w_in, w_out in pairwise(widths)
        ]
        optimizer = torch.optim.Adam([p for layer in layers for p in layer], lr=learning_rate)
        with torch.enable_grad(), _single_thread():
            for _ in range(steps):
                optimizer.zero_grad()
                loss = F.mse_loss(_forward(layers, inputs), targets)
                loss.backward()
                optimizer.step()
        frozen = [(weight.detach(), bias.detach()) for weight, bias in layers]
        return cls(frozen, center, scale)

    def __call__(self, coalitions: Tensor) -> Tensor:
        """Surrogate values (float64 ``[m]``) of boolean ``[m, n]`` coalitions."""
        with torch.no_grad():
            standardized = _forward(self._layers, coalitions.float())
        return standardized.double() * self._scale + self._center


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # The fit is hundreds of tiny steps: thread start-up dominates them, and on a busy
    # machine two threads made it 20x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _forward(layers: list[tuple[Tensor, Tensor]], inputs: Tensor) -> Tensor:
    hidden = inputs
    for index, (weight, bias) in enumerate(layers):
        hidden = F.linear(hidden, weight, bias)
        if index < len(layers) - 1:
            hidden = F.gelu(hidden)
    return hidden.squeeze(-1)
