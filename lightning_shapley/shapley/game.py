"""The cooperative game of one layer's channels.

The players are the output channels of a named module (a convolution's filters, a linear
layer's neurons, or any module whose output has a channel dimension). The value of a
coalition is the model's performance on a fixed list of scoring batches when the channels
outside it output exactly zero, measured in eval mode without gradients. When a BatchNorm
directly follows the module, the zeros are applied after it, so its shift cannot leak
through: that is what structured pruning of the channel does.

Several modules may produce one set of channels (a prunable unit of ``units.py``:
convolutions joined by a residual add, an expand and a depthwise convolution). The game
then takes all their names, and a channel outside the coalition is zeroed at every one of
them, as ``masking.prune_channels`` zeroes it in every producer and BatchNorm of the unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_shapley.checks import check_int, is_int
from lightning_shapley.layers import NORM_TYPES, Unit, by_channel, copies_of, kind_of, spread
from lightning_shapley.model_io import Inputs, as_model_inputs, call_model
from lightning_shapley.shapley.allocator import retain_freed_memory
from lightning_shapley.shapley.capture import CHANNELWISE_MODULES, UnsplittableModelError
from lightning_shapley.shapley.engines import FullForward, SplitForward
from lightning_shapley.shapley.values import (
    Batch,
    ValueFunction,
    ValueSetting,
    resolve_value,
    scoring_mode,
)

ENGINES = ("auto", "split+fold", "split", "export", "full")
# The graph captures each engine setting tries, in order, before the full engine.
_CAPTURES = {
    "auto": ("fx", "export"),
    "split+fold": ("fx",),
    "split": ("fx",),
    "export": ("export",),
    "full": (),
}

#: Activation memory one batch of coalitions may take, by device type, as
#: ``engines.activation_bytes`` counts it (every operation's output). On the CPU, the
#: size at which the folded digits CNN of benchmarks/estimators.py runs fastest.
DEFAULT_MEMORY_BUDGET = {"cpu": 48 * 2**20, "cuda": 2 * 2**30}
#: More coalitions per forward pass stop paying off beyond this on the CPU.
MAX_COALITIONS_PER_FORWARD = 64


class ChannelGame:
    """The game whose players are the output channels of one layer (or of layers sharing them).

    Args:
        model: any ``nn.Module``; it is called on each batch's inputs (see
            :mod:`~lightning_shapley.model_io`) and its logits read by the value function.
        layer: qualified name of the module whose output channels are the players; or a
            sequence of names of modules whose outputs are one and the same set of
            channels (the producers and BatchNorms of a unit), each zeroed alike.
        batches: the scoring data, a list of ``(inputs, targets)`` pairs, the inputs a
            tensor or the arguments of a forward call; it is moved to the model's device
            once.
        value: ``"loss"`` (negative mean cross-entropy, the default), ``"accuracy"``, a
            torchmetrics ``Metric`` or a callable ``fn(logits, targets) -> float``.
        channel_dim: the channel dimension of the layers' outputs (1 for ``[B, C, ...]``).
        channels: the number of channels when each is a block of consecutive features of
            the layers' outputs (a GroupNorm's groups, attention heads); ``None`` (the
            default) makes every feature a channel.
        copies: how many copies of the channels the features hold side by side, each
            laid out as ``channels`` says: 3 for the heads of a packed query/key/value
            projection (see :func:`~lightning_shapley.layers.spread`).
        pruned: channels that are already pruned and stay out of every coalition, as a
            boolean ``[C]`` tensor; channels whose ``weight_mask`` (``torch.nn.utils.prune``)
            rows are all zero in every layer that has such a mask are added to it.
        engine: how coalitions are evaluated. ``"split"`` caches what lies upstream of
            the masks (``torch.fx``) and runs only the rest per coalition; ``"split+fold"``
            also folds the mask into the next convolution or linear layer (a single mask
            point only), so a batch of coalitions is one large matrix product;
            ``"export"`` does both on a graph captured by ``torch.export``, for models
            ``torch.fx`` cannot trace; ``"full"`` replays the whole model per coalition.
            ``"auto"`` (the default) takes the first of ``split+fold``, ``export`` and
            ``full`` the model allows (see :mod:`~lightning_shapley.shapley.capture`).
        memory_budget: activation bytes one batch of coalitions may take; defaults by
            device (:data:`DEFAULT_MEMORY_BUDGET`).
        coalitions_per_forward: fix the number of coalitions per forward pass instead.

    Each layer has a mask point: the layer itself, or the BatchNorm that follows it (so
    that its shift cannot leak); both when the layer's output also goes elsewhere (a
    residual stream read by a BatchNorm and by a skip). :attr:`mask_module_names` lists
    them; :attr:`mask_module_name` is the one name when there is a single mask point.

    Calling the game with a boolean ``[m, n_players]`` tensor returns the ``[m]`` values
    (float64); it is the value function the estimators take. The game caches activations
    at construction: after the model changes (a round of pruning), call :meth:`refresh`.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
        >>> game = ChannelGame(model, "0", batches)
        >>> game(torch.ones(1, 3, dtype=torch.bool)).shape
        torch.Size([1])
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | Sequence[str],
        batches: Sequence[Batch],
        *,
        value: ValueSetting | ValueFunction = "loss",
        channel_dim: int = 1,
        channels: int | None = None,
        copies: int = 1,
        pruned: Tensor | None = None,
        engine: str = "auto",
        memory_budget: int | None = None,
        coalitions_per_forward: int | None = None,
    ) -> None:
        names = tuple(layer) if isinstance(layer, list | tuple) else (layer,)
        if not names:
            raise ValueError(
                f"layer={layer!r} names no module; give a module name or a non-empty "
                "sequence of module names"
            )
        modules = [_find_layer(model, name) for name in names]
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not known; use one of {ENGINES}")
        check_int("memory_budget", memory_budget, 1, optional=True)
        check_int("coalitions_per_forward", coalitions_per_forward, 1, optional=True)
        check_int("channels", channels, 1, optional=True)
        check_int("copies", copies, 1)
        self.copies = copies
        self.device = next(model.parameters(), torch.empty(0)).device
        if self.device.type == "cpu":
            retain_freed_memory()
        self.model = model
        self.layer = layer if isinstance(layer, str) else names
        found = dict(zip(names, modules, strict=True))  # each name once, in order
        self.layers: tuple[str, ...] = tuple(found)
        modules = list(found.values())
        #: The coalition value, resolved.
        self.value_function = resolve_value(value)
        self._inputs, self._targets = _checked_batches(batches, self.device)
        self._modules = modules
        self._engine_setting = engine
        with scoring_mode(model):
            self._find_mask_points(modules, channel_dim, self._inputs[0], channels)
            self._forward = self._make_engine(engine, self._inputs)
            per_coalition = self._forward.bytes_per_coalition()
        self._set_players(pruned)
        budget = memory_budget or DEFAULT_MEMORY_BUDGET.get(
            self.device.type, DEFAULT_MEMORY_BUDGET["cuda"]
        )
        self.coalitions_per_forward = coalitions_per_forward or max(
            1, min(MAX_COALITIONS_PER_FORWARD, budget // max(per_coalition, 1))
        )
        if _uses_batch_statistics(model):
            # Coalitions stacked in one batch would share the batch statistics.
            if coalitions_per_forward not in (None, 1):
                raise ValueError(
                    f"coalitions_per_forward={coalitions_per_forward} is not allowed for this "
                    "model: a BatchNorm with track_running_stats=False normalizes by the "
                    "batch, so coalitions must be evaluated one per forward pass (1 or None)"
                )
            self.coalitions_per_forward = 1
        if coalitions_per_forward is None and not self._stacking_is_exact():
            self.coalitions_per_forward = 1

    def _stacking_is_exact(self) -> bool:
        """Whether coalitions stacked in one batch score as they do one at a time.

        Not so for a model that mixes the samples of a batch: one that normalizes by the
        batch, or reads its inputs sequence-first, so that the coalitions stacked along
        dim 0 would attend to each other. Tried once, on the first batch.
        """
        if self.coalitions_per_forward == 1:
            return True
        masks = torch.ones(2, self.n_features, device=self.device)
        try:
            with scoring_mode(self.model):
                together, alone = self._forward(masks, 0), self._forward(masks[:1], 0)
        except Exception:  # the stacked batch does not even run: one at a time it is
            return False
        return together.shape[1:] == alone.shape[1:] and all(
            torch.allclose(logits, alone[0], rtol=1e-4, atol=1e-5) for logits in together
        )

    @classmethod
    def from_unit(
        cls,
        model: nn.Module,
        unit: Unit,
        batches: Sequence[Batch],
        *,
        value: ValueSetting | ValueFunction = "loss",
        pruned: Tensor | None = None,
        engine: str = "auto",
        memory_budget: int | None = None,
        coalitions_per_forward: int | None = None,
    ) -> ChannelGame:
        """The game of a prunable unit's channels, zeroed at its producers and normalizations.

        The channels' axis is the one the layer-kind table gives the unit's producers (a
        convolution's dim 1, a linear layer's last dim); the other arguments are as for
        the constructor. Keep the game while the unit is pruned in rounds and call
        :meth:`refresh` after each: the traced split and the probes are not redone.

        Example:
            >>> from lightning_shapley.pruning.units import find_units
            >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            >>> (unit,) = find_units(net, torch.zeros(2, 4))
            >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
            >>> game = ChannelGame.from_unit(net, unit, batches)
            >>> game.n_players, game.engine
            (6, 'split+fold')
        """
        axes = {kind_of(model.get_submodule(name)).output_axis for name in unit.producers}
        if len(axes) > 1:
            raise ValueError(
                f"the producers of unit {unit.name!r} hold their channels on different axes "
                f"of their outputs ({sorted(axes)}); a game needs one channel axis"
            )
        return cls(
            model,
            (*unit.producers, *unit.batchnorms),
            batches,
            value=value,
            channel_dim=axes.pop(),
            channels=unit.n_channels,
            copies=copies_of(unit),
            pruned=pruned,
            engine=engine,
            memory_budget=memory_budget,
            coalitions_per_forward=coalitions_per_forward,
        )

    def refresh(self, pruned: Tensor | None = None) -> None:
        """Takes the model as it is now, after its masks, weights or statistics changed.

        The upstream cache is recomputed and the players are read again from ``pruned``
        and the masks (as the constructor does); the mask points, the traced split and
        the coalitions per forward pass are kept. A graph that holds copies of the
        model's tensors (``get_attr``) is traced again instead, since the copies go stale.
        """
        with scoring_mode(self.model):
            if self._forward.reads_attributes:
                self._forward = self._make_engine(self._engine_setting, self._inputs)
            else:
                self._forward.recache()
        self._set_players(pruned)

    def focus(self, candidates: Tensor | None) -> None:
        """Plays the game among ``candidates`` alone, the other channels held in every coalition.

        The players become the candidates (boolean ``[n_channels]``) not pruned; every
        other channel not pruned is kept in each coalition, as the network keeps it. A
        leave-one-out (the band of depth 1) of a candidate is then what it is in the
        whole game. ``None`` makes every channel not pruned a player again; so does
        :meth:`refresh`.
        """
        alive = torch.zeros(self.n_channels, dtype=torch.bool)
        alive[torch.cat([self.players, self._held.cpu()])] = True
        if candidates is None:
            chosen = alive
        else:
            candidates = torch.as_tensor(candidates, dtype=torch.bool).cpu()
            if candidates.shape != (self.n_channels,):
                raise ValueError(
                    f"candidates has shape {tuple(candidates.shape)}; it must be a boolean "
                    f"tensor of shape ({self.n_channels},), one entry per channel"
                )
            chosen = alive & candidates
        if not chosen.any():
            raise ValueError("no candidate is a channel still in play; a game needs a player")
        self.players = chosen.nonzero().flatten()
        self._held = (alive & ~chosen).nonzero().flatten().to(self.device)

    def _set_players(self, pruned: Tensor | None) -> None:
        self.players = self._players(pruned)
        self._held = torch.zeros(0, dtype=torch.long, device=self.device)

    def _players(self, pruned: Tensor | None) -> Tensor:
        """The channels not pruned: not in ``pruned`` nor zeroed by every layer's weight mask."""
        n = self.n_channels
        out = torch.zeros(n, dtype=torch.bool)
        if pruned is not None:
            pruned = torch.as_tensor(pruned, dtype=torch.bool).cpu()
            if pruned.shape != (n,):
                raise ValueError(
                    f"pruned has shape {tuple(pruned.shape)}; it must be a boolean tensor of "
                    f"shape ({n},), one entry per channel"
                )
            out |= pruned
        # As in masking.pruned_channels: pruned where every mask there zeroes the channel.
        zero_rows = []
        for module in self._modules:
            mask = getattr(module, "weight_mask", None)
            if isinstance(mask, Tensor):
                rows = mask.detach().movedim(_weight_channels_dim(module), 0)
                if len(rows) % (n * self.copies) == 0:
                    zero_rows.append(by_channel(rows.eq(0), n, self.copies).all(1).cpu())
        if zero_rows:
            out |= torch.stack(zero_rows).all(0)
        players = (~out).nonzero().flatten()
        if len(players) == 0:
            raise ValueError(
                "every channel of the layer is pruned; a game needs at least one player"
            )
        return players

    def release(self) -> None:
        """Frees the upstream cache until the next :meth:`refresh` (the game keeps its shape)."""
        self._forward.release()

    def _find_mask_points(
        self, modules: list[nn.Module], channel_dim: int, inputs: Inputs, channels: int | None
    ) -> None:
        """Sets ``channel_dim``, ``n_channels``, ``n_features`` and ``mask_module_names``."""
        dims, sizes, points = {}, {}, []
        for name, module in zip(self.layers, modules, strict=True):
            shape, follower = _probe(self.model, module, inputs)
            dims[name] = _checked_channel_dim(channel_dim, shape, name)
            sizes[name] = shape[dims[name]]
            follower_size = follower and getattr(follower, kind_of(follower).out_attribute)
            if follower is not None and (dims[name] != 1 or follower_size != sizes[name]):
                follower = None
            if follower is None or _leaks_past(
                self.model, module, follower, inputs, self.value_function.logits
            ):
                points.append(name)
            if follower is not None:
                points.append(_name_of(self.model, follower))
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"layer={self.layer!r} names modules with different numbers of channels "
                f"({sizes}); they must all output one and the same set of channels"
            )
        if len(set(dims.values())) > 1:
            raise ValueError(
                f"channel_dim={channel_dim} is a different dimension of each layer's output "
                f"({dims}); give it counted from the front (1 for [batch, channels, ...])"
            )
        self.channel_dim = dims[self.layers[0]]
        #: The features at the channel axis of the layers' outputs.
        self.n_features = sizes[self.layers[0]]
        self.n_channels = channels or self.n_features // self.copies
        if self.n_features % (self.n_channels * self.copies):
            raise ValueError(
                f"channels={channels} with copies={self.copies} does not divide the "
                f"{self.n_features} features of {self.layer!r}; each channel must be a block "
                "of equally many features in each copy"
            )
        self.mask_module_names: tuple[str, ...] = tuple(dict.fromkeys(points))

    @property
    def mask_module_name(self) -> str:
        """The module whose output is masked, when there is one (else see ``mask_module_names``)."""
        if len(self.mask_module_names) != 1:
            raise AttributeError(
                f"this game masks the outputs of {len(self.mask_module_names)} modules, "
                f"{self.mask_module_names}; read mask_module_names"
            )
        return self.mask_module_names[0]

    def _make_engine(self, engine: str, inputs: list[Inputs]) -> SplitForward | FullForward:
        for capture in _CAPTURES[engine]:
            try:
                split = SplitForward(
                    self.model,
                    self.mask_module_names,
                    self.channel_dim,
                    self.n_features,
                    inputs,
                    fold=engine != "split",
                    read_output=self.value_function.logits,
                    capture=capture,
                )
            except UnsplittableModelError:
                if engine != "auto":
                    raise
                continue
            if engine == "split+fold" and split.name != engine:
                raise UnsplittableModelError(f"engine='split+fold': {self._why_not_folded()}")
            return split
        mask_modules = [self.model.get_submodule(name) for name in self.mask_module_names]
        return FullForward(
            self.model, mask_modules, self.channel_dim, inputs, self.value_function.logits
        )

    def _why_not_folded(self) -> str:
        if len(self.mask_module_names) > 1:
            return (
                f"the channels are masked at {len(self.mask_module_names)} modules, "
                f"{self.mask_module_names}, and only a single mask point can be folded"
            )
        return (
            f"no convolution or linear layer follows {self.mask_module_name!r} through "
            "channel-wise operations only"
        )

    @property
    def engine(self) -> str:
        """Which engine evaluates coalitions.

        ``"split+fold"``, ``"split"``, ``"export+fold"``, ``"export"`` or ``"full"``.
        """
        return self._forward.name

    @property
    def n_players(self) -> int:
        """The number of players: the channels not pruned yet."""
        return len(self.players)

    def channel_masks(self, coalitions: Tensor) -> Tensor:
        """Float ``[m, n_channels]`` masks for boolean ``[m, n_players]`` coalitions.

        A channel held by :meth:`focus` is 1 in every mask.
        """
        coalitions = torch.as_tensor(coalitions, dtype=torch.bool)
        if coalitions.ndim != 2 or coalitions.shape[1] != self.n_players:
            raise ValueError(
                f"coalitions of shape {tuple(coalitions.shape)} do not fit this game; "
                f"expected [m, {self.n_players}] (one column per player)"
            )
        masks = torch.zeros(len(coalitions), self.n_channels, device=self.device)
        masks[:, self.players.to(self.device)] = coalitions.to(self.device, torch.float32)
        masks[:, self._held] = 1.0
        return masks

    def __call__(self, coalitions: Tensor) -> Tensor:
        """Values (float64 ``[m]``, on the CPU) of boolean ``[m, n_players]`` coalitions."""
        masks = spread(self.channel_masks(coalitions), self.n_features, self.copies)
        values = []
        with scoring_mode(self.model):
            for chunk in masks.split(self.coalitions_per_forward):
                logits = torch.cat(
                    [self._forward(chunk, b) for b in range(len(self._targets))], dim=1
                )
                values.append(self.value_function(logits, torch.cat(self._targets)))
        return torch.cat(values).to("cpu", torch.float64)


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        candidates = [name for name, m in modules.items() if kind_of(m) is not None]
        raise ValueError(
            f"layer={layer!r} is not a module of {type(model).__name__}; "
            f"layers with channels: {candidates}"
        )
    return modules[layer]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _checked_batches(
    batches: Sequence[Batch], device: torch.device
) -> tuple[list[Inputs], list[Tensor]]:
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; give at least one (inputs, targets) batch to score on")
    inputs, targets = [], []
    for index, batch in enumerate(batches):
        if not (isinstance(batch, list | tuple) and len(batch) == 2):
            raise ValueError(
                f"batches[{index}] is a {type(batch).__name__}; each batch must be an "
                "(inputs, targets) pair"
            )
        try:
            inputs.append(as_model_inputs(batch[0]).to(device))
        except ValueError as error:
            raise ValueError(f"batches[{index}]: {error}") from error
        targets.append(torch.as_tensor(batch[1]).to(device))
    return inputs, targets


