"""Models shaped like the ones users train, written the way their projects write them.

Tiny, randomly initialized, trained on data generated here: Hugging Face configs (BERT,
ViT, GPT-2), Lightning's demo Transformer, timm-style ViTs (packed ``qkv``),
torchvision-style ResNets and a MobileNetV2, a DenseNet-style concatenation, GroupNorm
and LayerNorm nets, a layer scale, a GRU classifier, a sigmoid MLP and a
``torch.compile``d network. Each comes as a :class:`ZooCase`: the LightningModule, its
loaders, and what the callback should do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

SEED = 0


class Classifier(lightning.LightningModule):
    """A LightningModule around ``net`` for ``(x, y)`` batches, as most projects write one."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class CompiledInSetup(Classifier):
    """lightning-hydra-template's habit: ``net`` is compiled in ``setup``."""

    def setup(self, stage: str) -> None:
        if stage == "fit" and not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
            self.net = torch.compile(self.net, backend="eager")


class HuggingFaceModule(lightning.LightningModule):
    """A Hugging Face model trained on dict batches through its own ``.loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


@dataclass
class ZooCase:
    """One project: its module, loaders, and how the callback must treat it.

    Attributes:
        module: the LightningModule.
        train: the training loader.
        val: the validation loader.
        refused: a phrase the set-up error must contain when the model cannot be pruned
            at all; ``None`` when it must prune to the target.
        callback_options: options the project must give the callback (its inputs).
        left_out: layers that must be named in a warning at set-up as not pruned.
    """

    module: lightning.LightningModule
    train: DataLoader
    val: DataLoader
    refused: str | None = None
    callback_options: dict[str, Any] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()


def _loaders(x: Tensor, y: Tensor, batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    n_val = len(x) // 4
    generator = torch.Generator().manual_seed(SEED)
    train = DataLoader(
        TensorDataset(x[n_val:], y[n_val:]), batch_size, shuffle=True, generator=generator
    )
    return train, DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size)


def _images(n: int = 192, channels: int = 3, size: int = 16, classes: int = 4):
    """Images whose class is the quadrant holding a bright blob."""
    generator = torch.Generator().manual_seed(SEED)
    y = torch.randint(0, classes, (n,), generator=generator)
    x = torch.randn(n, channels, size, size, generator=generator) * 0.5
    half = size // 2
    for index, label in enumerate(y.tolist()):
        row, col = divmod(label, 2)
        x[index, :, row * half : row * half + half, col * half : col * half + half] += 1.0
    return x, y


def _tokens(n: int = 192, length: int = 12, vocab: int = 40):
    """Token sequences whose class is whether token 7 occurs more often than token 9."""
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, vocab, (n, length), generator=generator)
    labels = ((ids == 7).sum(1) > (ids == 9).sum(1)).long()
    return ids, labels


class _DictDataset(Dataset):
    def __init__(self, items: list[dict[str, Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.items[index]


def _dict_loaders(items: list[dict[str, Tensor]]) -> tuple[DataLoader, DataLoader]:
    n_val = len(items) // 4
    generator = torch.Generator().manual_seed(SEED)
    train = DataLoader(_DictDataset(items[n_val:]), 32, shuffle=True, generator=generator)
    return train, DataLoader(_DictDataset(items[:n_val]), 32)


# --------------------------------------------------------------------------- Hugging Face


def hf_bert() -> ZooCase:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    config = BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    ids, labels = _tokens()
    mask = torch.ones_like(ids)
    mask[::3, -3:] = 0  # some padding, as tokenizers make it
    items = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(ids, mask, labels, strict=True)
    ]
    return ZooCase(HuggingFaceModule(BertForSequenceClassification(config)), *_dict_loaders(items))


def hf_vit() -> ZooCase:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, num_labels=4,
    )  # fmt: skip
    x, y = _images()
    items = [{"pixel_values": image, "labels": label} for image, label in zip(x, y, strict=True)]
    return ZooCase(HuggingFaceModule(ViTForImageClassification(config)), *_dict_loaders(items))


def hf_gpt2() -> ZooCase:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4, num_labels=2,
        pad_token_id=0,
    )  # fmt: skip
    ids, labels = _tokens()
    items = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]
    # Its heads (the packed q/k/v projection c_attn) and MLP neurons are pruned; the cache
    # of keys and values it returns is not an output that pruning must keep.
    return ZooCase(HuggingFaceModule(GPT2ForSequenceClassification(config)), *_dict_loaders(items))


# --------------------------------------------------------------------------- Lightning demo


def lightning_demo_transformer() -> ZooCase:
    from lightning.pytorch.demos import LightningTransformer

    torch.manual_seed(SEED)

    class Demo(LightningTransformer):
        def __init__(self) -> None:
            super().__init__(vocab_size=24)
            self.model = type(self.model)(vocab_size=24, ninp=16, nhead=2, nhid=24, nlayers=1)

        def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            inputs, target = batch
            loss = F.nll_loss(self(inputs, target), target.view(-1))
            self.log("val_loss", loss)

        def prepare_data(self) -> None:
            """The demo downloads WikiText-2 here; this project generates its tokens."""

    generator = torch.Generator().manual_seed(SEED)
    # A next-token task the decoder can learn: each sequence counts up from a random start.
    starts = torch.randint(0, 24, (96, 1), generator=generator)
    sequence = (starts + torch.arange(9)) % 24
    inputs, target = sequence[:, :-1], sequence[:, 1:]
    train = DataLoader(TensorDataset(inputs[24:], target[24:]), 8)
    val = DataLoader(TensorDataset(inputs[:24], target[:24]), 8)
    # Its forward takes the targets too (teacher forcing): say so with batch_transform.
    options = {"batch_transform": lambda batch: ((batch[0], batch[1]), batch[1])}
    return ZooCase(Demo(), train, val, callback_options=options, left_out=("self_attn",))


# --------------------------------------------------------------------------- torchvision-style


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 2

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], widths=(8, 16), classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c_in = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(
                nn.Sequential(block(c_in, width, stride), block(width * block.expansion, width))
            )
            c_in = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()),
            InvertedResidual(8, 8, 1, 2),
            InvertedResidual(8, 12, 2, 3),
            InvertedResidual(12, 12, 1, 3),
            nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6()),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(24, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(out)))], 1)


class DenseNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block = nn.Sequential(DenseLayer(8, 6), DenseLayer(14, 6))
        self.norm = nn.BatchNorm2d(20)
        self.fc = nn.Linear(20, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.block(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PackedAttention(nn.Module):
    """timm's ``Attention``: one ``qkv`` layer makes queries, keys and values side by side.

    As in torch-pruning's recipe for timm, the heads' widths are read from the tensors
    (``-1``) rather than from the input's width, so that heads can be removed.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class FixedWidthAttention(PackedAttention):
    """timm's own code: the heads' widths are read from the input's width, ``C``."""

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        x = F.scaled_dot_product_attention(*qkv.permute(2, 0, 3, 1, 4))
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, attention: type[PackedAttention]) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention(dim, num_heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TimmStyleViT(nn.Module):
    """Patch embedding, a learned position embedding and pre-norm blocks, as timm writes them."""

    def __init__(
        self, attention: type[PackedAttention] = PackedAttention, dim: int = 32, depth: int = 2
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, 4, attention) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(x)).mean(1))


