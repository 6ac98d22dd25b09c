import copy
import importlib
from pathlib import Path

import onnxruntime
import pytest
import torch
from models_for_tests import DataDependentCNN, ResidualNet, mlp, randomize_batchnorms
from torch import nn

from lightning_shapley import export
from lightning_shapley.app.models import DigitsCNN, ImageClassifier
from lightning_shapley.export import (
    EXPORT_FORMATS,
    Artifact,
    accuracy,
    artifact_metrics,
    compact,
    export_artifacts,
    file_size,
    formats,
    load_compact,
    masked_size_bytes,
    measure_latency,
    quantize,
    save_compact,
    to_onnx,
    to_torchscript,
)
from lightning_shapley.pruning import masking, units


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
    else:
        with pytest.warns(UserWarning, match="compact has nothing to remove"):
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


# --------------------------------------------------------------------------- deployment


@pytest.fixture(scope="module")
def masked_cnn(trained_cnn: DigitsCNN, score_batches: list) -> DigitsCNN:
    """The trained CNN with a quarter of each unit's channels pruned, the lowest-L1 ones."""
    model = copy.deepcopy(trained_cnn)
    x = score_batches[0][0]
    for unit in units.find_units(model, x):
        weight = model.get_submodule(unit.producers[0]).weight
        norms = weight.detach().abs().flatten(1).sum(1)
        pruned = torch.zeros(unit.n_channels, dtype=torch.bool)
        pruned[norms.argsort()[: unit.n_channels // 4]] = True
        masking.prune_channels(model, unit, pruned)
    return model.eval()


@pytest.fixture(scope="module")
def test_batches(digits_splits_fixture) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = digits_splits_fixture.test.tensors
    return [(x[i : i + 100], y[i : i + 100]) for i in range(0, len(y), 100)]


def test_static_int8_keeps_accuracy(
    trained_cnn: DigitsCNN, score_batches: list, test_batches: list
) -> None:
    model = copy.deepcopy(trained_cnn).train()
    before = _snapshot(model)
    quantized = quantize(model, calibration_inputs=[x for x, _ in score_batches])
    _assert_unchanged(model, before)
    assert model.training and all(p.requires_grad for p in model.parameters())
    kinds = {type(module).__name__ for module in quantized.modules()}
    assert "ConvReLU2d" in kinds  # torch.ao.nn.intrinsic.quantized: conv, BN and ReLU fused
    assert "Linear" in kinds and isinstance(
        quantized.get_submodule("classifier"), torch.ao.nn.quantized.dynamic.Linear
    )
    float_accuracy = accuracy(model, test_batches)
    int8_accuracy = accuracy(quantized, test_batches)
    assert model.training  # accuracy() evaluates in eval mode and restores the flags
    assert float_accuracy > 0.9
    assert abs(int8_accuracy - float_accuracy) <= 0.02


def test_dynamic_int8_quantizes_linear_layers_alone(masked_cnn: DigitsCNN) -> None:
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    quantized = quantize(masked_cnn)
    assert isinstance(quantized.classifier, torch.ao.nn.quantized.dynamic.Linear)
    assert type(quantized.features[0]) is nn.Conv2d
    # The masks are baked into the copy: its pruned channels stay zero.
    assert not hasattr(quantized.features[0], "weight_orig")
    assert hasattr(masked_cnn.features[0], "weight_orig")
    torch.testing.assert_close(quantized(x), masked_cnn(x), atol=0.1, rtol=0)


def test_untraceable_model_is_quantized_dynamically_only() -> None:
    model = DataDependentCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"torch\.fx must trace .* without calibration_inputs"):
        quantize(model, calibration_inputs=[x])
    with pytest.raises(ValueError, match="list of batches"):
        quantize(model, calibration_inputs=x)
    torch.testing.assert_close(quantize(model)(x), model(x), atol=0.05, rtol=0)


def test_torchscript_and_onnx_match_the_model(
    masked_cnn: DigitsCNN, exported: dict, tmp_path
) -> None:
    small = compact(masked_cnn, torch.rand(8, 1, 8, 8))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    other_batch = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    paths = {artifact.format: artifact.path for artifact in exported["artifacts"]}

    script = torch.jit.load(paths["torchscript"])
    # Traced straight from the masked model: the masks are baked into the traced copy.
    direct = torch.jit.load(to_torchscript(masked_cnn, x, tmp_path / "deep" / "masked.pt"))
    for inputs in (x, other_batch):
        torch.testing.assert_close(script(inputs), small(inputs), atol=1e-5, rtol=0)
        torch.testing.assert_close(direct(inputs), masked_cnn(inputs), atol=1e-5, rtol=0)
    assert hasattr(masked_cnn.features[0], "weight_orig")  # the masked model is untouched

    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert isinstance(graph_input.shape[0], str)  # a dynamic batch dimension
    for inputs in (x, other_batch):
        (out,) = session.run(None, {graph_input.name: inputs.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), small(inputs), atol=1e-5, rtol=0)


def test_onnx_mismatch_is_reported_and_the_file_removed(monkeypatch, tmp_path) -> None:
    model = DigitsCNN(channels=(4, 4, 8)).eval()
    x = torch.randn(2, 1, 8, 8)

    def fake_export(module: nn.Module, args: tuple, f: str, **kwargs: object) -> None:
        Path(f).write_bytes(b"onnx")  # exporting for real takes seconds; not the point here

    class OffByOne:
        def __init__(self, path: Path) -> None:
            pass

        def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
            return model(inputs) + 1.0

    monkeypatch.setattr(torch.onnx, "export", fake_export)
    monkeypatch.setattr(formats, "_OnnxRunner", OffByOne)
    with pytest.raises(ValueError, match=r"differs from the model's outputs by up to 1 "):
        to_onnx(model, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_compact_checkpoint_reloads_into_the_original_class(
    masked_cnn: DigitsCNN, score_batches: list, tmp_path
) -> None:
    x = score_batches[0][0]
    small = compact(masked_cnn, x).eval()
    path = save_compact(small, tmp_path / "compact.pt")
    torch.save(DigitsCNN(channels=(16, 16, 32)).state_dict(), tmp_path / "dense.pt")
    assert file_size(path) < 0.75 * file_size(tmp_path / "dense.pt")

    fresh = DigitsCNN(channels=(16, 16, 32))
    assert load_compact(path, fresh) is fresh
    fresh.eval()
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in small.parameters()]
    assert fresh.features[3].in_channels == fresh.features[0].out_channels == 12
    assert fresh.features[4].num_features == 12 and fresh.classifier.in_features == 24
    assert torch.equal(fresh(x), small(x))
    torch.testing.assert_close(fresh(x), masked_cnn(x), atol=1e-5, rtol=0)
    # The class itself is unchanged: a new instance has the full size.
    assert DigitsCNN(channels=(16, 16, 32)).features[0].out_channels == 16


def test_compact_checkpoint_errors(masked_cnn: DigitsCNN, tmp_path) -> None:
    with pytest.raises(ValueError, match="still holds pruning masks"):
        save_compact(masked_cnn, tmp_path / "masked.pt")
    path = save_compact(compact(masked_cnn, torch.rand(4, 1, 8, 8)), tmp_path / "c.pt")

    other = ResidualNet()
    before = _snapshot(other)
    with pytest.raises(ValueError, match=r"holds a lightning_shapley\.app\.models\.DigitsCNN"):
        load_compact(path, other)
    _assert_unchanged(other, before)

    deeper = DigitsCNN(channels=(16, 16, 32, 32))
    before = _snapshot(deeper)
    with pytest.raises(ValueError, match="does not fit this"):
        load_compact(path, deeper)
    _assert_unchanged(deeper, before)

    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a compact checkpoint"):
        load_compact(tmp_path / "plain.pt", DigitsCNN())


def test_a_damaged_compact_checkpoint_is_refused(masked_cnn: DigitsCNN, tmp_path) -> None:
    small = compact(masked_cnn, torch.rand(4, 1, 8, 8))
    path = save_compact(small, tmp_path / "c.pt")
    # Flip one byte inside a tensor's data, where torch.load does not look.
    data = bytearray(path.read_bytes())
    weight = small.features[3].weight.detach().contiguous().numpy().tobytes()
    start = bytes(data).index(weight)
    data[start + 100] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    fresh = DigitsCNN(channels=(16, 16, 32))
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=r"damaged: the tensor 'features\.3\.weight' does not"):
        load_compact(flipped, fresh)
    _assert_unchanged(fresh, before)

    payload = torch.load(path, weights_only=True)
    payload["shapes"]["features.3"]["out_channels"] = "five"
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"damaged: features\.3\.out_channels='five' is not"):
        load_compact(tmp_path / "crafted.pt", fresh)
    _assert_unchanged(fresh, before)


