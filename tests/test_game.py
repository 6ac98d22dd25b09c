"""The channel game against a naive reference: one plain forward pass per coalition.

The reference knows nothing of engines, caching, folding or batching: it deep-copies the
model, hooks the module whose output is masked (the BatchNorm after a convolution, so its
shift cannot leak) and runs every scoring batch once per coalition.
"""

import copy
import itertools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from models_for_tests import (
    DataDependentCNN,
    InvertedResidualNet,
    LSTMNet,
    PreActResidualNet,
    ProjectionNet,
    ResidualNet,
    ShapeBranchingCNN,
    flatten_head_cnn,
    mlp,
    pruned_values,
    randomize_batchnorms,
    train_digits_cnn,
)
from torch import Tensor, nn
from torch.nn.utils import prune
from torchmetrics.classification import MulticlassF1Score

from lightning_shapley import ChannelGame, shapley_values
from lightning_shapley.app.models import DigitsCNN
from lightning_shapley.pruning.masking import prune_channels, pruned_channels
from lightning_shapley.pruning.recalibration import batchnorms
from lightning_shapley.pruning.units import PrunableUnit, find_units
from lightning_shapley.shapley.capture import UnsplittableModelError
from lightning_shapley.shapley.estimators import exact
from lightning_shapley.shapley.values import accuracy, negative_loss

Batches = list[tuple[Tensor, Tensor]]

# The prunable convolutions of DigitsCNN and the BatchNorm right after each.
CNN_LAYERS = {"features.0": "features.1", "features.3": "features.4", "features.7": "features.8"}
CNN_RELUS = {"features.0": "features.2", "features.3": "features.5", "features.7": "features.9"}
ENGINES = ["split+fold", "split", "full"]


# --------------------------------------------------------------------------- the reference


def negative_cross_entropy(logits: Tensor, targets: Tensor) -> float:
    return -F.cross_entropy(logits.float(), targets).item()


def naive_values(
    model: nn.Module,
    mask_module: str,
    batches: Batches,
    channel_masks: Tensor,
    value: Callable[[Tensor, Tensor], float] = negative_cross_entropy,
) -> Tensor:
    """Values of ``[m, C]`` channel masks: one forward pass per coalition over all batches."""
    model = copy.deepcopy(model).eval()
    module = model.get_submodule(mask_module)
    targets = torch.cat([y for _, y in batches])
    values = []
    for mask in channel_masks.float():

        def zero_channels(_module: nn.Module, _inputs: object, output: Tensor, mask=mask) -> Tensor:
            return output * mask.to(output.dtype).reshape(1, -1, *[1] * (output.ndim - 2))

        handle = module.register_forward_hook(zero_channels)
        try:
            with torch.no_grad():
                logits = torch.cat([model(x) for x, _ in batches])
        finally:
            handle.remove()
        values.append(float(value(logits, targets)))
    return torch.tensor(values, dtype=torch.float64)