def _probe(
    model: nn.Module, module: nn.Module, inputs: Inputs
) -> tuple[torch.Size, nn.Module | None]:
    """The layer's output shape, and the BatchNorm that follows it, if any.

    A BatchNorm follows when it consumes the layer's output directly or through
    channel-wise modules only (Conv-BN-ReLU and Conv-ReLU-BN alike): the mask then goes
    after it, so that its shift cannot leak into a channel that is switched off.
    """
    seen: dict[str, object] = {}
    chain: list[Tensor] = []  # the layer's output and what channel-wise modules made of it

    def record_output(_module: nn.Module, _inputs: object, output: object) -> None:
        if "output" not in seen:
            seen["output"] = output
            chain.extend(_tensors_of(output))

    def follow(successor: nn.Module, args: tuple, output: object) -> None:
        if not (args and any(args[0] is tensor for tensor in chain)):
            return
        if isinstance(successor, NORM_TYPES):
            seen.setdefault("follower", successor)
        else:
            chain.extend(_tensors_of(output))

    handles = [module.register_forward_hook(record_output)]
    if not isinstance(module, NORM_TYPES):
        handles += [
            m.register_forward_hook(follow)
            for m in model.modules()
            if isinstance(m, (*NORM_TYPES, *CHANNELWISE_MODULES))
        ]
    try:
        call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    if "output" not in seen:
        raise ValueError("the layer was not called by the model's forward on the scoring batches")
    output = seen["output"]
    if not isinstance(output, Tensor) or output.ndim < 2:
        kind = (
            f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        )
        raise ValueError(
            f"the layer's output ({kind}) has no channel dimension; its players must be the "
            "channels of a tensor shaped [batch, ...]"
        )
    return output.shape, seen.get("follower")