@pytest.fixture(scope="module")
def exported(
    masked_cnn: DigitsCNN, score_batches: list, test_batches: list, tmp_path_factory
) -> dict:
    """Every format of the masked CNN, exported once (an ONNX export takes seconds)."""
    x = score_batches[0][0]
    before, masked_outputs = _snapshot(masked_cnn), masked_cnn(x)
    directory = tmp_path_factory.mktemp("export") / "out"
    artifacts = export_artifacts(
        masked_cnn, x, directory, formats=EXPORT_FORMATS, batches=test_batches
    )
    return {"artifacts": artifacts, "before": before, "outputs": masked_outputs, "dir": directory}


def test_export_artifacts_writes_every_format(
    masked_cnn: DigitsCNN, score_batches: list, exported: dict
) -> None:
    x = score_batches[0][0]
    masked_outputs, artifacts = exported["outputs"], exported["artifacts"]
    _assert_unchanged(masked_cnn, exported["before"])
    assert torch.equal(masked_cnn(x), masked_outputs)

    assert [a.format for a in artifacts] == list(EXPORT_FORMATS)
    dense_parameters = _n_params(DigitsCNN(channels=(16, 16, 32)))
    for artifact in artifacts:
        assert artifact.path.parent == exported["dir"] and artifact.path.is_file()
        assert artifact.size_bytes == file_size(artifact.path) > 0
        assert artifact.latency_ms > 0
        assert artifact.parameters < dense_parameters
    by_format = {a.format: a for a in artifacts}
    float_accuracy = by_format["compact"].accuracy
    assert by_format["torchscript"].accuracy == by_format["onnx"].accuracy == float_accuracy
    assert abs(by_format["int8"].accuracy - float_accuracy) <= 0.03

    reloaded = load_compact(by_format["compact"].path, DigitsCNN(channels=(16, 16, 32))).eval()
    torch.testing.assert_close(reloaded(x), masked_outputs, atol=1e-5, rtol=0)
    int8 = torch.jit.load(by_format["int8"].path)
    assert (int8(x).argmax(1) == masked_outputs.argmax(1)).float().mean() > 0.9


