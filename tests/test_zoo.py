"""The callback at its defaults on models shaped like the ones users train (``zoo.py``).

Each project is fit as users call it, ``Trainer.fit(module, train_loader, val_loader)``.
It must prune every unit to the target and compact to a model with the same outputs, or
be refused at set-up, before any training step, with a message that names its layers.
"""

import math
import warnings
from pathlib import Path

import lightning
import pytest
import torch
from zoo import ZOO, TimmStyleViT, hf_bert, hf_gpt2

from lightning_shapley import ShapleyPruning
from lightning_shapley.export import compact
from lightning_shapley.model_io import as_model_inputs, call_model, eager, logits_of
from lightning_shapley.pruning.masking import prune_channels, pruned_channels
from lightning_shapley.pruning.scorers import LeaveOneOutScorer, ShapleyScorer
from lightning_shapley.pruning.units import find_units
from lightning_shapley.shapley.game import ChannelGame

AMOUNT = 0.5


def fit(case, tmp_path: Path, **options) -> tuple[ShapleyPruning, lightning.Trainer, list]:
    pruning = ShapleyPruning(amount=AMOUNT, reporter=False, **case.callback_options, **options)
    trainer = lightning.Trainer(
        max_epochs=2,
        callbacks=[pruning],
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(case.module, case.train, case.val)
    return pruning, trainer, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", [name for name, make in ZOO.items()])
def test_a_project_prunes_to_its_target_or_is_refused_at_setup(name: str, tmp_path: Path) -> None:
    case = ZOO[name]()
    if case.refused is not None:
        with pytest.raises(ValueError, match=case.refused) as refused:
            fit(case, tmp_path)
        assert case.module.trainer.global_step == 0  # refused before the first step
        assert "leaves out" in str(refused.value) or "no prunable unit" in str(refused.value)
        return
    pruning, _, messages = fit(case, tmp_path)
    module = case.module
    assert pruning.history, "no pruning step ran"
    assert pruning.history[-1]["target_sparsity"] == pytest.approx(AMOUNT)
    with eager(module):  # a compiled network's layers by their own names
        for unit in pruning.units:
            removed = int(pruned_channels(module, unit).sum())
            assert removed == math.floor(AMOUNT * unit.n_channels + 1e-9), unit.name
    for layer in case.left_out:
        assert any(layer in message for message in messages), f"{layer} not named"

    module.eval()
    inputs = pruning.scoring_batches[0][0]
    small = compact(module, inputs)
    with torch.no_grad():
        expected = logits_of(call_model(module, inputs))  # compiled, where it is
        actual = logits_of(call_model(small, inputs))
    assert torch.allclose(actual, expected, atol=1e-4)
    masked_size = sum(p.numel() for p in module.parameters())
    assert sum(p.numel() for p in small.parameters()) < masked_size


def test_refusals_name_the_layers_and_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no prunable unit"):
        fit(ZOO["sigmoid-mlp"](), tmp_path)
    case = ZOO["sigmoid-mlp"]()
    with pytest.raises(ValueError, match=r"layers: .*'net\.1'.*f\(0\) != 0"):
        fit(case, tmp_path, layers=["net.1"])
    case = ZOO["layernorm-mlp"]()
    with pytest.raises(
        ValueError, match=r"'net\.1' cannot be pruned: coupled to 'net\.2' \(LayerNorm\)"
    ):
        fit(case, tmp_path, layers=["net.1"])


def test_attention_heads_are_the_players_of_query_key_value() -> None:
    case = hf_bert()
    batch = next(iter(case.val))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    units = {unit.name: unit for unit in find_units(case.module, inputs)}
    attention = units["model.bert.encoder.layer.0.attention.self.query"]
    assert attention.n_channels == 4  # heads, not 32 features
    assert attention.producers[1:] == (
        "model.bert.encoder.layer.0.attention.self.key",
        "model.bert.encoder.layer.0.attention.self.value",
    )
    assert attention.consumers == ("model.bert.encoder.layer.0.attention.output.dense",)
    assert units["model.bert.encoder.layer.0.intermediate.dense"].n_channels == 48


def test_a_packed_qkv_projection_has_its_heads_as_players() -> None:
    torch.manual_seed(0)
    net, images = TimmStyleViT().eval(), torch.randn(8, 3, 16, 16)
    batches = [(images, torch.randint(0, 4, (8,)))]
    qkv = {unit.name: unit for unit in find_units(net, images)}["blocks.0.attn.qkv"]
    assert (qkv.n_channels, qkv.copies, qkv.consumers) == (4, 3, ("blocks.0.attn.proj",))
    game = ChannelGame.from_unit(net, qkv, batches)
    without_each_head = game(~torch.eye(4, dtype=torch.bool))

    head = torch.tensor([False, True, False, False])
    prune_channels(net, qkv, head)
    # Rows of q, k and v for each of the 4 heads of 8 features: head 1 is gone from all three.
    rows = net.blocks[0].attn.qkv.weight.abs().sum(1).reshape(3, 4, 8)
    assert (rows[:, 1] == 0).all() and (rows[:, [0, 2, 3]] > 0).all()
    assert pruned_channels(net, qkv).tolist() == head.tolist()
    assert torch.isclose(
        without_each_head[1], game.value_function(net(images)[None], batches[0][1]).double()
    )

    small = compact(net, images)
    attention = small.blocks[0].attn
    assert attention.num_heads == 3 and attention.qkv.out_features == 72
    assert attention.proj.in_features == 24
    assert torch.allclose(small(images), net(images), atol=1e-5)


def test_gpt2_heads_are_pruned_and_its_attention_told_the_new_width() -> None:
    case = hf_gpt2()
    model = case.module.model.eval()
    batch = next(iter(case.val))
    inputs = as_model_inputs({"input_ids": batch["input_ids"]})
    units = {unit.name: unit for unit in find_units(model, inputs)}
    heads = units["transformer.h.0.attn.c_attn"]
    assert (heads.n_channels, heads.copies) == (4, 3)
    prune_channels(model, heads, torch.tensor([True, False, False, True]))
    small = compact(model, inputs)
    attention = small.transformer.h[0].attn
    assert (attention.num_heads, attention.split_size, attention.c_attn.nf) == (2, 16, 48)
    expected = logits_of(call_model(model, inputs))
    assert torch.allclose(logits_of(call_model(small, inputs)), expected, atol=1e-5)


def test_band_one_values_equal_a_real_leave_one_out_when_tokens_equal_features() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    length = 12
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=length, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 40, (16, length))
    batches = [(as_model_inputs({"input_ids": ids}), torch.randint(0, 3, (16,)))]
    (unit,) = [u for u in find_units(model, batches[0][0]) if "intermediate" in u.name]
    none = torch.zeros(length, dtype=torch.bool)
    band = ShapleyScorer(weighting="band", depth=1, method="exact")
    with band.step():
        values = band.score(model, unit, batches, none).values
    reference = LeaveOneOutScorer().score(model, unit, batches, none).values
    assert torch.allclose(values, reference, atol=1e-5)
    assert values.std() > 0  # the features were told apart, not all zero
