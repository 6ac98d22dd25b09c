"""``ShapleyScorer`` on units whose channels several layers produce.

The reference is the pruned model (``models_for_tests.pruned_values``): a coalition is
worth the metric of a copy of the model with the unit's other channels pruned by
``masking.prune_channels``, in every producer and BatchNorm of the unit.
"""

import copy

import pytest
import torch
from models_for_tests import (
    InvertedResidualNet,
    PreActResidualNet,
    ProjectionNet,
    ResidualNet,
    pruned_values,
    randomize_batchnorms,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_shapley.layers import (
    BATCHNORM,
    CONVOLUTION,
    GROUPNORM,
    LAYER_KINDS,
    LINEAR,
    TRANSPOSED_LINEAR,
    is_depthwise,
    kind_of,
)
from lightning_shapley.pruning.masking import prune_channels, pruned_channels
from lightning_shapley.pruning.scorers import ShapleyScorer, make_scorer
from lightning_shapley.pruning.units import PrunableUnit, find_units
from lightning_shapley.shapley.estimators import exact
from lightning_shapley.shapley.values import resolve_value
from lightning_shapley.shapley.weighting import Weighting


def coupled_unit(factory: type[nn.Module], name: str, batches: list) -> tuple:
    torch.manual_seed(0)
    model = randomize_batchnorms(factory())
    (unit,) = find_units(model, batches[0][0][:4], [name])
    assert len(unit.producers) == 2
    return model, unit


COUPLED = [
    pytest.param(ResidualNet, "stem.0", id="identity-skip"),
    pytest.param(ProjectionNet, "conv2", id="projection-shortcut"),
    pytest.param(InvertedResidualNet, "expand", id="expand-depthwise"),
    pytest.param(PreActResidualNet, "stem", id="pre-activation"),
]


@pytest.mark.parametrize(("factory", "name"), COUPLED)
def test_shapley_scorer_checks_units_of_several_producers(score_batches, factory, name):
    _, unit = coupled_unit(factory, name, score_batches)
    ShapleyScorer().check(unit)  # raises for a unit it cannot score


@pytest.mark.parametrize(("factory", "name"), COUPLED)
def test_exact_shapley_scores_equal_enumeration_of_pruned_models(score_batches, factory, name):
    model, unit = coupled_unit(factory, name, score_batches)
    n = unit.n_channels
    reference = exact(lambda c: pruned_values(model, unit, score_batches, c), n)
    pruned = torch.zeros(n, dtype=torch.bool)
    scores = ShapleyScorer(method="exact").score(model, unit, score_batches, pruned)
    assert scores.evaluations == 2**n
    torch.testing.assert_close(scores.values, reference.values, atol=1e-5, rtol=0)
    assert torch.equal(scores.stderr, torch.zeros(n, dtype=torch.float64))
    assert reference.values.abs().max() > 1e-3


def _pruned(model: nn.Module, unit: PrunableUnit, channels: list[int]) -> nn.Module:
    replica = copy.deepcopy(model)  # before pruning: deepcopy refuses a pruned model
    pruned = torch.zeros(unit.n_channels, dtype=torch.bool)
    pruned[channels] = True
    prune_channels(replica, unit, pruned)
    return replica


@pytest.mark.parametrize("pass_pruned", [True, False], ids=["pruned-given", "from-masks"])
def test_channels_pruned_before_score_nan_and_stay_pruned(score_batches, pass_pruned):
    model, unit = coupled_unit(InvertedResidualNet, "expand", score_batches)
    masked = _pruned(model, unit, [1, 5])
    already = pruned_channels(masked, unit)
    assert already.nonzero().flatten().tolist() == [1, 5]
    given = already if pass_pruned else torch.zeros_like(already)
    scores = ShapleyScorer(method="exact").score(masked, unit, score_batches, given)
    assert torch.equal(scores.values.isnan(), already)
    assert scores.evaluations == 2**6

    # The six survivors' game, every coalition through the original model pruned outside it.
    survivors = (~already).nonzero().flatten()

    def reference(coalitions: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(len(coalitions), unit.n_channels, dtype=torch.bool)
        full[:, survivors] = coalitions
        return pruned_values(model, unit, score_batches, full)

    expected = exact(reference, len(survivors)).values
    torch.testing.assert_close(scores.values[survivors], expected, atol=1e-5, rtol=0)


def test_make_scorer_passes_resolved_settings_down_once():
    value = resolve_value("accuracy")
    scorer = make_scorer("shapley", value=value, seed=3)
    assert scorer.value_function is value
    assert scorer.weighting == Weighting("band", depth=1)
    assert scorer.estimator.method == "exact" and scorer.estimator.options == {}
    sampled = make_scorer("shapley", value=value, weighting="shapley", num_permutations=8)
    assert sampled.estimator.method == "surrogate"
    assert sampled.estimator.options == {"num_permutations": 8, "seed": 0}
    assert make_scorer("loo", value=value).value_function is value
    assert make_scorer("random", value=value, seed=2).name == "random"


def test_a_scorer_instance_refuses_settings_beside_it():
    scorer = ShapleyScorer()
    assert make_scorer(scorer, value=resolve_value("loss")) is scorer
    with pytest.raises(ValueError, match=r"depth=2, seed=5 were given as well"):
        make_scorer(scorer, value=resolve_value("loss"), depth=2, seed=5)


def test_every_layer_kind_names_its_channel_parameters_and_axes():
    examples = {
        CONVOLUTION: nn.Conv1d(3, 4, 3),
        LINEAR: nn.Linear(3, 4),
        BATCHNORM: nn.BatchNorm2d(4),
        GROUPNORM: nn.GroupNorm(2, 4),
        TRANSPOSED_LINEAR: Conv1D(4, 3),  # Hugging Face's: weight [in, out]
    }
    assert set(examples) == set(LAYER_KINDS)
    for kind, module in examples.items():
        assert kind_of(module) is kind
        for name, dim in kind.channel_parameters(module):
            assert getattr(module, name).shape[dim] == getattr(module, kind.out_attribute)
    assert kind_of(nn.Conv2d(4, 8, 3, groups=2)).problem(nn.Conv2d(4, 8, 3, groups=2))
    assert is_depthwise(nn.Conv2d(4, 4, 3, groups=4))
    assert kind_of(nn.LayerNorm(4)) is None