def test_unknown_format_is_refused_before_anything_is_written(
    masked_cnn: DigitsCNN, tmp_path
) -> None:
    x = torch.rand(4, 1, 8, 8)
    target = tmp_path / "out"
    with pytest.raises(ValueError, match=r"formats: 'tflite' is not an export format; allowed: "):
        export_artifacts(masked_cnn, x, target, formats=["compact", "tflite"])
    with pytest.raises(ValueError, match=r"'compact', 'int8', 'torchscript', 'onnx'"):
        export_artifacts(masked_cnn, x, target, formats="onnx")
    with pytest.raises(ValueError, match="batches"):
        export_artifacts(masked_cnn, x, target, batches=[x])
    assert not target.exists()


def test_measure_latency_restores_train_flags() -> None:
    model = DigitsCNN(channels=(4, 4, 8)).train()
    model.features[1].eval()
    seconds = measure_latency(model, torch.rand(2, 1, 8, 8), repeats=3, warmup=1)
    assert seconds > 0
    assert model.training and not model.features[1].training and model.features[4].training
    with pytest.raises(ValueError, match="repeats=0 is not allowed; it must be an integer of at"):
        measure_latency(model, torch.rand(2, 1, 8, 8), repeats=0)
    with pytest.raises(ValueError, match="warmup=-1 is not allowed"):
        measure_latency(model, torch.rand(2, 1, 8, 8), warmup=-1)
    with pytest.raises(ValueError, match="repeats=True is not allowed"):
        measure_latency(model, torch.rand(2, 1, 8, 8), repeats=True)