def _leaks_past(
    model: nn.Module,
    module: nn.Module,
    follower: nn.Module,
    inputs: Inputs,
    read_output: Callable[[object], Tensor],
) -> bool:
    """Whether ``module``'s output reaches the model's output other than through ``follower``.

    Masking after the BatchNorm that follows a layer is pruning the channel only when that
    BatchNorm is the sole way on for the layer's output; a pre-activation residual stream
    is read by a BatchNorm and by the skip, so its producer must be masked too. With every
    channel zeroed after the follower, also zeroing the layer's output changes the model's
    output exactly when it goes elsewhere.
    """

    def zero(_module: nn.Module, _inputs: object, output: Tensor) -> Tensor:
        return torch.zeros_like(output)

    outputs = []
    for sites in ((follower,), (module, follower)):
        handles = [site.register_forward_hook(zero) for site in sites]
        try:
            outputs.append(read_output(call_model(model, inputs)))
        finally:
            for handle in handles:
                handle.remove()
    return not torch.equal(*outputs)


def _tensors_of(output: object) -> list[Tensor]:
    return [output] if isinstance(output, Tensor) else []


def _uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm normalizes by the batch even in eval mode, mixing its samples."""
    return any(
        isinstance(m, NORM_TYPES) and not getattr(m, "track_running_stats", True)
        for m in model.modules()
    )


def _checked_channel_dim(channel_dim: int, shape: torch.Size, layer: str) -> int:
    ndim = len(shape)
    if not is_int(channel_dim) or not (1 <= channel_dim < ndim or -ndim < channel_dim < 0):
        raise ValueError(
            f"channel_dim={channel_dim!r} does not fit the output of {layer!r}, shape "
            f"{tuple(shape)}; it must index a non-batch dimension: 1 to {ndim - 1}, "
            f"or -1 to {1 - ndim}"
        )
    return channel_dim % ndim


def _weight_channels_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that holds its output channels, as its kind says."""
    kind = kind_of(module)
    return dict(kind.parameters).get("weight", 0) if kind is not None else 0