# --------------------------------------------------------------------------- norms and others


def groupnorm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )  # fmt: skip


def layernorm_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.LayerNorm(32), nn.ReLU(),
        nn.Linear(32, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip


class LayerScaleCNN(nn.Module):
    """A ConvNeXt-style residual block whose branch is scaled by a learned per-channel gamma."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dwconv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pwconv1 = nn.Linear(16, 32)
        self.pwconv2 = nn.Linear(32, 16)
        self.gamma = nn.Parameter(torch.full((16,), 0.5))
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        branch = self.dwconv(x).permute(0, 2, 3, 1)  # channels last, as ConvNeXt does
        branch = self.gamma * self.pwconv2(F.gelu(self.pwconv1(branch)))
        x = x + branch.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class GRUClassifier(nn.Module):
    def __init__(self, vocab: int = 40, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, 16)
        self.gru = nn.GRU(16, 24, batch_first=True)
        self.hidden = nn.Linear(24, 32)
        self.out = nn.Linear(32, classes)

    def forward(self, ids: Tensor) -> Tensor:
        states, _ = self.gru(self.embedding(ids))
        return self.out(F.relu(self.hidden(states[:, -1])))


def sigmoid_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.Sigmoid(), nn.Linear(32, 32), nn.Sigmoid(),
        nn.Linear(32, 4),
    )  # fmt: skip


def _image_case(
    net: Callable[[], nn.Module], module=Classifier, **case: Any
) -> Callable[[], ZooCase]:
    def make() -> ZooCase:
        torch.manual_seed(SEED)
        return ZooCase(module(net()), *_loaders(*_images()), **case)

    return make


def _gru_case() -> ZooCase:
    torch.manual_seed(SEED)
    return ZooCase(Classifier(GRUClassifier()), *_loaders(*_tokens()), left_out=("gru",))


#: Every project of the zoo, by name.
ZOO: dict[str, Callable[[], ZooCase]] = {
    "hf-bert": hf_bert,
    "hf-vit": hf_vit,
    "hf-gpt2": hf_gpt2,
    "lightning-demo-transformer": lightning_demo_transformer,
    "resnet-basic": _image_case(lambda: ResNet(BasicBlock)),
    "resnet-bottleneck": _image_case(lambda: ResNet(Bottleneck)),
    "mobilenetv2": _image_case(MobileNetV2),
    "densenet": _image_case(DenseNet),
    "timm-style-vit": _image_case(TimmStyleViT),
    # Its forward fixes the heads' width: the dry run leaves them out, the MLPs are pruned.
    "timm-vit-fixed-width": _image_case(
        lambda: TimmStyleViT(FixedWidthAttention), left_out=("blocks.0.attn.qkv",)
    ),
    "groupnorm-cnn": _image_case(groupnorm_cnn),
    "layernorm-mlp": _image_case(layernorm_mlp, refused="no prunable unit"),
    "layer-scale": _image_case(LayerScaleCNN, left_out=("pwconv2",)),
    "gru": _gru_case,
    "sigmoid-mlp": _image_case(sigmoid_mlp, refused="no prunable unit"),
    "compiled-in-setup": _image_case(lambda: ResNet(BasicBlock), module=CompiledInSetup),
}