def test_lightning_module_exports_and_reloads(tmp_path) -> None:
    module = ImageClassifier(randomize_batchnorms(DigitsCNN(channels=(4, 4, 8)))).eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    _prune_every_unit(module, x, {"net.features.0": 1, "net.features.3": 2, "net.features.7": 3})
    script = torch.jit.load(to_torchscript(module, x, tmp_path / "m.pt"))
    torch.testing.assert_close(script(x), module(x), atol=1e-5, rtol=0)

    path = save_compact(compact(module, x), tmp_path / "c.pt")
    fresh = load_compact(path, ImageClassifier(DigitsCNN(channels=(4, 4, 8)))).eval()
    assert fresh.net.features[7].out_channels == 5
    torch.testing.assert_close(fresh(x), module(x), atol=1e-5, rtol=0)


def test_artifact_metrics(exported: dict) -> None:
    artifacts = exported["artifacts"]
    metrics = artifact_metrics(artifacts)
    assert len(metrics) == 4 * len(artifacts)
    for artifact in artifacts:
        prefix = f"export/{artifact.format}/"
        assert metrics[prefix + "size_bytes"] == float(artifact.size_bytes)
        assert metrics[prefix + "latency_ms"] == artifact.latency_ms
        assert metrics[prefix + "parameters"] == float(artifact.parameters)
        assert metrics[prefix + "accuracy"] == artifact.accuracy
    assert all(type(value) is float for value in metrics.values())

    without_accuracy = Artifact("compact", Path("compact.pt"), 10, 200, 1.5)
    assert artifact_metrics([without_accuracy]) == {
        "export/compact/size_bytes": 200.0,
        "export/compact/latency_ms": 1.5,
        "export/compact/parameters": 10.0,
    }
    assert artifact_metrics([]) == {}


def test_masked_size_bytes_leaves_out_the_masks(masked_cnn: DigitsCNN) -> None:
    dense = DigitsCNN(channels=(16, 16, 32))
    expected = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    assert any(name.endswith("_mask") for name in masked_cnn.state_dict())
    assert masked_size_bytes(masked_cnn) == masked_size_bytes(dense) == expected


def test_package_re_exports_every_public_name() -> None:
    for name in export.__all__:
        assert getattr(export, name) is not None, name
    # compact.py shares its name with its function: the package attribute is the function.
    module = importlib.import_module("lightning_shapley.export.compaction")
    assert export.compact is compact is module.compact
    assert callable(export.compact)


def test_compact_of_a_reloaded_model_removes_its_zero_channels(masked_cnn: DigitsCNN) -> None:
    x = torch.rand(4, 1, 8, 8)
    state = masked_cnn.state_dict()
    masking.bake_masks(state)  # what a pruned checkpoint holds
    reloaded = DigitsCNN(channels=(16, 16, 32)).eval()
    reloaded.load_state_dict(state)
    assert not masking.has_masks(reloaded)

    small = compact(reloaded, x)
    from_masks = compact(masked_cnn, x)
    assert _n_params(small) == _n_params(from_masks) < _n_params(reloaded)
    torch.testing.assert_close(small.eval()(x), masked_cnn(x), atol=1e-5, rtol=0)

    with pytest.warns(UserWarning, match="holds no pruning masks and no channel that is zero"):
        dense = compact(DigitsCNN(channels=(16, 16, 32)).eval(), x)
    assert _n_params(dense) == _n_params(DigitsCNN(channels=(16, 16, 32)))
