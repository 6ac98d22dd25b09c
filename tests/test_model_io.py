"""Models with other inputs and outputs: keyword arguments, ``.logits``, per-token logits."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_shapley.model_io import ModelInputs, align_targets, as_model_inputs, logits_of
from lightning_shapley.pruning.batches import inputs_and_targets, scoring_batches
from lightning_shapley.pruning.masking import prune_channels
from lightning_shapley.pruning.units import find_units
from lightning_shapley.shapley.game import ChannelGame
from lightning_shapley.shapley.values import LOSS, accuracy, evaluate, negative_loss, resolve_value


class TokenTagger(nn.Module):
    """Per-token classes from ``input_ids`` and an ``attention_mask``, HF style."""

    def __init__(self, vocab: int = 20, width: int = 8, hidden: int = 12, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> SimpleNamespace:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=self.down(F.relu(self.up(h))))


def token_batch(n: int = 6, t: int = 7, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (n, t), generator=generator)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[:, -2:] = 0
    labels = torch.randint(0, 5, (n, t), generator=generator)
    labels[:, -2:] = -100  # padding: not scored
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_inputs_are_read_from_every_accepted_form() -> None:
    x, y = torch.zeros(3, 2), torch.ones(3, 4)
    assert as_model_inputs(x) is x
    assert as_model_inputs((x, y)) == ModelInputs((x, y))
    assert as_model_inputs({"a": x}).kwargs == {"a": x}
    both = as_model_inputs(((x,), {"b": y}))
    assert both.args == (x,) and both.kwargs == {"b": y} and len(both) == 3
    with pytest.raises(ValueError, match="the inputs are a str"):
        as_model_inputs("x")


def test_model_inputs_repeat_batch_tensors_only() -> None:
    inputs = ModelInputs((torch.arange(3),), {"scale": torch.tensor(2.0)})
    repeated = inputs.repeat_interleave(2)
    assert repeated.args[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert repeated.kwargs["scale"].item() == 2.0


def test_logits_are_found_in_tensors_tuples_mappings_and_objects() -> None:
    logits = torch.randn(2, 3)
    for output in (logits, (logits, None), {"logits": logits}, SimpleNamespace(logits=logits)):
        assert logits_of(output) is logits
    with pytest.raises(ValueError, match="pass output_transform="):
        logits_of({"scores": logits})


def test_classes_last_and_flattened_tokens_line_up_with_targets() -> None:
    logits = torch.randn(2, 4, 6, 5)  # k=2 coalitions, 4 samples, 6 tokens, 5 classes
    targets = torch.randint(0, 5, (4, 6))
    aligned, same = align_targets(logits, targets)
    assert aligned.shape == (2, 4, 5, 6) and same is targets
    flat, flat_targets = align_targets(logits.reshape(2, 24, 5), targets)
    assert flat.shape == (2, 24, 5) and flat_targets.shape == (24,)
    with pytest.raises(ValueError, match="do not line up"):
        align_targets(torch.randn(1, 4, 3), torch.zeros(5, dtype=torch.long))


def test_per_token_loss_and_accuracy_skip_padding() -> None:
    batch = token_batch()
    logits = torch.randn(6, 7, 5)
    labels = batch["labels"]
    expected = F.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1))  # ignores -100
    assert torch.allclose(-negative_loss(logits.unsqueeze(0), labels)[0], expected)
    scored = labels != -100
    hits = (logits.argmax(-1) == labels)[scored].float().mean()
    assert torch.allclose(accuracy(logits.unsqueeze(0), labels)[0], hits)


def test_mapping_batches_give_keyword_inputs_and_labels() -> None:
    batch = token_batch()
    inputs, targets = inputs_and_targets(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and targets is batch["labels"]
    with pytest.raises(KeyError, match="no targets"):
        inputs_and_targets({"input_ids": batch["input_ids"]})
    (scored,) = scoring_batches([batch], inputs_and_targets, 1, 1, 0)
    assert isinstance(scored[0], ModelInputs)


def test_a_keyword_model_with_logits_attribute_is_scored_per_token() -> None:
    torch.manual_seed(0)
    model = TokenTagger().eval()
    batch = token_batch()
    inputs, targets = inputs_and_targets(batch)
    batches = [(as_model_inputs(inputs), targets)]
    (unit,) = find_units(model, batches[0][0])
    assert unit.name == "up" and unit.n_channels == 12
    game = ChannelGame.from_unit(model, unit, batches)
    assert game.engine == "full"  # keyword arguments: no fx split
    coalitions = torch.rand(5, 12) > 0.4
    values = game(coalitions)
    for coalition, value in zip(coalitions, values, strict=True):
        masked = TokenTagger().eval()
        masked.load_state_dict(model.state_dict())
        prune_channels(masked, unit, ~coalition)
        measured = evaluate(masked, batches, LOSS).value
        assert value.item() == pytest.approx(measured, abs=1e-5)


def test_an_output_transform_reads_logits_the_default_cannot_find() -> None:
    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"scores": self.body(x)}

    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    value = resolve_value("loss", output_transform=lambda out: out["scores"])
    game = ChannelGame(Scores(), "body.0", batches, value=value)
    assert game(torch.ones(1, 6, dtype=torch.bool)).shape == (1,)
    with pytest.raises(ValueError, match="output_transform=3 is not allowed"):
        resolve_value("loss", output_transform=3)


def test_a_model_that_mixes_the_samples_of_a_batch_is_scored_one_coalition_at_a_time() -> None:
    class SequenceFirst(nn.Module):
        """Reads ``[T, B]`` token ids: dim 0, which the coalitions are stacked on, is time."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.up = nn.Linear(8, 12)
            self.down = nn.Linear(12, 3)

        def forward(self, ids: Tensor) -> Tensor:
            h = F.relu(self.up(self.embed(ids))).cumsum(0)  # each step sees the earlier ones
            return self.down(h[-1]).repeat(len(ids), 1)[: len(ids)]

    torch.manual_seed(0)
    model = SequenceFirst().eval()
    batches = [(torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,)))]
    game = ChannelGame(model, "up", batches, channel_dim=-1, engine="full")
    assert game.coalitions_per_forward == 1
    coalitions = torch.rand(4, 12) > 0.5
    one_by_one = torch.cat([game(c[None]) for c in coalitions])
    assert torch.equal(game(coalitions), one_by_one)
    batch = token_batch()
    inputs = ModelInputs((batch["input_ids"], batch["attention_mask"]))
    independent = ChannelGame(
        TokenTagger().eval(), "up", [(inputs, batch["labels"])], channel_dim=-1
    )
    assert independent.coalitions_per_forward > 1
