import copy

import pytest
import torch
from models_for_tests import ResidualNet, mlp, randomize_batchnorms
from torch import nn

from lightning_shapley import masking, units
from lightning_shapley.export import compact
from lightning_shapley.models import DigitsCNN


def _prune_every_unit(model: nn.Module, x: torch.Tensor, counts: dict[str, int]) -> None:
    """Prune ``counts[unit]`` channels of each unit, spread over its range."""
    for unit in units.find_units(model, x):
        pruned = torch.zeros(unit.n_channels, dtype=torch.bool)
        pruned[
            torch.randperm(unit.n_channels, generator=torch.Generator().manual_seed(1))[
                : counts[unit.name]
            ]
        ] = True
        masking.prune_channels(model, unit, pruned)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _compact_and_compare(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    masked = model(x).detach()
    before = _snapshot(model)
    pruned_before = {u.name: masking.pruned_channels(model, u) for u in units.find_units(model, x)}
    small = compact(model, x)
    # The original model is untouched: still masked, same tensors, same outputs.
    _assert_unchanged(model, before)
    for u in units.find_units(model, x):
        assert torch.equal(masking.pruned_channels(model, u), pruned_before[u.name])
    assert torch.equal(model(x), masked)
    assert small is not model
    small.eval()
    torch.testing.assert_close(small(x), masked, atol=1e-5, rtol=0)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in small.state_dict().items())
    return small


def test_digits_cnn(trained_cnn: DigitsCNN, score_batches: list) -> None:
    model = copy.deepcopy(trained_cnn)
    x = torch.cat([batch[0] for batch in score_batches])
    _prune_every_unit(model, x, {"features.0": 5, "features.3": 7, "features.7": 12})
    small = _compact_and_compare(model, x)
    c0, c1, c2 = 16 - 5, 16 - 7, 32 - 12
    f = small.features
    assert f[0].weight.shape == (c0, 1, 3, 3)
    assert f[1].weight.shape == f[1].running_mean.shape == (c0,)
    assert f[3].weight.shape == (c1, c0, 3, 3)
    assert f[4].num_features == c1
    assert f[7].weight.shape == (c2, c1, 3, 3)
    assert f[8].running_var.shape == (c2,)
    assert small.classifier.weight.shape == (10, c2)
    expected = 9 * c0 + 2 * c0 + 9 * c0 * c1 + 2 * c1 + 9 * c1 * c2 + 2 * c2 + 10 * c2 + 10
    assert _n_params(small) == expected < _n_params(model)


def test_residual_net() -> None:
    model = randomize_batchnorms(ResidualNet(channels=6))
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    _prune_every_unit(model, x, {"stem.0": 2, "block.conv1": 3})
    small = _compact_and_compare(model, x)
    s, b = 4, 3  # the residual stream and the block's inner channels
    assert small.stem[0].weight.shape == (s, 1, 3, 3)
    assert small.stem[1].num_features == s
    assert small.block.conv1.weight.shape == (b, s, 3, 3)
    assert small.block.bn1.num_features == b
    assert small.block.conv2.weight.shape == (s, b, 3, 3)
    assert small.block.bn2.num_features == s
    assert small.head.weight.shape == (10, s)
    expected = 9 * s + 2 * s + 9 * s * b + 2 * b + 9 * b * s + 2 * s + 10 * s + 10
    assert _n_params(small) == expected


def test_mlp_keeps_train_mode_and_requires_grad() -> None:
    model = randomize_batchnorms(mlp(hidden=12))
    model[1].bias.requires_grad_(False)
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    _prune_every_unit(model, x, {"1": 5, "4": 6})
    small = _compact_and_compare(model, x)
    h, g = 7, 10
    assert small[1].weight.shape == (h, 64)
    assert small[2].num_features == h
    assert small[4].weight.shape == (g, h)
    assert small[6].weight.shape == (10, g)
    assert _n_params(small) == 64 * h + h + 2 * h + h * g + g + g * 10 + 10
    assert not small[1].bias.requires_grad and small[1].weight.requires_grad

    model.train()
    assert compact(model, x).training


@pytest.mark.parametrize("masked", [False, True])
def test_nothing_pruned_comes_back_equal(masked: bool) -> None:
    model = randomize_batchnorms(DigitsCNN(channels=(4, 4, 8)))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    if masked:
        _prune_every_unit(model, x, {"features.0": 0, "features.3": 0, "features.7": 0})
    small = _compact_and_compare(model, x)
    assert _n_params(small) == _n_params(model)
    assert [p.shape for p in small.parameters()] == [
        p.shape for p in DigitsCNN(channels=(4, 4, 8)).parameters()
    ]


def test_activation_that_leaks_a_pruned_channel_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Sigmoid(), nn.Linear(6, 10))
    x = torch.randn(4, 1, 8, 8)
    (unit,) = units.find_units(model, x)
    masking.prune_channels(model, unit, torch.tensor([True, False, False, True, False, False]))
    with pytest.raises(ValueError, match="changed its outputs"):
        compact(model, x)


def test_untraceable_inputs_are_refused() -> None:
    model = DigitsCNN(channels=(4, 4, 8))
    with pytest.raises(ValueError, match="could not trace"):
        compact(model, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="example_inputs"):
        compact(model, "images")
