"""Prunable units found by torch-pruning's dependency graph, on real models.

The expected units are written out by hand from each model's forward: which layers produce
a channel, which BatchNorms normalize it, which layers read it.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from models_for_tests import (
    DataDependentCNN,
    LSTMNet,
    ProjectionBlock,
    ResidualBlock,
    flatten_head_cnn,
    mlp,
    randomize_batchnorms,
)
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning.units import PrunableUnit, find_units

IMAGES = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- models


class TwoBlockResNet(nn.Module):
    """Stem, an identity block, a projection block, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.block1 = ResidualBlock(6)
        self.block2 = ProjectionBlock(6, 10)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(10, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(F.relu(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


RESNET_UNITS = [
    # The stem's channels run through block 1's identity skip: its conv2 writes to them too.
    PrunableUnit(
        name="stem.0",
        producers=("stem.0", "block1.conv2"),
        batchnorms=("stem.1", "block1.bn2"),
        consumers=("block1.conv1", "block2.conv1", "block2.shortcut.0"),
        n_channels=6,
    ),
    PrunableUnit("block1.conv1", ("block1.conv1",), ("block1.bn1",), ("block1.conv2",), 6),
    PrunableUnit("block2.conv1", ("block2.conv1",), ("block2.bn1",), ("block2.conv2",), 10),
    # Block 2's output: its conv2 and its shortcut convolution are added.
    PrunableUnit(
        name="block2.conv2",
        producers=("block2.conv2", "block2.shortcut.0"),
        batchnorms=("block2.bn2", "block2.shortcut.1"),
        consumers=("head",),
        n_channels=10,
    ),
]


class Inverted(nn.Module):
    """A MobileNet block (pointwise, depthwise, pointwise), then a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(1, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 1, groups=2)
        self.head = nn.Linear(6, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn2(self.depthwise(F.relu(self.bn1(self.expand(x))))))
        return self.head(self.grouped(self.project(x)).mean((2, 3)))


class Concatenating(nn.Module):
    """Two convolutions concatenated into a third."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 3, 3, padding=1)
        self.right = nn.Conv2d(1, 4, 3, padding=1)
        self.merge = nn.Conv2d(7, 5, 1)
        self.head = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        merged = self.merge(torch.cat([self.left(x), self.right(x)], dim=1))
        return self.head(merged.mean((2, 3)))


class ConcatenatedResidual(nn.Module):
    """``cat(left(x), right(x)) + wide(x)``: wide's channels are split between two producers."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(1, 3, 3, padding=1)
        self.right = nn.Conv2d(1, 4, 3, padding=1)
        self.wide = nn.Conv2d(1, 7, 3, padding=1)
        self.merge = nn.Conv2d(7, 5, 1)
        self.head = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        joined = torch.cat([self.left(x), self.right(x)], dim=1) + self.wide(x)
        return self.head(self.merge(joined).mean((2, 3)))


class ReturnsResidualStream(nn.Module):
    """``h + b(relu(c(h)))`` is the output: h's channels are the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 10)
        self.c = nn.Linear(10, 7)
        self.b = nn.Linear(7, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x.flatten(1))
        return h + self.b(F.relu(self.c(h)))


class ReturnsFeatures(nn.Module):
    """Returns the logits and the hidden features they are computed from."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 12)
        self.out = nn.Linear(12, 10)
        self.inner = nn.Linear(64, 5)
        self.inner_out = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(1)
        features = self.hidden(x)
        return self.out(features) + self.inner_out(F.relu(self.inner(x))), features


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 8)
        self.b = nn.Linear(8, 10)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x.flatten(1))) * scale)


class Argmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 8)
        self.b = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x.flatten(1))).argmax(1)


def names(units: list[PrunableUnit]) -> list[str]:
    return [unit.name for unit in units]


# --------------------------------------------------------------------------- units found


def test_digits_cnn_has_three_units_and_no_classifier() -> None:
    assert find_units(DigitsCNN(), IMAGES) == [
        PrunableUnit("features.0", ("features.0",), ("features.1",), ("features.3",), 32),
        PrunableUnit("features.3", ("features.3",), ("features.4",), ("features.7",), 32),
        PrunableUnit("features.7", ("features.7",), ("features.8",), ("classifier",), 64),
    ]


def test_digits_cnn_units_follow_its_channels() -> None:
    units = find_units(DigitsCNN(channels=(5, 7, 9, 11)), IMAGES)
    assert names(units) == ["features.0", "features.3", "features.7", "features.10"]
    assert [unit.n_channels for unit in units] == [5, 7, 9, 11]
    assert units[-1].consumers == ("classifier",)


def test_residual_units_couple_the_skip_connections() -> None:
    assert find_units(TwoBlockResNet(), IMAGES) == RESNET_UNITS


def test_mlp_units() -> None:
    assert find_units(mlp(hidden=12), IMAGES) == [
        PrunableUnit("1", ("1",), ("2",), ("4",), 12),
        PrunableUnit("4", ("4",), (), ("6",), 16),
    ]


def test_flattened_channels_feed_a_linear_consumer() -> None:
    # 6 channels of 8x8 are 384 inputs of the head, 64 per channel, channel-major.
    assert find_units(flatten_head_cnn(6), IMAGES) == [PrunableUnit("0", ("0",), ("1",), ("4",), 6)]


def test_data_dependent_forward_traces_through_autograd() -> None:
    assert find_units(DataDependentCNN(), IMAGES) == [
        PrunableUnit("conv", ("conv",), ("bn",), ("head",), 6)
    ]


def test_a_model_with_no_prunable_layer_has_no_units() -> None:
    assert find_units(LSTMNet(), IMAGES) == []


def test_depthwise_conv_is_a_producer_of_its_input_channels() -> None:
    with pytest.warns(UserWarning, match="grouped Conv2d"):
        units = find_units(Inverted(), IMAGES)
    assert units == [
        PrunableUnit("expand", ("expand", "depthwise"), ("bn1", "bn2"), ("project",), n_channels=8)
    ]


def test_grouped_conv_groups_are_skipped_with_their_reason() -> None:
    with pytest.warns(UserWarning) as record:
        find_units(Inverted(), IMAGES)
    message = str(record[0].message)
    # project's channels are read by the grouped conv; grouped's own channels are its output.
    assert "'project'" in message and "'grouped' is a grouped Conv2d (groups=2)" in message
    with pytest.raises(ValueError, match="'project' cannot be pruned: 'grouped' is a grouped"):
        find_units(Inverted(), IMAGES, layers=["project"])


def test_concatenated_channels_are_skipped() -> None:
    with pytest.warns(UserWarning, match="'left'.*3 channels among 7 inputs"):
        units = find_units(Concatenating(), IMAGES)
    assert units == [PrunableUnit("merge", ("merge",), (), ("head",), 5)]


def test_producers_joined_through_a_concatenation_are_skipped() -> None:
    with pytest.warns(UserWarning) as record:
        units = find_units(ConcatenatedResidual(), IMAGES)
    assert units == [PrunableUnit("merge", ("merge",), (), ("head",), 5)]
    message = str(record[0].message)
    assert "'left': 'wide' holds 7 channels coupled to 3" in message
    assert "'right': 'wide' holds 7 channels coupled to 4" in message


def test_unsupported_coupled_layers_are_skipped() -> None:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
        nn.Linear(6, 10),
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"'1': coupled to '2' \(LayerNorm\)"):
        units = find_units(model, IMAGES)
    assert units == [PrunableUnit("4", ("4",), (), ("6",), 6)]


def test_a_groupnorm_unit_has_one_channel_per_group() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.GroupNorm(3, 6), nn.ReLU(), nn.Conv2d(6, 4, 3),
        nn.GroupNorm(4, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10),
    )  # fmt: skip
    units = find_units(model, IMAGES)
    assert units == [
        PrunableUnit("0", ("0",), ("1",), ("3",), 3),
        PrunableUnit("3", ("3",), ("4",), ("7",), 4),
    ]


# --------------------------------------------------------------------------- the output


def test_the_output_layer_is_never_a_unit() -> None:
    for model in (DigitsCNN(), TwoBlockResNet(), mlp()):
        output = list(model.named_modules())[-1][0]
        units = find_units(model, IMAGES)
        assert all(output not in unit.producers for unit in units)
        assert any(output in unit.consumers for unit in units)
        with pytest.raises(ValueError, match=f"'{output}'.*output layer cannot be pruned"):
            find_units(model, IMAGES, layers=[output])


def test_a_returned_residual_stream_is_not_a_unit() -> None:
    # a's channels reach the output through the add; c's channels are only read by b.
    units = find_units(ReturnsResidualStream(), IMAGES)
    assert units == [PrunableUnit("c", ("c",), (), ("b",), 7)]
    with pytest.raises(ValueError, match="'a' produces the model's output channels"):
        find_units(ReturnsResidualStream(), IMAGES, layers=["a"])


def test_returned_features_are_not_a_unit() -> None:
    units = find_units(ReturnsFeatures(), IMAGES)
    assert units == [PrunableUnit("inner", ("inner",), (), ("inner_out",), 5)]


# --------------------------------------------------------------------------- layers=


def test_layers_selects_units_in_the_given_order() -> None:
    model = TwoBlockResNet()
    chosen = find_units(model, IMAGES, layers=["block2.shortcut.0", "stem.0"])
    assert chosen == [RESNET_UNITS[3], RESNET_UNITS[0]]
    # Two producers of one unit give it once.
    chosen = find_units(model, IMAGES, layers=["block1.conv2", "block1.conv1", "stem.0"])
    assert chosen == [RESNET_UNITS[0], RESNET_UNITS[1]]
    assert find_units(model, IMAGES, layers=[]) == []


def test_layers_errors_name_every_bad_value() -> None:
    with pytest.raises(ValueError) as error:
        find_units(DigitsCNN(), IMAGES, layers=["features.1", "features.0", "nope", "classifier"])
    message = str(error.value)
    assert "'features.1' is not a producer" in message
    assert "'nope' is not a producer" in message
    assert "valid names: ['features.0', 'features.3', 'features.7']" in message
    assert "'classifier' produces the model's output channels; the output layer cannot" in message
    assert "'features.0'" not in message.split("valid names")[0]


def test_layers_as_a_string_is_refused() -> None:
    with pytest.raises(ValueError, match=r"layers='features.0' is a string.*\['features.0'\]"):
        find_units(DigitsCNN(), IMAGES, layers="features.0")


# --------------------------------------------------------------------------- inputs


def test_example_inputs_may_be_a_tuple_of_arguments() -> None:
    units = find_units(TwoInputs(), (IMAGES, torch.tensor(2.0)))
    assert units == [PrunableUnit("a", ("a",), (), ("b",), 8)]


def test_a_model_torch_pruning_cannot_trace_raises() -> None:
    with pytest.raises(ValueError, match=r"could not trace Argmax.*no output of the model"):
        find_units(Argmax(), IMAGES)
    # The underlying error is part of the message.
    with pytest.raises(ValueError, match=r"could not trace Sequential.*mat1 and mat2"):
        find_units(mlp(), torch.randn(4, 1, 7, 7))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="model is a str"):
        find_units("DigitsCNN", IMAGES)
    with pytest.raises(ValueError, match="example_inputs: the inputs are a ndarray"):
        find_units(DigitsCNN(), IMAGES.numpy())


# --------------------------------------------------------------------------- left as found


HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def snapshot(model: nn.Module) -> dict:
    params = model.named_parameters()
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in params},
        "buffers": {n: (b, b.clone()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: {h: dict(getattr(m, h)) for h in HOOKS} for n, m in model.named_modules()},
        "attributes": {n: dict(vars(m)) for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    for name, (param, value, requires_grad, grad) in before["params"].items():
        now = after["params"][name]
        assert now[0] is param and now[2] == requires_grad and now[3] is grad
        assert torch.equal(param, value), name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, (buffer, value) in before["buffers"].items():
        assert after["buffers"][name][0] is buffer and torch.equal(buffer, value), name
    for name, attributes in before["attributes"].items():
        now = after["attributes"][name]
        assert now.keys() == attributes.keys(), name
        assert all(now[key] is value for key, value in attributes.items()), name


def test_the_model_is_left_as_found() -> None:
    model = randomize_batchnorms(TwoBlockResNet())
    model.train()
    model.block1.eval()  # mixed flags: tracing switches its copy to eval mode
    model.stem[0].weight.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.block2.register_forward_hook(lambda module, args, output: None)
    before = snapshot(model)

    assert find_units(model, IMAGES) == RESNET_UNITS

    assert_unchanged(model, before)
    # A forward in train mode would have counted a batch.
    assert int(model.block2.bn1.num_batches_tracked) == 0
    assert model.training and not model.block1.training and model.block2.training


def test_frozen_layers_are_still_found() -> None:
    # torch-pruning follows autograd: on the model itself, frozen layers would vanish.
    model = DigitsCNN().requires_grad_(False)
    assert names(find_units(model, IMAGES)) == ["features.0", "features.3", "features.7"]
    assert not any(p.requires_grad for p in model.parameters())


def test_a_model_masked_by_torch_prune_is_traced_and_left_as_found() -> None:
    model = DigitsCNN()
    prune.ln_structured(model.features[3], "weight", amount=0.5, n=1, dim=0)
    model(IMAGES)  # leaves a non-leaf `weight`, which copy.deepcopy refuses
    assert model.features[3].weight.grad_fn is not None
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(find_units(model, IMAGES)) == ["features.0", "features.3", "features.7"]
    assert_unchanged(model, before)
