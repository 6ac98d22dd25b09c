"""Structured channel masks: exact zeros after every coupled layer, cumulative, atomic.

The reference for "the channel is pruned" knows nothing of ``torch.nn.utils.prune``: an
unmasked twin of the model whose channel outputs (after the BatchNorms, where there are
any) are zeroed by forward hooks.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from models_for_tests import ResidualNet, randomize_batchnorms
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_shapley.pruning.masking import (
    ChannelMask,
    bake_masks,
    channel_state,
    load_channel_state,
    make_permanent,
    prune_channels,
    pruned_channels,
    set_pruned_channels,
)

try:
    from lightning_shapley.pruning.units import PrunableUnit as Unit
except ImportError:  # units.py is written beside this module; the same fields

    @dataclass(frozen=True)
    class Unit:
        name: str
        producers: tuple[str, ...]
        batchnorms: tuple[str, ...]
        consumers: tuple[str, ...]
        n_channels: int


def make_unit(
    name: str, producers: tuple, batchnorms: tuple, consumers: tuple, n_channels: int
) -> Unit:
    return Unit(
        name=name,
        producers=producers,
        batchnorms=batchnorms,
        consumers=consumers,
        n_channels=n_channels,
    )


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]  # fmt: skip


# --------------------------------------------------------------------------- models and units


def cnn() -> nn.Sequential:
    """Conv-BN-ReLU twice (the first conv without bias, the second with), pooled head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    return randomize_batchnorms(model)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))
    return randomize_batchnorms(model)