def random_coalitions(n: int, m: int = 20, seed: int = 0) -> Tensor:
    """``m`` boolean coalitions of ``n`` players: the full and empty ones, then random ones."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(m - 2, 1, generator=generator)  # a different density per coalition
    random = torch.rand(m - 2, n, generator=generator) < keep
    return torch.cat(
        [torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool), random]
    )


def true_class_probability(logits: Tensor, targets: Tensor) -> float:
    return logits.softmax(1).gather(1, targets[:, None]).mean().item()


def reference_accuracy(logits: Tensor, targets: Tensor) -> float:
    return (logits.argmax(1) == targets).double().mean().item()


def reference_f1(logits: Tensor, targets: Tensor) -> float:
    return MulticlassF1Score(num_classes=10)(logits, targets).item()


VALUE_SETTINGS = [
    pytest.param("loss", negative_cross_entropy, id="loss"),
    pytest.param("accuracy", reference_accuracy, id="accuracy"),
    pytest.param(MulticlassF1Score(num_classes=10), reference_f1, id="torchmetrics-f1"),
    pytest.param(true_class_probability, true_class_probability, id="callable"),
]


# --------------------------------------------------------------------------- 1. game == reference


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layer", list(CNN_LAYERS))
@pytest.mark.parametrize(("value", "reference"), VALUE_SETTINGS)
def test_game_values_equal_naive_reference(
    trained_cnn, score_batches, layer, engine, value, reference
):
    game = ChannelGame(trained_cnn, layer, score_batches, value=value, engine=engine)
    assert game.engine == engine
    assert game.mask_module_name == CNN_LAYERS[layer]
    coalitions = random_coalitions(game.n_players)
    expected = naive_values(trained_cnn, CNN_LAYERS[layer], score_batches, coalitions, reference)
    values = game(coalitions)
    assert values.dtype == torch.float64 and values.shape == (len(coalitions),)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    # The coalitions are worth different amounts, so a game that ignores its mask fails.
    assert values.max() - values.min() > 1e-3


@pytest.mark.parametrize("layer", list(CNN_LAYERS))
def test_auto_engine_splits_and_folds_the_digits_cnn(trained_cnn, score_batches, layer):
    assert ChannelGame(trained_cnn, layer, score_batches).engine == "split+fold"


@pytest.mark.parametrize("coalitions_per_forward", [1, 7])
@pytest.mark.parametrize("engine", ENGINES)
def test_batching_coalitions_does_not_change_values(
    trained_cnn, score_batches, engine, coalitions_per_forward
):
    default = ChannelGame(trained_cnn, "features.3", score_batches, engine=engine)
    batched = ChannelGame(
        trained_cnn,
        "features.3",
        score_batches,
        engine=engine,
        coalitions_per_forward=coalitions_per_forward,
    )
    coalitions = random_coalitions(default.n_players, seed=1)
    # The default stacks more coalitions per forward pass than either fixed setting.
    assert default.coalitions_per_forward > 7
    assert batched.coalitions_per_forward == coalitions_per_forward
    torch.testing.assert_close(batched(coalitions), default(coalitions), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 2. exact values


@pytest.fixture(scope="module")
def small_cnn(digits_splits_fixture) -> DigitsCNN:
    """A DigitsCNN with a 10-channel middle layer, trained for two epochs."""
    return train_digits_cnn(digits_splits_fixture.train, (8, 10, 16), epochs=2, seed=1)


@pytest.fixture(scope="module")
def naive_exact_values(small_cnn, score_batches) -> Tensor:
    """Exact Shapley values of ``features.3``, every coalition through the naive reference."""
    estimate = exact(lambda c: naive_values(small_cnn, "features.4", score_batches, c), 10)
    assert estimate.evaluations == 2**10
    return estimate.values


@pytest.mark.parametrize("engine", ["auto", "full"])
def test_exact_shapley_values_equal_enumeration_of_naive_reference(
    small_cnn, score_batches, naive_exact_values, engine
):
    estimate = shapley_values(small_cnn, "features.3", score_batches, method="exact", engine=engine)
    assert estimate.evaluations == 2**10
    torch.testing.assert_close(estimate.values, naive_exact_values, atol=1e-6, rtol=0)
    assert torch.equal(estimate.stderr, torch.zeros(10, dtype=torch.float64))
    assert naive_exact_values.abs().max() > 1e-3


# --------------------------------------------------------------------------- 3. zero after BN


def _assert_zero_outside_coalitions(outputs: list[Tensor], coalitions: Tensor) -> None:
    """Checks sample-major stacks: row ``b * k + j`` is sample ``b`` in coalition ``j``."""
    assert outputs
    k = len(coalitions)
    for output in outputs:
        stacked = output.reshape(-1, k, *output.shape[1:])
        for j, coalition in enumerate(coalitions):
            assert torch.all(stacked[:, j][:, ~coalition] == 0)
        # Kept channels still carry signal in every non-empty coalition.
        assert all(stacked[:, j][:, c].abs().sum() > 0 for j, c in enumerate(coalitions) if c.any())


@pytest.mark.parametrize("engine", ["full", "split"])
@pytest.mark.parametrize("layer", ["features.0", "features.3"])
def test_masked_channels_are_exactly_zero_after_batchnorm(
    trained_cnn, score_batches, layer, engine
):
    # The ReLU after the BatchNorm runs per coalition in both engines (unfolded, the split
    # engine masks the cached BatchNorm output and replays the ReLU).
    model = copy.deepcopy(trained_cnn).eval()
    game = ChannelGame(model, layer, score_batches, engine=engine, coalitions_per_forward=6)
    coalitions = random_coalitions(game.n_players, m=6, seed=3)
    outputs: list[Tensor] = []
    relu = model.get_submodule(CNN_RELUS[layer])
    handle = relu.register_forward_hook(lambda _m, _i, output: outputs.append(output.clone()))
    try:
        game(coalitions)
    finally:
        handle.remove()
    assert len(outputs) == len(score_batches)
    _assert_zero_outside_coalitions(outputs, coalitions)


# --------------------------------------------------------------------------- 4. model unchanged


@pytest.fixture
def model_in_train_mode(trained_cnn) -> DigitsCNN:
    """The trained CNN in train mode, one BatchNorm in eval mode and one weight frozen."""
    model = copy.deepcopy(trained_cnn).train()
    model.features[4].eval()
    model.features[0].weight.requires_grad_(False)
    return model


def _snapshot(model: nn.Module) -> dict[str, object]:
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return {
        "tensors": {name: t.detach().clone() for name, t in tensors},
        "parameter_ids": [id(p) for p in model.parameters()],
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _bits(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(_bits(after["tensors"][name]), _bits(tensor)), name
    assert after["parameter_ids"] == before["parameter_ids"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine", ["auto", "full"])
def test_scoring_leaves_the_model_unchanged(model_in_train_mode, score_batches, engine):
    model = model_in_train_mode
    before = _snapshot(model)
    assert before["training"][""] and not before["training"]["features.4"]
    game = ChannelGame(model, "features.3", score_batches, engine=engine)
    game(random_coalitions(game.n_players, m=5))
    estimate = shapley_values(
        model, "features.3", score_batches, method="permutation", num_permutations=4, engine=engine
    )
    assert torch.isfinite(estimate.values).all()
    _assert_unchanged(model, before)


class _RaisesOnCall:
    """A value callable that raises ``error`` on its ``fail_at``-th call."""

    def __init__(self, error: type[BaseException], fail_at: int = 3) -> None:
        self.error, self.fail_at, self.calls = error, fail_at, 0

    def __call__(self, logits: Tensor, targets: Tensor) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("raised by the test's value function")
        return negative_cross_entropy(logits, targets)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("engine", ["auto", "full"])
def test_exception_from_value_function_leaves_the_model_unchanged(
    model_in_train_mode, score_batches, engine, error
):
    model = model_in_train_mode
    before = _snapshot(model)
    value = _RaisesOnCall(error)
    with pytest.raises(error, match="raised by the test"):
        shapley_values(
            model, "features.3", score_batches, value=value, method="permutation", engine=engine
        )
    assert value.calls == 3
    _assert_unchanged(model, before)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("engine", ["auto", "full"])
def test_exception_inside_a_coalition_forward_leaves_the_model_unchanged(
    model_in_train_mode, score_batches, engine, error
):
    # Raised while the coalitions run through the head, i.e. while the full engine's mask
    # hook is registered: the probe and sizing passes see one batch of 50, and the check
    # that stacking is exact two, not k * 50 rows.
    model = model_in_train_mode
    before = _snapshot(model)

    def fail_on_stacked_coalitions(_module: nn.Module, args: tuple) -> None:
        if len(args[0]) > 2 * len(score_batches[0][0]):
            raise error("raised by the test's hook")

    handle = model.classifier.register_forward_pre_hook(fail_on_stacked_coalitions)
    try:
        with pytest.raises(error, match="raised by the test"):
            shapley_values(model, "features.3", score_batches, method="permutation", engine=engine)
    finally:
        handle.remove()
    _assert_unchanged(model, before)


# --------------------------------------------------------------------------- 5. other models


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorms(factory(), seed)


# (factory, layer, module masked by the reference, engine name for "auto")
# (factory, layer, module masked by the reference, engine of "auto", engine of "export";
# None where torch.fx or torch.export cannot capture the model)
_MODELS = {
    "data-dependent": (DataDependentCNN, "conv", "bn", "full", None),
    "shape-branching": (ShapeBranchingCNN, "conv", "bn", "export", "export"),
    "residual-conv1": (ResidualNet, "block.conv1", "block.bn1", "split+fold", "export+fold"),
    "residual-conv2": (ResidualNet, "block.conv2", "block.bn2", "split", "export"),
    "mlp": (mlp, "1", "2", "split+fold", "export+fold"),
    "flatten-into-linear": (flatten_head_cnn, "0", "1", "split+fold", "export+fold"),
}
OTHER_MODELS = [
    pytest.param(*case, engine, id=f"{name}-{engine}")
    for name, case in _MODELS.items()
    for engine in ("auto", "split", "export", "full")
]


@pytest.mark.parametrize(
    ("factory", "layer", "mask_module", "auto_name", "export_name", "engine"), OTHER_MODELS
)
def test_other_models_equal_naive_reference(
    score_batches, factory, layer, mask_module, auto_name, export_name, engine
):
    model = _seeded(factory)
    traceable = auto_name.startswith("split")  # by torch.fx
    if (engine == "split" and not traceable) or (engine == "export" and export_name is None):
        with pytest.raises(UnsplittableModelError, match=r"cannot trace|cannot capture"):
            ChannelGame(model, layer, score_batches, engine=engine)
        return
    game = ChannelGame(model, layer, score_batches, engine=engine)
    assert game.engine == {"auto": auto_name, "export": export_name}.get(engine, engine)
    assert game.mask_module_name == mask_module
    coalitions = random_coalitions(game.n_players, seed=4)
    expected = naive_values(model, mask_module, score_batches, coalitions)
    values = game(coalitions)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert values.max() - values.min() > 1e-3


# --------------------------------------------------------------------------- 6. pruned channels


@pytest.mark.parametrize("engine", ["auto", "full"])
def test_a_focused_game_holds_the_other_channels_in_every_coalition(
    trained_cnn, score_batches, engine
):
    pruned = torch.zeros(16, dtype=torch.bool)
    pruned[[2, 9]] = True
    candidates = torch.arange(16) % 4 == 1  # 1, 5, 9 and 13; 9 is pruned already
    game = ChannelGame(trained_cnn, "features.0", score_batches, pruned=pruned, engine=engine)
    game.focus(candidates)
    assert game.players.tolist() == [1, 5, 13]
    coalitions = random_coalitions(3, m=6, seed=2)
    masks = (~pruned & ~candidates).float().repeat(len(coalitions), 1)
    masks[:, [1, 5, 13]] = coalitions.float()
    expected = naive_values(trained_cnn, "features.1", score_batches, masks)
    torch.testing.assert_close(game(coalitions), expected, atol=1e-5, rtol=0)
    game.focus(None)
    assert game.n_players == 14
    with pytest.raises(ValueError, match="no candidate is a channel still in play"):
        game.focus(pruned)


@pytest.mark.parametrize("engine", ["auto", "full"])
@pytest.mark.parametrize("source", ["argument", "prune-mask", "both"])
def test_already_pruned_channels_are_not_players(trained_cnn, score_batches, source, engine):
    model = copy.deepcopy(trained_cnn)
    pruned = torch.zeros(16, dtype=torch.bool)
    given = None
    if source in ("argument", "both"):
        given = torch.zeros(16, dtype=torch.bool)
        given[[1, 6, 11]] = True
        pruned |= given
    if source in ("prune-mask", "both"):
        conv = model.features[0]
        prune.ln_structured(conv, "weight", amount=0.25, n=1, dim=0)
        from_mask = conv.weight_mask.flatten(1).eq(0).all(1)
        assert from_mask.sum() == 4
        pruned |= from_mask
    players = (~pruned).nonzero().flatten()

    game = ChannelGame(model, "features.0", score_batches, pruned=given, engine=engine)
    assert game.n_players == len(players) == 16 - int(pruned.sum())
    assert torch.equal(game.players, players)
    coalitions = random_coalitions(game.n_players, m=12, seed=5)
    masks = torch.zeros(len(coalitions), 16)
    masks[:, players] = coalitions.float()
    expected = naive_values(model, "features.1", score_batches, masks)
    torch.testing.assert_close(game(coalitions), expected, atol=1e-5, rtol=0)

    estimate = shapley_values(
        model,
        "features.0",
        score_batches,
        pruned=given,
        method="permutation",
        num_permutations=4,
        engine=engine,
    )
    assert estimate.values.shape == (16,)
    assert torch.equal(estimate.values.isnan(), pruned)
    assert torch.equal(estimate.stderr.isnan(), pruned)


# --------------------------------------------------------------------------- 7. errors


def _game(model: nn.Module, batches: Batches, **kwargs: object) -> ChannelGame:
    return ChannelGame(model, kwargs.pop("layer", "features.0"), batches, **kwargs)


def _values(model: nn.Module, batches: Batches, **kwargs: object) -> object:
    return shapley_values(model, kwargs.pop("layer", "features.0"), batches, **kwargs)


ERRORS = [
    pytest.param(
        lambda m, b: _game(m, b, layer="features.99"),
        r"layer='features\.99'.*'features\.0'",
        id="unknown-layer",
    ),
    pytest.param(lambda m, b: _game(m, []), r"batches is empty.*\(inputs, targets\)", id="empty"),
    pytest.param(
        lambda m, b: _game(m, [b[0][0]]),
        r"batches\[0\] is a Tensor.*\(inputs, targets\) pair",
        id="batch-not-a-pair",
    ),
    pytest.param(
        lambda m, b: _game(m, [(*b[0], b[0][1])]),
        r"batches\[0\] is a tuple.*\(inputs, targets\) pair",
        id="batch-triple",
    ),
    pytest.param(
        lambda m, b: _game(m, b, channel_dim=5),
        r"channel_dim=5.*shape \(50, 16, 8, 8\).*1 to 3",
        id="channel-dim",
    ),
    pytest.param(
        lambda m, b: _game(LSTMNet(), b, layer="lstm"),
        r"\(tuple\) has no channel dimension",
        id="tuple-output",
    ),
    pytest.param(
        lambda m, b: _game(m, b, value="f1"), r"value='f1'.*'loss', 'accuracy'", id="value-name"
    ),
    pytest.param(
        lambda m, b: _game(m, b, value=3), r"value=3 is not allowed.*'loss'", id="value-type"
    ),
    pytest.param(
        lambda m, b: _game(m, b, engine="turbo"),
        r"engine='turbo'.*'auto', 'split\+fold', 'split', 'export', 'full'",
        id="engine",
    ),
    pytest.param(
        lambda m, b: _game(m, b)(torch.ones(2, 5, dtype=torch.bool)),
        r"shape \(2, 5\).*\[m, 16\]",
        id="coalition-width",
    ),
    pytest.param(
        lambda m, b: _values(m, b, method="kernel"),
        r"method='kernel'.*'exact', 'permutation'",
        id="method",
    ),
    pytest.param(
        lambda m, b: _values(m, b, method="exact", truncation=0.1),
        r"\['truncation'\] are not options of method='exact'",
        id="option-not-taken",
    ),
    pytest.param(
        lambda m, b: _values(m, b, method="permutation", num_permutations=0),
        r"num_permutations=0.*integer of at least 1",
        id="num-permutations-zero",
    ),
    pytest.param(
        lambda m, b: _values(m, b, method="tmc", num_permutations=-4),
        r"num_permutations=-4.*integer of at least 1",
        id="num-permutations-negative",
    ),
    pytest.param(
        lambda m, b: _values(m, b, layer="features.7", method="exact"),
        r"method='exact'.*shapley on 32 players.*more than the limit",
        id="exact-too-large",
    ),
    pytest.param(
        lambda m, b: _values(
            m, b, value=lambda *_: math.nan, method="permutation", num_permutations=4
        ),
        r"returned nan.*must be finite",
        id="nan-value",
    ),
]


@pytest.mark.parametrize(("trigger", "match"), ERRORS)
def test_bad_settings_raise_value_error(trained_cnn, score_batches, trigger, match):
    with pytest.raises(ValueError, match=match):
        trigger(trained_cnn, score_batches)


# --------------------------------------------------------------------------- 8. value functions


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 4, 3, 6)], ids=["classes", "classes-by-position"])
def test_negative_loss_is_negative_cross_entropy_per_coalition(shape):
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(shape, generator=generator)
    targets = torch.randint(0, shape[2], (shape[1], *shape[3:]), generator=generator)
    expected = torch.stack([-F.cross_entropy(coalition, targets) for coalition in logits])
    torch.testing.assert_close(negative_loss(logits, targets), expected)


def test_accuracy_on_a_hand_made_case():
    targets = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor(
        [
            [[3.0, 0, 0], [0, 2, 1], [0, 0, 5], [1, 4, 0]],  # all right
            [[0.0, 3, 0], [0, 2, 1], [9, 0, 5], [1, 0, 2]],  # only sample 1 right
            [[0.0, 0, 1], [2, 0, 0], [0, 7, 0], [0, 0, 1]],  # all wrong
        ]
    )
    torch.testing.assert_close(accuracy(logits, targets), torch.tensor([1.0, 0.25, 0.0]))


def test_accuracy_takes_classes_from_dimension_one_like_negative_loss():
    # Logits [k, N, C, L] with C == L: the shapes broadcast, so a wrong class dim is silent.
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 3, 3, generator=generator)
    targets = torch.randint(0, 3, (5, 3), generator=generator)
    expected = torch.stack([(c.argmax(1) == targets).float().mean() for c in logits])
    torch.testing.assert_close(accuracy(logits, targets), expected)


# --------------------------------------------------------------------------- odd models


@pytest.mark.parametrize("engine", ENGINES)
def test_reduced_precision_model(trained_cnn, score_batches, engine):
    model = copy.deepcopy(trained_cnn).to(torch.bfloat16)
    batches = [(x.to(torch.bfloat16), y) for x, y in score_batches]
    game = ChannelGame(model, "features.3", batches, engine=engine)
    coalitions = random_coalitions(game.n_players, m=4)
    values = game(coalitions)
    expected = naive_values(model, "features.4", batches, coalitions.to(torch.bfloat16))
    torch.testing.assert_close(values, expected, atol=1e-2, rtol=0)


def test_batching_with_batch_statistics_downstream(score_batches):
    # A BatchNorm without running statistics normalizes by batch statistics in eval mode
    # too; k coalitions stacked into one batch then see each other's statistics.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 64, 10),
    ).eval()
    coalitions = random_coalitions(6, m=8)
    one_at_a_time = ChannelGame(model, "0", score_batches, coalitions_per_forward=1)
    torch.testing.assert_close(
        one_at_a_time(coalitions),
        naive_values(model, "0", score_batches, coalitions),
        atol=1e-5,
        rtol=0,
    )
    default = ChannelGame(model, "0", score_batches)
    assert default.coalitions_per_forward == 1
    torch.testing.assert_close(default(coalitions), one_at_a_time(coalitions), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"coalitions_per_forward=4 .*track_running_stats=False"):
        ChannelGame(model, "0", score_batches, coalitions_per_forward=4)


def test_hooks_on_the_next_layer_keep_it_from_being_folded(score_batches):
    # Folding calls the layer's functional form, which would skip its hooks.
    torch.manual_seed(0)
    model = flatten_head_cnn().eval()
    hooked = next(m for m in model.modules() if isinstance(m, nn.Linear))
    hooked.register_forward_hook(lambda _m, _i, out: out * 3)
    game = ChannelGame(model, "0", score_batches)
    assert game.engine == "split"
    coalitions = random_coalitions(game.n_players, seed=5)
    expected = naive_values(model, "1", score_batches, coalitions)
    torch.testing.assert_close(game(coalitions), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_after_relu_is_masked_after_too(score_batches, engine):
    # Conv-ReLU-BN: masking the conv alone would let the BatchNorm's shift through.
    torch.manual_seed(0)
    model = randomize_batchnorms(
        nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1),
            nn.ReLU(),
            nn.BatchNorm2d(6),
            nn.Conv2d(6, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 64, 10),
        ).eval(),
        seed=0,
    )
    game = ChannelGame(model, "0", score_batches, engine=engine)
    assert game.mask_module_name == "2"
    coalitions = random_coalitions(game.n_players, seed=6)
    expected = naive_values(model, "2", score_batches, coalitions)
    torch.testing.assert_close(game(coalitions), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- 9. several producers

# A unit whose channels several layers produce: (model, unit, the game's mask points when
# given the unit's producers and BatchNorms, whether the producers alone are enough).
_COUPLED = {
    # stem.0 and block.conv2 meet in an identity skip; block.bn2 is downstream of stem.1.
    "identity-skip": (ResidualNet, "stem.0", ("stem.1", "block.bn2"), True),
    # conv2 and the 1x1 shortcut meet in an add; neither mask point precedes the other.
    "projection-shortcut": (ProjectionNet, "conv2", ("bn2", "shortcut.1"), True),
    # The depthwise convolution's output is downstream of the expand convolution's.
    "expand-depthwise": (InvertedResidualNet, "expand", ("bn1", "bn2"), True),
    "inverted-skip": (InvertedResidualNet, "stem.0", ("stem.1", "bn3"), True),
    # The stem feeds bn1 and the skip, so it is masked as well as bn1; bn_out follows
    # the add, so only the unit's BatchNorms name it.
    "pre-activation": (PreActResidualNet, "stem", ("stem", "bn1", "conv2", "bn_out"), False),
}


def coupled_unit(factory: Callable[[], nn.Module], name: str, batches: Batches) -> tuple:
    model = _seeded(factory)
    (unit,) = find_units(model, batches[0][0][:4], [name])
    assert len(unit.producers) == 2
    return model, unit


def unit_layers(unit: PrunableUnit, which: str) -> tuple[str, ...]:
    return unit.producers if which == "producers" else (*unit.producers, *unit.batchnorms)


COUPLED_CASES = [
    pytest.param(factory, name, points, which, engine, id=f"{case}-{which}-{engine}")
    for case, (factory, name, points, producers_suffice) in _COUPLED.items()
    for which in ("producers", "producers+batchnorms")
    if producers_suffice or which != "producers"
    for engine in ("auto", "split", "full")
]


@pytest.mark.parametrize(("factory", "unit_name", "mask_points", "which", "engine"), COUPLED_CASES)
def test_coupled_unit_values_equal_the_pruned_model(
    score_batches, factory, unit_name, mask_points, which, engine
):
    model, unit = coupled_unit(factory, unit_name, score_batches)
    game = ChannelGame(model, unit_layers(unit, which), score_batches, engine=engine)
    assert game.engine == ("split" if engine == "auto" else engine)
    if which != "producers":
        assert game.mask_module_names == mask_points
    assert game.n_players == game.n_channels == unit.n_channels
    coalitions = random_coalitions(unit.n_channels, m=10, seed=8)
    expected = pruned_values(model, unit, score_batches, coalitions)
    values = game(coalitions)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    assert values.max() - values.min() > 1e-3


@pytest.mark.parametrize(
    ("factory", "unit_name"),
    [
        pytest.param(ResidualNet, "stem.0", id="identity-skip"),
        pytest.param(InvertedResidualNet, "expand", id="expand-depthwise"),
        pytest.param(PreActResidualNet, "stem", id="pre-activation"),
    ],
)
def test_exact_values_of_a_coupled_unit_equal_enumeration_of_pruned_models(
    score_batches, factory, unit_name
):
    model, unit = coupled_unit(factory, unit_name, score_batches)
    n = unit.n_channels
    assert n <= 8
    reference = exact(lambda c: pruned_values(model, unit, score_batches, c), n)
    layers = (*unit.producers, *unit.batchnorms)
    estimate = shapley_values(model, layers, score_batches, method="exact")
    assert estimate.evaluations == 2**n
    torch.testing.assert_close(estimate.values, reference.values, atol=1e-5, rtol=0)
    assert reference.values.abs().max() > 1e-3


def test_a_layer_whose_output_passes_its_batchnorm_by_is_masked_too(score_batches):
    # PreActResidualNet's stem feeds bn1 and the skip: masking after bn1 alone would let
    # the stem's channels through the skip.
    model = _seeded(PreActResidualNet)
    game = ChannelGame(model, "stem", score_batches)
    assert game.mask_module_names == ("stem", "bn1")
    with pytest.raises(AttributeError, match=r"masks the outputs of 2 modules.*mask_module_names"):
        _ = game.mask_module_name
    # Where the layer's output goes only into its BatchNorm, the mask stays after it.
    assert ChannelGame(model, "conv1", score_batches).mask_module_names == ("bn2",)


def test_a_sequence_with_one_mask_point_plays_like_the_single_layer(trained_cnn, score_batches):
    single = ChannelGame(trained_cnn, "features.3", score_batches)
    both = ChannelGame(trained_cnn, ["features.3", "features.4", "features.3"], score_batches)
    assert both.layers == ("features.3", "features.4")
    assert both.mask_module_names == (single.mask_module_name,) == ("features.4",)
    assert both.mask_module_name == "features.4"
    assert both.engine == single.engine == "split+fold"
    coalitions = random_coalitions(single.n_players, seed=9)
    torch.testing.assert_close(both(coalitions), single(coalitions), atol=1e-6, rtol=0)


def test_coupled_unit_with_pruned_channels(score_batches):
    # Channels pruned by masking.py are not players: those every mask there zeroes, as
    # masking.pruned_channels counts them (a prune.ln_structured on one producer too).
    model, unit = coupled_unit(ResidualNet, "stem.0", score_batches)
    already = torch.tensor([False, True, False, False, True, False])
    masked = pruned_copy_for_game(model, unit, already)
    game = ChannelGame(masked, unit.producers, score_batches)
    assert torch.equal(game.players, torch.tensor([0, 2, 3, 5]))
    coalitions = random_coalitions(game.n_players, m=8, seed=10)
    full = torch.zeros(len(coalitions), unit.n_channels, dtype=torch.bool)
    full[:, game.players] = coalitions
    expected = pruned_values(model, unit, score_batches, full)
    torch.testing.assert_close(game(coalitions), expected, atol=1e-5, rtol=0)

    one_producer = copy.deepcopy(model)
    prune.ln_structured(one_producer.block.conv2, "weight", amount=0.5, n=1, dim=0)
    game = ChannelGame(one_producer, unit.producers, score_batches)
    assert torch.equal(game.players, (~pruned_channels(one_producer, unit)).nonzero().flatten())
    assert game.n_players == 3


def pruned_copy_for_game(model: nn.Module, unit: PrunableUnit, pruned: Tensor) -> nn.Module:
    replica = copy.deepcopy(model)
    prune_channels(replica, unit, pruned)
    return replica


MULTI_ERRORS = [
    pytest.param(
        lambda m, b: ChannelGame(m, [], b), r"layer=\[\] names no module", id="empty-sequence"
    ),
    pytest.param(
        lambda m, b: ChannelGame(m, ["stem.0", "nope"], b),
        r"layer='nope' is not a module of ResidualNet",
        id="unknown-layer",
    ),
    pytest.param(
        lambda m, b: ChannelGame(m, ["stem.0", "head"], b),
        r"different numbers of channels \(\{'stem.0': 6, 'head': 10\}\)",
        id="channel-counts",
    ),
]


@pytest.mark.parametrize(("trigger", "match"), MULTI_ERRORS)
def test_bad_layer_sequences_raise_value_error(score_batches, trigger, match):
    with pytest.raises(ValueError, match=match):
        trigger(_seeded(ResidualNet), score_batches)


def test_split_and_fold_needs_a_single_mask_point(score_batches):
    model = _seeded(ResidualNet)
    with pytest.raises(UnsplittableModelError, match="only a single mask point can be folded"):
        ChannelGame(model, ["stem.0", "block.conv2"], score_batches, engine="split+fold")


def test_coupled_unit_of_an_untraceable_model_falls_back_to_full(score_batches):
    # fx cannot trace the forward; "auto" replays the whole model with a hook per mask point.
    model = _seeded(DataDependentCNN)
    game = ChannelGame(model, ["conv", "bn"], score_batches)
    assert game.engine == "full" and game.mask_module_names == ("bn",)


# ------------------------------------------------------------------- a game kept across rounds


@pytest.mark.parametrize("kind", ["digits-cnn", "residual", "inverted-residual"])
def test_a_refreshed_game_values_coalitions_as_a_new_one(trained_cnn, score_batches, kind):
    if kind == "digits-cnn":
        model, batches = copy.deepcopy(trained_cnn).eval(), score_batches
    else:
        model = _seeded(ResidualNet if kind == "residual" else InvertedResidualNet).eval()
        batches = _image_batches(model)
    units = find_units(model, batches[0][0])
    unit = units[0]
    game = ChannelGame.from_unit(model, unit, batches)
    # Every unit loses channels and the statistics change, as between two rounds.
    for other in units:
        prune_channels(model, other, _every_third(other.n_channels))
    for norm in batchnorms(model):
        norm.running_mean.add_(0.1)
    pruned = pruned_channels(model, unit)
    game.refresh(pruned)
    fresh = ChannelGame.from_unit(model, unit, batches, pruned=pruned)

    assert game.engine != "full" and torch.equal(game.players, fresh.players)
    coalitions = random_coalitions(game.n_players, m=12, seed=3)
    torch.testing.assert_close(game(coalitions), fresh(coalitions), rtol=0, atol=1e-5)
    game.release()
    with pytest.raises(RuntimeError, match="call recache"):
        game(coalitions)


def _every_third(n: int) -> Tensor:
    pruned = torch.zeros(n, dtype=torch.bool)
    pruned[::3] = True
    return pruned


def _image_batches(model: nn.Module) -> Batches:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 8, 8, generator=generator)
    with torch.no_grad():
        classes = model(x[0]).shape[1]
    return [(x[i], torch.randint(0, classes, (16,), generator=generator)) for i in range(2)]


def test_a_linear_unit_plays_its_last_dimension_whatever_the_leading_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Flatten()).eval()
    tokens = torch.randn(8, 7, 5)  # [B, T, F] with T == the hidden width, the trap of old
    targets = torch.randint(0, 3, (8, 7 * 3 // 3))
    (unit,) = find_units(model, tokens)
    assert unit.n_channels == 7
    batches = [(tokens, targets[:, 0])]

    def value(logits: Tensor, y: Tensor) -> float:
        return -float(logits.abs().mean())

    game = ChannelGame.from_unit(model, unit, batches, value=value)
    assert game.channel_dim == 2
    coalition = torch.ones(1, 7, dtype=torch.bool)
    coalition[0, 4] = False
    reference = copy.deepcopy(model)
    prune_channels(reference, unit, ~coalition[0])
    with torch.no_grad():
        expected = value(reference(tokens), targets)
    assert game(coalition).item() == pytest.approx(expected, abs=1e-6)


class _RankBranchingDigits(nn.Module):
    """The digits CNN behind an ``if x.dim() == 3``: fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsCNN(channels=(8, 8, 16))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.unsqueeze(1) if x.dim() == 3 else x)


def test_the_export_engine_sees_masks_and_weights_changed_after_it_was_built(score_batches):
    model = randomize_batchnorms(_RankBranchingDigits())
    unit = find_units(model, score_batches[0][0])[1]
    game = ChannelGame.from_unit(model, unit, score_batches)
    assert game.engine == "export+fold"  # the graph is cut, and the mask folded
    coalitions = random_coalitions(8, seed=1)
    torch.testing.assert_close(
        game(coalitions), pruned_values(model, unit, score_batches, coalitions), atol=1e-5, rtol=0
    )

    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[[1, 6]] = True
    prune_channels(model, unit, pruned)
    with torch.no_grad():
        model.net.features[0].weight.mul_(1.5)  # upstream of the cut: the cache must change
        model.net.classifier.weight.mul_(0.5)  # downstream: the graph must read it anew
    game.refresh()
    assert game.n_players == 6
    coalitions = random_coalitions(6, seed=2)
    full = torch.zeros(len(coalitions), 8, dtype=torch.bool)
    full[:, ~pruned] = coalitions
    torch.testing.assert_close(
        game(coalitions), pruned_values(model, unit, score_batches, full), atol=1e-5, rtol=0
    )
