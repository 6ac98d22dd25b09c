"""Pruning in rounds (``rounds.py``) and re-estimating BatchNorm statistics.

Locks in the pipeline choices of the quality benchmark: the band at depth 1 re-scored
after every removal is greedy backward elimination; the default pipeline keeps a better
coalition than classic Shapley and L1; recalibration touches only running statistics.
"""

import pytest
import torch
from torch import nn

from lightning_shapley import ShapleyPruning
from lightning_shapley.pruning.masking import copy_model, pruned_channels
from lightning_shapley.pruning.recalibration import recalibrate_batchnorm
from lightning_shapley.pruning.rounds import RoundPruner
from lightning_shapley.pruning.scorers import (
    ChannelScores,
    L1Scorer,
    LeaveOneOutScorer,
    Scorer,
    ShapleyScorer,
)
from lightning_shapley.pruning.units import find_units
from lightning_shapley.shapley.values import scoring_mode


def negative_loss(model: nn.Module, batches: list) -> float:
    with scoring_mode(model):
        logits = torch.cat([model(x) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    return -float(nn.functional.cross_entropy(logits, targets))


def masks(model: nn.Module, units: list) -> dict[str, list[bool]]:
    return {unit.name: pruned_channels(model, unit).tolist() for unit in units}


@pytest.fixture(scope="module")
def train_inputs(digits_splits_fixture) -> list[torch.Tensor]:
    x, _ = digits_splits_fixture.train.tensors
    return [x[i : i + 64] for i in range(0, 256, 64)]


# --------------------------------------------------------------------------- recalibration


def test_recalibration_changes_only_running_statistics(trained_cnn, train_inputs):
    model = copy_model(trained_cnn).train()
    model.features[2].training = False  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert recalibrate_batchnorm(model, train_inputs) == len(train_inputs)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    statistics = {k for k in before if k.endswith(("running_mean", "running_var"))}
    assert changed <= statistics | {k for k in before if k.endswith("num_batches_tracked")}
    assert changed & statistics == statistics  # every BatchNorm was re-estimated
    assert [m.training for m in model.modules()] == flags
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert all(p.grad is None for p in model.parameters())


def test_recalibration_is_the_mean_of_the_batch_statistics(train_inputs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)  # stale statistics must not matter
    recalibrate_batchnorm(model, train_inputs)
    with torch.no_grad():
        outputs = [model[0](x) for x in train_inputs]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outputs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)


def test_recalibration_error_leaves_the_statistics_alone(trained_cnn):
    model = copy_model(trained_cnn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(model, [torch.zeros(4, 1, 8, 8), torch.zeros(4, 3, 8, 8)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------- rounds


def test_band_depth_one_step_one_chooses_what_greedy_elimination_chooses(
    trained_cnn, score_batches, train_inputs
):
    units = find_units(trained_cnn, score_batches[0][0][:2])
    band = ShapleyScorer(weighting="band", depth=1, method="exact")
    chosen = {}
    for name, scorer in (("band", band), ("greedy", LeaveOneOutScorer())):
        model = copy_model(trained_cnn)
        pruner = RoundPruner(units, scorer, removal_step=1, interleave=True)
        pruner.prune(model, score_batches, 0.5, train_inputs)
        chosen[name] = masks(model, units)
    assert chosen["band"] == chosen["greedy"]
    assert all(sum(m) == len(m) // 2 for m in chosen["band"].values())


def test_default_pipeline_keeps_a_better_coalition_than_classic_shapley_and_l1(
    trained_cnn, score_batches, train_inputs
):
    units = find_units(trained_cnn, score_batches[0][0][:2])
    default = ShapleyPruning()  # its scorer and round settings are the defaults
    contenders = {
        "default": RoundPruner(
            units, default.scorer, removal_step=default.removal_step, interleave=default.interleave
        ),
        "classic": RoundPruner(units, ShapleyScorer(method="permutation")),
        "l1": RoundPruner(units, L1Scorer()),
    }
    kept = {}
    for name, pruner in contenders.items():
        model = copy_model(trained_cnn)
        recalibration = train_inputs if default.recalibrate else []
        pruner.prune(model, score_batches, 0.5, recalibration)
        recalibrate_batchnorm(model, train_inputs)  # the same footing for every coalition
        kept[name] = negative_loss(model, score_batches)
    assert kept["default"] >= kept["classic"]
    assert kept["default"] >= kept["l1"]


def test_rounds_remove_the_step_in_small_steps_and_report_every_evaluation(
    trained_cnn, score_batches
):
    units = find_units(trained_cnn, score_batches[0][0][:2])
    model = copy_model(trained_cnn)
    removed = []
    scorer = ShapleyScorer(weighting="band", depth=1, method="exact")
    pruner = RoundPruner(units, scorer, removal_step=0.25, interleave=False, rescore="all")
    scores = pruner.prune(model, score_batches, 0.5, progress=removed.append)
    # 16, 16 and 32 channels: a quarter per round, so two rounds of 4, 4 and 8.
    assert removed == [16, 16]
    for unit in units:
        assert int(pruned_channels(model, unit).sum()) == unit.n_channels // 2
        # Leave-one-out: one evaluation per surviving channel and one of the whole, per round.
        n = unit.n_channels
        assert scores[unit.name].evaluations == (n + 1) + (n - n // 4 + 1)
        # Each removed channel keeps the score it was removed on; none is missing.
        assert not scores[unit.name].values.isnan().any()
    assert pruner.remaining(model, 0.5) == 0


class FixedValues(Scorer):
    """Values that never move, valued one evaluation per channel asked for."""

    name = "fixed"
    takes_candidates = True

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.values, self.asked = values, []

    def score(self, model, unit, batches, pruned, candidates=None) -> ChannelScores:
        valued = ~pruned if candidates is None else ~pruned & candidates
        self.asked.append(int(valued.sum()))
        values = self.values[unit.name].double().masked_fill(~valued, float("nan"))
        return ChannelScores(values, torch.zeros_like(values), int(valued.sum()), 0.0)


def test_rescoring_near_the_cut_chooses_as_rescoring_all_when_values_stay(trained_cnn):
    units = find_units(trained_cnn, torch.zeros(2, 1, 8, 8))
    generator = torch.Generator().manual_seed(0)
    values = {unit.name: torch.rand(unit.n_channels, generator=generator) for unit in units}
    chosen, asked = {}, {}
    for rescore in ("all", "near_cut"):
        model, scorer = copy_model(trained_cnn), FixedValues(values)
        RoundPruner(units, scorer, removal_step=0.05, interleave=True, rescore=rescore).prune(
            model, [], 0.5
        )
        chosen[rescore], asked[rescore] = masks(model, units), scorer.asked
    assert chosen["near_cut"] == chosen["all"]
    # The first round values every channel; later ones only the lowest of the survivors.
    assert asked["near_cut"][: len(units)] == asked["all"][: len(units)]
    assert sum(asked["near_cut"]) < sum(asked["all"]) / 2


def test_rescoring_near_the_cut_values_afresh_every_channel_it_removes(trained_cnn, score_batches):
    """What it removes carries a value from the round that removed it; the rest may be older."""
    units = find_units(trained_cnn, score_batches[0][0][:2])
    band = ShapleyScorer(weighting="band", depth=1, method="exact")
    evaluations = {}
    for rescore in ("all", "near_cut"):
        model = copy_model(trained_cnn)
        pruner = RoundPruner(units, band, removal_step=0.05, interleave=True, rescore=rescore)
        scores = pruner.prune(model, score_batches, 0.5)
        evaluations[rescore] = sum(s.evaluations for s in scores.values())
        assert all(sum(m) == len(m) // 2 for m in masks(model, units).values())
    assert evaluations["near_cut"] < evaluations["all"]


def test_candidates_are_valued_as_in_the_whole_game(trained_cnn, score_batches):
    unit = find_units(trained_cnn, score_batches[0][0][:2])[1]
    none = torch.zeros(unit.n_channels, dtype=torch.bool)
    candidates = torch.arange(unit.n_channels) % 3 == 0
    for scorer in (ShapleyScorer(weighting="band", depth=1, method="exact"), LeaveOneOutScorer()):
        whole = scorer.score(trained_cnn, unit, score_batches, none).values
        some = scorer.score(trained_cnn, unit, score_batches, none, candidates)
        torch.testing.assert_close(some.values[candidates], whole[candidates], atol=1e-6, rtol=0)
        assert some.values[~candidates].isnan().all()
        assert some.evaluations == int(candidates.sum()) + 1


@pytest.mark.parametrize(("each_turn", "expected"), [(True, 2 * 3), (False, 2)])
def test_statistics_are_re_estimated_after_every_turn_or_every_round(
    trained_cnn, score_batches, train_inputs, each_turn, expected
):
    units = find_units(trained_cnn, score_batches[0][0][:2])
    model = copy_model(trained_cnn)
    calls = []
    pruner = RoundPruner(
        units,
        L1Scorer(),
        removal_step=0.25,
        interleave=True,
        recalibrate_each_turn=each_turn,
    )
    pruner.prune(
        model, score_batches, 0.5, train_inputs, after_recalibration=lambda: calls.append(1)
    )
    assert len(calls) == expected  # two rounds of three turns


def test_global_rounds_respect_min_channels(trained_cnn, score_batches):
    units = find_units(trained_cnn, score_batches[0][0][:2])
    model = copy_model(trained_cnn)
    pruner = RoundPruner(units, L1Scorer(), scope="global", min_channels=12, removal_step=4)
    pruner.prune(model, score_batches, 0.75)
    kept = [unit.n_channels - int(pruned_channels(model, unit).sum()) for unit in units]
    # 75% of the 64 channels would leave 16; min_channels stops every unit at 12 first.
    assert kept == [12, 12, 12]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"removal_step": 0}, r"removal_step=0 is not allowed"),
        ({"removal_step": 1.5}, r"removal_step=1.5 is not allowed"),
        ({"removal_step": True}, r"removal_step=True is not allowed"),
        ({"scope": "global", "interleave": True}, r"interleave=True does not apply"),
        ({"scope": "model"}, r"scope='model' is not known"),
        ({"rescore": "lazy"}, r"rescore='lazy' is not known; use one of \('near_cut', 'all'\)"),
    ],
)
def test_bad_round_settings_fail_with_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        RoundPruner([], L1Scorer(), **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"removal_step": -1}, r"removal_step=-1 is not allowed"),
        ({"recalibrate": -2}, r"recalibrate=-2 is not allowed"),
        ({"interleave": "yes"}, r"interleave='yes' is not allowed"),
        ({"scope": "global", "interleave": True}, r"interleave=True does not apply"),
        ({"rescore": None}, r"rescore=None is not known"),
    ],
)
def test_the_callback_checks_round_settings_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        ShapleyPruning(**settings)