def conv_no_bn() -> nn.Sequential:
    """A convolution with bias and no BatchNorm: its bias must be masked too."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


CNN_CONV0 = make_unit("0", ("0",), ("1",), ("3",), 6)
CNN_CONV3 = make_unit("3", ("3",), ("4",), ("8",), 5)
MLP_LINEAR0 = make_unit("0", ("0",), ("1",), ("3",), 7)
NO_BN_CONV0 = make_unit("0", ("0",), (), ("3",), 4)

# (model factory, unit, input shape, the modules after which the channel must be zero)
# The stem and the block's second conv write the same channels (the residual add).
RESIDUAL = make_unit(
    "stem.0", ("stem.0", "block.conv2"), ("stem.1", "block.bn2"), ("block.conv1", "head"), 6
)


def residual() -> ResidualNet:
    torch.manual_seed(0)
    return randomize_batchnorms(ResidualNet(6))


CASES = {
    "cnn-conv-no-bias": (cnn, CNN_CONV0, (4, 1, 8, 8), ("1",)),
    "cnn-conv-bias": (cnn, CNN_CONV3, (4, 1, 8, 8), ("4",)),
    "mlp-linear-bn1d": (mlp, MLP_LINEAR0, (6, 8), ("1",)),
    "conv-bias-no-bn": (conv_no_bn, NO_BN_CONV0, (4, 1, 8, 8), ("0",)),
    "residual-two-producers": (residual, RESIDUAL, (4, 1, 8, 8), ("stem.1", "block.bn2")),
}


def channel_outputs(model: nn.Module, modules: tuple[str, ...], x: Tensor) -> list[Tensor]:
    """The outputs of ``modules`` on ``x``, in that order."""
    seen: dict[str, Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: seen.setdefault(name, out)
        )
        for name in modules
    ]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[name] for name in modules]


def reference_logits(
    model: nn.Module, modules: tuple[str, ...], pruned: Tensor, x: Tensor
) -> Tensor:
    """Logits of an unmasked model whose channels ``pruned`` are zeroed after ``modules``."""
    keep = (~pruned).float()

    def zero(_module: nn.Module, _inputs: object, out: Tensor) -> Tensor:
        return out * keep.reshape(1, -1, *[1] * (out.ndim - 2))

    for name in modules:
        model.get_submodule(name).register_forward_hook(zero)
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict[str, Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key


def pruning_hooks(model: nn.Module) -> list[prune.BasePruningMethod]:
    return [
        hook
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, prune.BasePruningMethod)
    ]


def mask(n: int, *channels: int) -> Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[list(channels)] = True
    return out


# --------------------------------------------------------------------------- exact zeros


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pruned_channel_is_exactly_zero_after_every_coupled_layer(case, training):
    factory, unit, shape, zero_after = CASES[case]
    model = factory().train(training)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    pruned = mask(unit.n_channels, 0, unit.n_channels - 2)
    for before in channel_outputs(model, zero_after, x):
        assert before[:, pruned].abs().amax() > 0  # the channels carried signal before

    prune_channels(model, unit, pruned)

    for after in channel_outputs(model, zero_after, x):
        assert torch.count_nonzero(after[:, pruned]) == 0
        assert torch.count_nonzero(after[:, ~pruned]) > 0
    expected = reference_logits(factory().train(training), zero_after, pruned, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_masks_cover_producers_and_batchnorms_and_leave_consumers_alone():
    model = cnn()
    consumer_weight = model[8].weight.clone()
    prune_channels(model, CNN_CONV3, mask(5, 1, 3))

    masked = {
        key.removesuffix("_mask"): value
        for key, value in model.state_dict().items()
        if key.endswith("_mask")
    }
    assert set(masked) == {"3.weight", "3.bias", "4.weight", "4.bias"}
    for key, value in masked.items():
        channels = value.reshape(5, -1)
        assert torch.equal(channels.eq(0).all(1), mask(5, 1, 3)), key
        assert bool(channels[~mask(5, 1, 3)].eq(1).all()), key
        assert value.dtype == torch.float32
    assert isinstance(model[3].weight_orig, nn.Parameter)
    assert "weight_mask" not in dict(model[8].named_buffers())
    assert torch.equal(model[8].weight, consumer_weight)
    assert not any(
        isinstance(h, prune.BasePruningMethod) for h in model[0]._forward_pre_hooks.values()
    )


def test_an_all_false_mask_still_reparametrizes_and_prunes_nothing():
    model = mlp()
    x = torch.randn(6, 8)
    expected = model(x)
    prune_channels(model, MLP_LINEAR0, mask(7))
    assert hasattr(model[0], "weight_orig") and hasattr(model[1], "bias_mask")
    assert not pruned_channels(model, MLP_LINEAR0).any()
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_live_on_the_parameters_device(device):
    model = cnn().to(device)
    prune_channels(model, CNN_CONV3, mask(5, 0).to(device))
    for module in (model[3], model[4]):
        for name in ("weight", "bias"):
            assert getattr(module, name + "_mask").device == getattr(module, name + "_orig").device
            assert getattr(module, name + "_mask").device.type == device
    assert torch.equal(pruned_channels(model, CNN_CONV3), mask(5, 0))
    assert pruned_channels(model, CNN_CONV3).device.type == "cpu"


# --------------------------------------------------------------------------- cumulative masks


def test_masks_accumulate_and_pruned_channels_reads_the_union():
    model = cnn()
    prune_channels(model, CNN_CONV0, mask(6, 0))
    prune_channels(model, CNN_CONV0, mask(6, 4))
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 4))
    prune_channels(model, CNN_CONV0, mask(6, 0))  # pruning a pruned channel again changes nothing
    prune_channels(model, CNN_CONV0, mask(6))
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 4))
    for module, name in [(model[0], "weight"), (model[1], "weight"), (model[1], "bias")]:
        zero = getattr(module, name + "_mask").reshape(6, -1).eq(0).all(1)
        assert torch.equal(zero, mask(6, 0, 4)), name
    # One ChannelMask per parameter, its record merged, not a growing container.
    hooks = pruning_hooks(model)
    assert len(hooks) == 3 and all(type(h) is ChannelMask for h in hooks)
    assert all(torch.equal(h.pruned, mask(6, 0, 4)) for h in hooks)
    (out,) = channel_outputs(model.eval(), ("1",), torch.randn(2, 1, 8, 8))
    assert torch.count_nonzero(out[:, [0, 4]]) == 0
    assert torch.equal(pruned_channels(model, CNN_CONV3), mask(5))  # other units untouched


def test_pytorch_structured_pruning_on_top_sees_only_the_survivors():
    """``prune.ln_structured`` after ours goes through a PruningContainer: it picks among
    the surviving channels only, and ours stay pruned; ours after it still accumulate."""
    model = cnn()
    with torch.no_grad():
        model[0].weight[3] *= 1e-3  # the smallest survivor
    prune_channels(model, CNN_CONV0, mask(6, 0, 2))
    prune.ln_structured(model[0], "weight", amount=1, n=1, dim=0)
    hook = next(h for h in model[0]._forward_pre_hooks.values() if h._tensor_name == "weight")
    assert isinstance(hook, prune.PruningContainer)
    zero_rows = model[0].weight_mask.reshape(6, -1).eq(0).all(1)
    assert torch.equal(zero_rows, mask(6, 0, 2, 3))
    # The BatchNorm was not masked on channel 3, so the unit's channel 3 is not pruned.
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 2))

    prune_channels(model, CNN_CONV0, mask(6, 5))
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 2, 5))
    zero_rows = model[0].weight_mask.reshape(6, -1).eq(0).all(1)
    assert torch.equal(zero_rows, mask(6, 0, 2, 3, 5))
    assert isinstance(hook[-1], ChannelMask)  # recorded in the container


def test_unstructured_pruning_mixed_in_keeps_channels_pruned():
    model = mlp()
    prune.l1_unstructured(model[0], "weight", amount=0.3)
    unstructured_zeros = model[0].weight_mask.eq(0)
    prune_channels(model, MLP_LINEAR0, mask(7, 6))
    prune.l1_unstructured(model[0], "weight", amount=0.2)
    weight_mask = model[0].weight_mask
    assert bool(weight_mask[6].eq(0).all())
    assert bool(weight_mask[unstructured_zeros].eq(0).all())
    assert torch.equal(pruned_channels(model, MLP_LINEAR0), mask(7, 6))


def test_pruned_channels_counts_masks_of_other_methods():
    model = cnn()
    assert not pruned_channels(model, CNN_CONV0).any()
    prune.ln_structured(model[0], "weight", amount=2, n=1, dim=0)  # the producer alone
    expected = model[0].weight_mask.reshape(6, -1).eq(0).all(1)
    assert int(expected.sum()) == 2
    assert torch.equal(pruned_channels(model, CNN_CONV0), expected)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
    ids=["sgd-momentum-decay", "adam"],
)
def test_the_optimizer_cannot_revive_a_pruned_channel(make_optimizer):
    model = cnn().train()
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 3, (16,))
    optimizer = make_optimizer(model.parameters())  # built before pruning, as in Lightning

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # momentum and Adam moments on every entry
        step()
    pruned = mask(5, 1, 4)
    prune_channels(model, CNN_CONV3, pruned)
    conv = model[3]
    assert any(p is conv.weight_orig for g in optimizer.param_groups for p in g["params"])
    orig_before = conv.weight_orig.detach().clone()
    for _ in range(5):
        step()

    assert not torch.equal(
        conv.weight_orig[pruned], orig_before[pruned]
    )  # the optimizer moved them
    assert not torch.equal(conv.weight_orig[~pruned], orig_before[~pruned])
    (out,) = channel_outputs(model, ("4",), x)  # recomputes weight = weight_orig * weight_mask
    for module in (model[3], model[4]):
        assert torch.count_nonzero(module.weight[pruned]) == 0
        assert torch.count_nonzero(module.bias[pruned]) == 0
    assert torch.count_nonzero(out[:, pruned]) == 0
    assert torch.equal(pruned_channels(model, CNN_CONV3), pruned)


# --------------------------------------------------------------------------- validation


BAD_CALLS = {
    "float-mask": (CNN_CONV0, torch.zeros(6), "boolean tensor of shape \\(6,\\)"),
    "wrong-length": (CNN_CONV0, mask(5, 1), "boolean tensor of shape \\(6,\\)"),
    "not-a-tensor": (CNN_CONV0, [True] + [False] * 5, "list"),
    "every-channel": (CNN_CONV0, torch.ones(6, dtype=torch.bool), "all its 6 channels"),
    "missing-module": (make_unit("0", ("0", "nope"), ("1",), (), 6), mask(6, 1), "'nope'"),
    "missing-batchnorm": (make_unit("0", ("0",), ("7",), (), 6), mask(6, 1), "'7'"),
    "producer-size": (make_unit("0", ("0",), (), (), 5), mask(5, 1), "has 6 channels"),
    "batchnorm-size": (make_unit("0", ("0",), ("4",), (), 6), mask(6, 1), "'4' of unit '0' has 5"),
    "relu-producer": (make_unit("2", ("2",), (), (), 6), mask(6, 1), "ReLU"),
    "zero-channels": (make_unit("0", ("0",), ("1",), (), 0), mask(0), "n_channels=0"),
}


@pytest.mark.parametrize("call", BAD_CALLS)
def test_a_bad_call_raises_and_changes_nothing(call):
    unit, pruned, message = BAD_CALLS[call]
    model = cnn()
    saved = snapshot(model)
    with pytest.raises(ValueError, match=message):
        prune_channels(model, unit, pruned)
    assert not any(name.endswith("_orig") for name, _ in model.named_parameters())
    assert not pruning_hooks(model)
    assert_state_equal(model, saved)


def test_a_call_that_would_prune_the_last_channel_leaves_the_earlier_masks():
    model = cnn()
    prune_channels(model, CNN_CONV0, mask(6, 0, 1, 2))
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"unit '0'.*3 pruned already.*all its 6 channels"):
        prune_channels(model, CNN_CONV0, mask(6, 3, 4, 5))
    assert_state_equal(model, saved)
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 1, 2))


def test_a_batchnorm_without_affine_parameters_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False))
    with pytest.raises(ValueError, match="affine=False"):
        prune_channels(model, make_unit("0", ("0",), ("1",), (), 3), mask(3, 0))
    assert not pruning_hooks(model)


def test_channel_mask_names_a_length_mismatch():
    with pytest.raises(ValueError, match=r"4 channels along dim=0.*3 entries"):
        ChannelMask.apply(nn.Linear(2, 4), "weight", mask(3, 0))
    with pytest.raises(ValueError, match="1-D boolean"):
        ChannelMask(torch.zeros(3))


# --------------------------------------------------------------------------- permanence


def test_make_permanent_bakes_the_zeros_in_and_is_idempotent():
    model = cnn().eval()
    prune_channels(model, CNN_CONV0, mask(6, 1))
    prune_channels(model, CNN_CONV3, mask(5, 0, 2))
    prune.l1_unstructured(model[8], "weight", amount=0.4)  # another method, mixed in
    orig = model[3].weight_orig
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)

    make_permanent(model)

    assert not pruning_hooks(model)
    keys = model.state_dict().keys()
    assert not [k for k in keys if k.endswith(("_orig", "_mask"))]
    assert {"0.weight", "1.weight", "1.bias", "3.weight", "3.bias", "8.weight"} <= keys
    assert model[3].weight is orig and isinstance(model[3].weight, nn.Parameter)
    assert torch.count_nonzero(model[3].weight[[0, 2]]) == 0
    assert torch.count_nonzero(model[1].bias[1]) == 0
    assert torch.equal(model(x), expected)
    assert all(not m._load_state_dict_post_hooks for m in model.modules())
    saved = snapshot(model)
    make_permanent(model)
    assert_state_equal(model, saved)
    assert torch.equal(model(x), expected)


def test_a_masked_state_dict_needs_the_same_masks_a_permanent_one_loads_plainly():
    model = cnn().eval()
    prune_channels(model, CNN_CONV0, mask(6, 2, 5))
    state = model.state_dict()
    assert {"0.weight_orig", "0.weight_mask", "1.bias_orig", "1.bias_mask"} <= state.keys()
    assert "0.weight" not in state
    with pytest.raises(RuntimeError, match="weight_orig"):
        cnn().load_state_dict(state)  # the known pain point: a fresh model lacks the masks

    x = torch.randn(4, 1, 8, 8)
    make_permanent(model)
    fresh = cnn()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # so that loading is what makes it equal
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))
    assert not pruning_hooks(fresh)


# --------------------------------------------------------------------------- setting masks exactly


def assert_masks_are(model: nn.Module, unit: Unit, pruned: Tensor) -> None:
    """Every coupled mask zeroes exactly ``pruned``, and its ChannelMask records as much."""
    assert torch.equal(pruned_channels(model, unit), pruned)
    for name in (*unit.producers, *unit.batchnorms):
        module = model.get_submodule(name)
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, ChannelMask):
                continue
            assert torch.equal(hook.pruned, pruned), name
            weight_mask = getattr(module, hook._tensor_name + "_mask")
            zero = weight_mask.movedim(hook.dim, 0).reshape(len(pruned), -1).eq(0)
            assert torch.equal(zero.all(1), pruned) and torch.equal(zero.any(1), pruned), name


@pytest.mark.parametrize("case", CASES)
def test_set_pruned_channels_unprunes_and_later_pruning_accumulates(case):
    factory, unit, shape, zero_after = CASES[case]
    model = factory()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    n = unit.n_channels
    prune_channels(model, unit, mask(n, 0, n - 2))

    set_pruned_channels(model, unit, mask(n, n - 2))  # un-prunes channel 0

    assert_masks_are(model, unit, mask(n, n - 2))
    expected = reference_logits(factory(), zero_after, mask(n, n - 2), x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    prune_channels(model, unit, mask(n, 1))  # cumulative on top of the new masks
    assert_masks_are(model, unit, mask(n, 1, n - 2))
    expected = reference_logits(factory(), zero_after, mask(n, 1, n - 2), x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    set_pruned_channels(model, unit, mask(n))  # back to dense, masks kept
    assert_masks_are(model, unit, mask(n))
    with torch.no_grad():
        torch.testing.assert_close(model(x), factory()(x), rtol=0, atol=1e-5)


def test_set_pruned_channels_prunes_and_unprunes_in_one_call_and_on_a_fresh_model():
    model = cnn()
    set_pruned_channels(model, CNN_CONV0, mask(6, 1, 4))  # no masks yet: as prune_channels
    assert_masks_are(model, CNN_CONV0, mask(6, 1, 4))
    set_pruned_channels(model, CNN_CONV0, mask(6, 0, 4))  # 1 comes back, 0 goes
    assert_masks_are(model, CNN_CONV0, mask(6, 0, 4))
    hooks = pruning_hooks(model)
    assert len(hooks) == 3 and all(type(h) is ChannelMask for h in hooks)
    assert torch.equal(pruned_channels(model, CNN_CONV3), mask(5))  # the other unit untouched


def test_unpruned_masks_survive_a_state_dict_round_trip():
    model = cnn().eval()
    prune_channels(model, CNN_CONV0, mask(6, 1, 2, 5))
    set_pruned_channels(model, CNN_CONV0, mask(6, 2))
    state = model.state_dict()
    assert torch.equal(state["0.weight_mask"].reshape(6, -1).eq(0).all(1), mask(6, 2))
    assert torch.equal(state["1.bias_mask"].eq(0), mask(6, 2))
    assert torch.equal(state["0.weight_orig"], cnn()[0].weight)  # the weights kept their values
    x = torch.randn(4, 1, 8, 8)

    fresh = cnn()
    prune_channels(fresh, CNN_CONV0, mask(6))  # masked the same way, so the keys match
    fresh.load_state_dict(state)
    assert torch.equal(pruned_channels(fresh, CNN_CONV0), mask(6, 2))
    assert torch.equal(fresh.eval()(x), model(x))
    make_permanent(model)
    assert torch.count_nonzero(model[0].weight[[1, 5]]) > 0
    assert torch.count_nonzero(model[0].weight[2]) == 0


@pytest.mark.parametrize("call", BAD_CALLS)
def test_a_bad_set_pruned_channels_raises_and_changes_nothing(call):
    unit, pruned, message = BAD_CALLS[call]
    model = cnn()
    prune_channels(model, CNN_CONV0, mask(6, 2, 3))
    saved = snapshot(model)
    with pytest.raises(ValueError, match=message):
        set_pruned_channels(model, unit, pruned)
    assert_state_equal(model, saved)
    assert_masks_are(model, CNN_CONV0, mask(6, 2, 3))


def test_unpruning_a_parameter_that_carries_another_method_is_refused():
    model = cnn()
    prune_channels(model, CNN_CONV0, mask(6, 0, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.3)  # its zeros fall in channels 0, 2 too
    saved = snapshot(model)
    with pytest.raises(ValueError, match=r"un-prune channels \[0\].*0\.weight.*PruningContainer"):
        set_pruned_channels(model, CNN_CONV0, mask(6, 2))
    assert_state_equal(model, saved)
    set_pruned_channels(model, CNN_CONV0, mask(6, 0, 2, 4))  # pruning more is fine
    assert torch.equal(pruned_channels(model, CNN_CONV0), mask(6, 0, 2, 4))


# --------------------------------------------------------------------------- channel state


def test_channel_state_puts_back_the_weights_and_statistics_of_a_step():
    model = cnn().train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))

    def train(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    train(2)  # Adam's moments on every entry
    step = mask(5, 1, 3)
    saved = channel_state(model, CNN_CONV3, step)
    tensors = {"3.weight", "3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var"}
    assert set(saved) == tensors
    assert saved["3.weight"].shape == (2, 6, 3, 3) and saved["4.running_var"].shape == (2,)
    before = {key: value.clone() for key, value in saved.items()}
    trained = channel_state(model, CNN_CONV3, ~step)
    prune_channels(model, CNN_CONV3, step)
    train(3)  # Adam moves the masked entries; the BatchNorm's statistics decay
    moved = channel_state(model, CNN_CONV3, step)
    for key in tensors:
        assert not torch.equal(moved[key], before[key]), key

    set_pruned_channels(model, CNN_CONV3, mask(5))
    load_channel_state(model, CNN_CONV3, step, saved)

    back = channel_state(model, CNN_CONV3, step)
    for key, value in before.items():
        assert torch.equal(back[key], value), key
    assert torch.equal(model[3].weight[step], before["3.weight"])  # effective at once
    kept = channel_state(model, CNN_CONV3, ~step)  # the other channels keep their training
    assert not torch.equal(kept["3.weight"], trained["3.weight"])


def test_load_channel_state_refuses_a_state_that_does_not_fit_and_changes_nothing():
    model = cnn()
    saved = channel_state(model, CNN_CONV3, mask(5, 1, 3))
    with torch.no_grad():
        model[3].weight.mul_(2)
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"state holds \[.3.weight.\], but unit '3' has the tensors .*'4.running_mean'",
    ):
        load_channel_state(model, CNN_CONV3, mask(5, 1, 3), {"3.weight": saved["3.weight"]})
    with pytest.raises(ValueError, match=r"state\['3.weight'\] has shape \(2, 6, 3, 3\).*\(1, 6"):
        load_channel_state(model, CNN_CONV3, mask(5, 1), saved)
    with pytest.raises(ValueError, match=r"channels is a torch.float32 tensor"):
        load_channel_state(model, CNN_CONV3, torch.zeros(5), saved)
    assert_state_equal(model, before)


def test_a_masked_model_loads_plain_weights_and_takes_their_masks():
    saved_model = cnn().eval()
    prune_channels(saved_model, CNN_CONV0, mask(6, 1, 4))
    prune_channels(saved_model, CNN_CONV3, mask(5, 2))
    plain = saved_model.state_dict()
    bake_masks(plain)  # what the callback's checkpoints hold
    x = torch.randn(4, 1, 8, 8)

    loader = cnn().eval()
    with torch.no_grad():
        for p in loader.parameters():
            p.add_(1.0)  # so that loading is what makes it equal
    prune_channels(loader, CNN_CONV0, mask(6, 0, 1, 2))  # other masks than the file's
    loader.load_state_dict(plain)  # strict
    assert torch.equal(pruned_channels(loader, CNN_CONV0), mask(6, 1, 4))
    assert torch.equal(loader(x), saved_model(x))
    assert_masks_are(loader, CNN_CONV0, mask(6, 1, 4))
    prune_channels(loader, CNN_CONV0, mask(6, 0))  # pruning goes on from the loaded masks
    assert torch.equal(pruned_channels(loader, CNN_CONV0), mask(6, 0, 1, 4))


def test_a_state_dict_of_other_shapes_loads_nothing_into_a_masked_model():
    model = cnn().eval()
    prune_channels(model, CNN_CONV0, mask(6, 1, 4))
    saved = snapshot(model)
    wrong = cnn().state_dict()  # plain keys fit, one tensor has another shape
    wrong["3.weight"] = torch.zeros(7, 6, 3, 3)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"other shapes .*'3.weight'.*nothing was loaded"):
            model.load_state_dict(wrong, strict=strict)
        assert_state_equal(model, saved)  # torch alone would have copied the rest
