"""Structured channel masks through ``torch.nn.utils.prune``.

Pruning a channel of a unit (see ``units.py``) masks every parameter coupled to it: the
producers' weight slices along their output dimension and their biases, and the weight
and bias of the BatchNorms that normalize the channel. The channel is then exactly zero
after the BatchNorm, in train and eval mode alike, so its shift cannot leak; the consumers
are left alone, since their inputs on that channel are zero.

Each masked parameter ``p`` is reparametrized the way ``torch.nn.utils.prune`` does it: the
trainable tensor moves to ``p_orig`` (the same ``Parameter`` object, so optimizers built
before pruning keep training it), a ``p_mask`` buffer holds the mask, and a forward
pre-hook recomputes ``p = p_orig * p_mask`` before every forward. The optimizer may move
the masked entries of ``p_orig``, but never the effective weights, so a pruned channel
stays pruned. Masks are cumulative: a channel pruned once stays pruned, unless
:func:`set_pruned_channels` un-prunes it (to roll a step back).

State dicts: a masked model saves ``<module>.<p>_orig`` and ``<module>.<p>_mask`` in place
of ``<module>.<p>``, so its state dict loads only into a model masked the same way; call
:func:`restore_masks` on a fresh model first (what resuming from a checkpoint needs).
:func:`make_permanent` bakes the zeros in and leaves plain parameters, whose state dict
loads into a fresh model of the same class.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

#: Producers whose output channels are the first dimension of their weight.
_OUT_DIM_0 = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: Producers whose output channels are the second dimension of their weight.
_OUT_DIM_1 = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class Unit(Protocol):
    """What this module reads of a prunable unit (``units.PrunableUnit`` has it)."""

    name: str
    producers: tuple[str, ...]
    batchnorms: tuple[str, ...]
    consumers: tuple[str, ...]
    n_channels: int


# (module name, module, parameter name, channel dimension of that parameter)
_Target = tuple[str, nn.Module, str, int]


class ChannelMask(prune.BasePruningMethod):
    """Zeroes whole slices of a tensor along ``dim``: the channels marked in ``pruned``.

    Unlike ``prune.ln_structured``, which picks the channels by their norm, the channels
    are given. Applying it to a parameter that already carries a pruning method multiplies
    the new mask into the old one (see :meth:`apply`), so masks accumulate.

    Args:
        pruned: boolean ``[n]``, ``True`` for each channel to zero.
        dim: the channel dimension of the tensor: 0 for the output channels of a Conv or
            Linear weight, for biases and for BatchNorm parameters.

    Example:
        >>> conv = nn.Conv2d(1, 4, 3)
        >>> _ = ChannelMask.apply(conv, "weight", torch.tensor([True, False, False, True]))
        >>> conv.weight_mask[:, 0, 0, 0]
        tensor([0., 1., 1., 0.])
    """

    PRUNING_TYPE = "structured"

    def __init__(self, pruned: Tensor, dim: int = 0) -> None:
        if not isinstance(pruned, Tensor) or pruned.dtype != torch.bool or pruned.ndim != 1:
            raise ValueError(
                f"pruned is {_describe(pruned)}; it must be a 1-D boolean tensor, one entry "
                "per channel"
            )
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise ValueError(f"dim={dim!r} is not allowed; it must be an integer")
        self.pruned = pruned.detach().cpu().clone()
        self.dim = dim

    def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
        """The ``default_mask`` with the slices of the pruned channels set to zero."""
        if not -t.ndim <= self.dim < t.ndim:
            raise ValueError(
                f"dim={self.dim} does not fit a tensor of shape {tuple(t.shape)}; "
                f"it must be in [{-t.ndim}, {t.ndim - 1}]"
            )
        dim = self.dim % t.ndim
        if t.shape[dim] != len(self.pruned):
            raise ValueError(
                f"the tensor has {t.shape[dim]} channels along dim={dim} (shape "
                f"{tuple(t.shape)}) but pruned has {len(self.pruned)} entries; they must match"
            )
        shape = [1] * t.ndim
        shape[dim] = -1
        keep = (~self.pruned).to(device=default_mask.device, dtype=default_mask.dtype)
        return default_mask * keep.reshape(shape)

    @classmethod
    def apply(  # type: ignore[override]
        cls, module: nn.Module, name: str, pruned: Tensor, dim: int = 0
    ) -> prune.BasePruningMethod:
        """Mask the channels ``pruned`` of ``module.<name>``, on top of any mask it has.

        The first time, this is ``torch.nn.utils.prune``'s reparametrization (``<name>_orig``,
        ``<name>_mask`` and a forward pre-hook). When the parameter already carries a
        pruning method, the new mask is multiplied into ``<name>_mask`` here instead of in a
        ``PruningContainer``: the container hands a structured method only the channels
        that survive so far, renumbered, and fails on 1-D tensors such as biases. The
        method is still recorded: merged into an earlier ``ChannelMask`` on the same
        dimension, else added to the parameter's ``PruningContainer``.

        Args:
            module: the module holding the parameter.
            name: the parameter's name in ``module`` (``"weight"``, ``"bias"``).
            pruned: boolean ``[n]``, ``True`` for each channel to zero.
            dim: the channel dimension of the parameter.

        Returns:
            The pruning method now attached to the parameter.
        """
        method = cls(pruned, dim)
        key, hook = _pruning_hook(module, name)
        if hook is None:
            # The base class builds the reparametrization; it calls cls(pruned, dim) itself.
            method = super().apply(module, name, pruned, dim)
        else:
            method._tensor_name = name
            mask = method.compute_mask(
                getattr(module, name + "_orig"), default_mask=getattr(module, name + "_mask")
            )
            setattr(module, name + "_mask", mask)
            if isinstance(hook, ChannelMask) and hook.dim % mask.ndim == method.dim % mask.ndim:
                hook.pruned = hook.pruned | method.pruned
                method = hook
            elif isinstance(hook, prune.PruningContainer):
                hook.add_pruning_method(method)
                method = hook
            else:
                container = prune.PruningContainer(hook)
                container.add_pruning_method(method)
                module._forward_pre_hooks[key] = container
                method = container
            setattr(module, name, method.apply_mask(module))
        _refresh_after_loading(module)
        return method


def prune_channels(model: nn.Module, unit: Unit, pruned: Tensor) -> None:
    """Mask the channels ``pruned`` of ``unit`` in every parameter coupled to them.

    The producers' weight slices along their output dimension and their biases, and the
    BatchNorms' weights and biases are masked with :class:`ChannelMask`; the consumers
    are left alone. Masks are cumulative: channels pruned before stay pruned. Every
    coupled parameter carries a mask afterwards, even when ``pruned`` is all ``False``.
    Everything is checked before anything changes, so a ``ValueError`` leaves the model
    as it was.

    Args:
        model: the model holding the unit's modules.
        unit: the unit (``units.PrunableUnit`` or anything with its attributes).
        pruned: boolean ``[unit.n_channels]`` tensor, ``True`` for each channel to prune;
            on any device.

    Raises:
        ValueError: ``pruned`` is not a boolean tensor of that shape, the unit would lose
            all its channels, or the unit does not fit the model (a module name that is
            missing, a producer or BatchNorm whose channel count is not ``n_channels``,
            a BatchNorm without affine parameters).

    Example:
        >>> from types import SimpleNamespace
        >>> model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
        >>> unit = SimpleNamespace(
        ...     name="0", producers=("0",), batchnorms=("1",), consumers=(), n_channels=3
        ... )
        >>> prune_channels(model, unit, torch.tensor([False, True, False]))
        >>> pruned_channels(model, unit)
        tensor([False,  True, False])
        >>> model.eval()(torch.randn(2, 1, 5, 5))[:, 1].abs().max().item()
        0.0
    """
    targets = _coupled_parameters(model, unit)
    n = unit.n_channels
    pruned = _channel_flags(unit, pruned, "pruned")
    before = _pruned_from_masks(targets, n)
    if bool((before | pruned).all()):
        raise ValueError(
            f"pruning {int(pruned.sum())} channels of unit {unit.name!r}, with "
            f"{int(before.sum())} pruned already, would prune all its {n} channels; "
            "a unit must keep at least one channel"
        )
    for _, module, name, dim in targets:
        ChannelMask.apply(module, name, pruned, dim)


def set_pruned_channels(model: nn.Module, unit: Unit, pruned: Tensor) -> None:
    """Set the masks of ``unit`` so that exactly the channels ``pruned`` are pruned.

    Where :func:`prune_channels` only adds, this also un-prunes: a channel pruned now but
    not in ``pruned`` gets mask entries of one again in every coupled parameter, and
    computes again with the values its trainable tensors (``<p>_orig``) hold: those it had
    when it was pruned, moved since only by what the optimizer does to masked entries
    (weight decay, momentum); :func:`load_channel_state` puts saved ones back. The
    :class:`ChannelMask` records follow the masks, so later :func:`prune_channels` calls
    accumulate on top as usual. Every coupled parameter carries a mask afterwards.
    Everything is checked before anything changes, so a ``ValueError`` leaves the model
    as it was.

    Args:
        model: the model holding the unit's modules.
        unit: the unit (``units.PrunableUnit`` or anything with its attributes).
        pruned: boolean ``[unit.n_channels]`` tensor, ``True`` for each channel to be
            pruned afterwards; on any device.

    Raises:
        ValueError: as :func:`prune_channels` (``pruned`` is not a boolean tensor of that
            shape, it prunes every channel, the unit does not fit the model); or a
            channel to un-prune is masked in a parameter that carries another pruning
            method as well (``prune.l1_unstructured``, a mask put back by
            :func:`restore_masks`), whose zeros in that channel cannot be told from ours.

    Example:
        >>> from types import SimpleNamespace
        >>> model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
        >>> unit = SimpleNamespace(
        ...     name="0", producers=("0",), batchnorms=("1",), consumers=(), n_channels=3
        ... )
        >>> prune_channels(model, unit, torch.tensor([True, True, False]))
        >>> set_pruned_channels(model, unit, torch.tensor([False, True, False]))
        >>> pruned_channels(model, unit)
        tensor([False,  True, False])
    """
    targets = _coupled_parameters(model, unit)
    pruned = _channel_flags(unit, pruned, "pruned")
    if bool(pruned.all()):
        raise ValueError(
            f"pruned marks every channel of unit {unit.name!r}, all its {unit.n_channels} "
            "channels; a unit must keep at least one channel"
        )
    revived = _pruned_from_masks(targets, unit.n_channels) & ~pruned
    if revived.any():
        for module_name, module, name, dim in targets:
            hook = _pruning_hook(module, name)[1]
            ndim = _maskable(module, name).ndim
            if hook is not None and not (isinstance(hook, ChannelMask) and hook.dim % ndim == dim):
                raise ValueError(
                    f"cannot un-prune channels {revived.nonzero().flatten().tolist()} of unit "
                    f"{unit.name!r}: {module_name}.{name} carries a {type(hook).__name__}, "
                    "not a ChannelMask alone, and its zeros there cannot be told from ours; "
                    "call make_permanent first, or prune that parameter with ChannelMask only"
                )
    for _, module, name, dim in targets:
        hook = _pruning_hook(module, name)[1]
        if revived.any() and hook is not None:  # a ChannelMask alone, checked above
            mask = module._buffers[name + "_mask"]
            with torch.no_grad():
                mask.movedim(dim, 0)[revived.to(mask.device)] = 1
            hook.pruned = hook.pruned & ~revived
        ChannelMask.apply(module, name, pruned, dim)


def channel_state(model: nn.Module, unit: Unit, channels: Tensor) -> dict[str, Tensor]:
    """The values of ``channels`` in every tensor of ``unit`` that holds them, to put back later.

    For each coupled parameter its trainable tensor (``<p>_orig`` once masked), and for
    each of the unit's BatchNorms its running mean and variance, sliced to ``channels``
    along the channel dimension (moved first), cloned to the CPU and keyed
    ``"<module>.<tensor>"``. With :func:`load_channel_state` and
    :func:`set_pruned_channels`, a pruning step can be undone on the channels it pruned,
    weights and statistics included.

    Args:
        model: the model holding the unit's modules.
        unit: the unit.
        channels: boolean ``[unit.n_channels]``, ``True`` for each channel to save.

    Raises:
        ValueError: ``channels`` is not a boolean tensor of that shape, or the unit does
            not fit the model (see :func:`prune_channels`).
    """
    tensors = _channel_tensors(model, unit)
    channels = _channel_flags(unit, channels, "channels")
    state = {}
    for key, tensor, dim in tensors:
        index = channels.nonzero().flatten().to(tensor.device)
        state[key] = tensor.detach().movedim(dim, 0)[index].cpu().clone()
    return state


def load_channel_state(
    model: nn.Module, unit: Unit, channels: Tensor, state: Mapping[str, Tensor]
) -> None:
    """Write what :func:`channel_state` saved for ``channels`` back into the model.

    The masks are left as they are: a channel still pruned stays at zero, and takes the
    loaded values once :func:`set_pruned_channels` un-prunes it. Everything is checked
    before anything changes.

    Args:
        model: the model holding the unit's modules.
        unit: the unit.
        channels: the same boolean ``[unit.n_channels]`` as given to :func:`channel_state`.
        state: what it returned.

    Raises:
        ValueError: ``channels`` is not a boolean tensor of that shape, ``state`` does not
            hold exactly the unit's tensors, or a tensor's shape does not fit
            ``channels``.
    """
    tensors = _channel_tensors(model, unit)
    channels = _channel_flags(unit, channels, "channels")
    expected = {key for key, _, _ in tensors}
    if set(state) != expected:
        raise ValueError(
            f"state holds {sorted(state)}, but unit {unit.name!r} has the tensors "
            f"{sorted(expected)}; pass what channel_state returned for this unit"
        )
    index = channels.nonzero().flatten()
    for key, tensor, dim in tensors:
        shape = (len(index), *tensor.movedim(dim, 0).shape[1:])
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"state[{key!r}] has shape {tuple(state[key].shape)}, but {int(channels.sum())} "
                f"channels of it have shape {shape}; pass the channels given to channel_state"
            )
    with torch.no_grad():
        for key, tensor, dim in tensors:
            tensor.movedim(dim, 0)[index.to(tensor.device)] = state[key].to(tensor)
    for module_name in dict.fromkeys(key.rpartition(".")[0] for key in expected):
        _recompute_pruned(model.get_submodule(module_name), None)


def pruned_channels(model: nn.Module, unit: Unit) -> Tensor:
    """Boolean ``[unit.n_channels]`` (on the CPU): the channels the masks now zero.

    A channel counts as pruned when every mask on the unit's coupled parameters zeroes
    its whole slice; with no mask on them, no channel is pruned. Masks from other pruning
    methods count too (a ``prune.ln_structured`` on a producer's weight alone, say).

    Raises:
        ValueError: the unit does not fit the model (see :func:`prune_channels`).
    """
    return _pruned_from_masks(_coupled_parameters(model, unit), unit.n_channels)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of a model, masked or not.

    ``torch.nn.utils.prune`` (and ``weight_norm``) keep the effective weight as a plain
    attribute computed from parameters; after a forward pass with gradients it is a
    non-leaf tensor, which ``copy.deepcopy`` refuses. The copy gets a detached clone of
    it instead (its hooks recompute it at the next forward pass).
    """
    memo = {
        id(value): value.detach().clone()
        for module in model.modules()
        for value in (*vars(module).values(), *module._buffers.values())
        if isinstance(value, Tensor) and value.grad_fn is not None
    }
    return copy.deepcopy(model, memo)


def make_permanent(model: nn.Module) -> None:
    """Bake every pruning mask into its parameter and remove the reparametrization.

    Runs ``prune.remove`` on every parameter of the model that carries a pruning method,
    :class:`ChannelMask` or any other (Lightning users mix them): ``p_orig`` and
    ``p_mask`` are gone and ``p`` is a plain parameter (the same ``Parameter`` object as
    ``p_orig`` was, so optimizers keep working) with the zeros in it. The outputs do not
    change; further training may revive the zeroed entries. Calling it again does nothing.
    """
    for module in model.modules():
        names = [
            hook._tensor_name
            for hook in module._forward_pre_hooks.values()
            if isinstance(hook, prune.BasePruningMethod)
        ]
        for name in names:
            prune.remove(module, name)
        hooks = module._load_state_dict_post_hooks
        for key in [k for k, hook in hooks.items() if hook is _recompute_pruned]:
            del hooks[key]


def restore_masks(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Re-create on ``model`` the masks saved in ``state_dict``, so that it loads.

    A masked model's state dict holds ``<module>.<p>_orig`` and ``<module>.<p>_mask``
    where a fresh model has ``<module>.<p>``. For every such pair, the parameter ``p`` is
    reparametrized with the saved mask (``prune.custom_from_mask``); parameters masked
    already are left for ``load_state_dict`` to overwrite. Then
    ``model.load_state_dict(state_dict)`` works, and each masked parameter is recomputed
    from the loaded ``_orig`` and ``_mask`` right after loading, not only at the next
    forward. Everything is checked before anything changes.

    Args:
        model: a model of the class that saved ``state_dict``.
        state_dict: keys relative to ``model`` (strip a LightningModule's prefix first).

    Raises:
        ValueError: a mask names a module or parameter ``model`` does not have, or its
            shape differs from the parameter's.

    Example:
        >>> saved = nn.Linear(3, 2)
        >>> _ = ChannelMask.apply(saved, "weight", torch.tensor([True, False]))
        >>> fresh = nn.Linear(3, 2)
        >>> restore_masks(fresh, saved.state_dict())
        >>> _ = fresh.load_state_dict(saved.state_dict())
        >>> bool(fresh.weight[0].eq(0).all())
        True
    """
    modules = dict(model.named_modules())
    plan = []
    for key, mask in state_dict.items():
        base = key.removesuffix("_mask")
        if base == key or base + "_orig" not in state_dict:
            continue
        module_name, _, name = base.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            raise ValueError(
                f"state_dict holds the mask {key!r}, but {type(model).__name__} has no "
                f"module {module_name!r}; restore masks into a model of the class that saved them"
            )
        current = _maskable(module, name)
        if current is None:
            raise ValueError(
                f"state_dict holds the mask {key!r}, but module {module_name!r} "
                f"({type(module).__name__}) has no parameter {name!r} to mask"
            )
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(
                f"the mask {key!r} has shape {tuple(mask.shape)}, but parameter "
                f"{base!r} has shape {tuple(current.shape)}; they must match"
            )
        plan.append((module, name, mask, current))
    for module, name, mask, current in plan:
        if _pruning_hook(module, name)[1] is None:
            prune.custom_from_mask(module, name, mask.detach().to(current.device))
        _refresh_after_loading(module)


# --------------------------------------------------------------------------- helpers


def _coupled_parameters(model: nn.Module, unit: Unit) -> list[_Target]:
    """Every parameter coupled to the unit's channels, checked against ``n_channels``."""
    n = unit.n_channels
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"unit {unit.name!r} has n_channels={n!r}; it must be a positive integer")
    if not unit.producers:
        raise ValueError(f"unit {unit.name!r} has no producers; it needs at least one")
    modules = dict(model.named_modules())
    targets: list[_Target] = []
    for role, names in (("producer", unit.producers), ("batchnorm", unit.batchnorms)):
        for module_name in names:
            module = modules.get(module_name) if module_name else None
            if module is None:
                raise ValueError(
                    f"unit {unit.name!r} names the {role} {module_name!r}, which is not a "
                    f"module of {type(model).__name__}"
                )
            check = _producer_parameters if role == "producer" else _batchnorm_parameters
            params = check(unit.name, module_name, module)
            for name, dim in params:
                size = _maskable(module, name).shape[dim]
                if size != n:
                    raise ValueError(
                        f"the {role} {module_name!r} of unit {unit.name!r} has {size} "
                        f"channels ({name} dim {dim}), but the unit has n_channels={n}; "
                        "they must match"
                    )
                targets.append((module_name, module, name, dim))
    return targets


def _channel_tensors(model: nn.Module, unit: Unit) -> list[tuple[str, Tensor, int]]:
    """Every tensor that holds the unit's channels: ``(key, tensor, channel dim)``."""
    tensors = [
        (f"{module_name}.{name}", _maskable(module, name), dim)
        for module_name, module, name, dim in _coupled_parameters(model, unit)
    ]
    for module_name in unit.batchnorms:
        module = model.get_submodule(module_name)
        for name in ("running_mean", "running_var"):
            buffer = getattr(module, name, None)
            if isinstance(buffer, Tensor):
                tensors.append((f"{module_name}.{name}", buffer, 0))
    return tensors


def _channel_flags(unit: Unit, flags: object, argument: str) -> Tensor:
    """``flags`` on the CPU, checked to be one boolean per channel of the unit."""
    n = unit.n_channels
    if not isinstance(flags, Tensor) or flags.dtype != torch.bool or flags.shape != (n,):
        raise ValueError(
            f"{argument} is {_describe(flags)}; for unit {unit.name!r} it must be a boolean "
            f"tensor of shape ({n},), one entry per channel"
        )
    return flags.detach().cpu()


def _producer_parameters(unit: str, module_name: str, module: nn.Module) -> list[tuple[str, int]]:
    if isinstance(module, _OUT_DIM_1):
        if module.groups != 1:
            raise ValueError(
                f"the producer {module_name!r} of unit {unit!r} is a {type(module).__name__} "
                f"with groups={module.groups}; transposed convolutions are supported with "
                "groups=1 only"
            )
        dim = 1
    elif isinstance(module, _OUT_DIM_0):
        dim = 0
    else:
        allowed = ", ".join(t.__name__ for t in (*_OUT_DIM_0, *_OUT_DIM_1))
        raise ValueError(
            f"the producer {module_name!r} of unit {unit!r} is a {type(module).__name__}; "
            f"producers must be one of {allowed}"
        )
    params = [("weight", dim)]
    if getattr(module, "bias", None) is not None:
        params.append(("bias", 0))
    for name, _ in params:
        _check_maskable(unit, module_name, module, name)
    return params


def _batchnorm_parameters(unit: str, module_name: str, module: nn.Module) -> list[tuple[str, int]]:
    if not isinstance(module, nn.modules.batchnorm._NormBase):
        raise ValueError(
            f"the batchnorm {module_name!r} of unit {unit!r} is a {type(module).__name__}; "
            "it must be a BatchNorm (or InstanceNorm) module"
        )
    if not module.affine:
        raise ValueError(
            f"the batchnorm {module_name!r} of unit {unit!r} has affine=False: with no weight "
            "and bias to mask, its shift -running_mean/sqrt(running_var) would leak through "
            "a pruned channel; use affine=True"
        )
    for name in ("weight", "bias"):
        _check_maskable(unit, module_name, module, name)
    return [("weight", 0), ("bias", 0)]


def _check_maskable(unit: str, module_name: str, module: nn.Module, name: str) -> None:
    if _maskable(module, name) is None:
        raise ValueError(
            f"{module_name}.{name} of unit {unit!r} is neither a plain parameter nor one "
            "pruned by torch.nn.utils.prune (another parametrization?); it cannot be masked"
        )


def _maskable(module: nn.Module, name: str) -> Tensor | None:
    """The tensor behind ``module.<name>``: the parameter, or ``<name>_orig`` once pruned."""
    if _pruning_hook(module, name)[1] is not None:
        return module._parameters.get(name + "_orig")
    return module._parameters.get(name)


def _pruning_hook(
    module: nn.Module, name: str
) -> tuple[int | None, prune.BasePruningMethod | None]:
    """The forward pre-hook that prunes ``module.<name>``, and its key, if there is one."""
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
            return key, hook
    return None, None


def _pruned_from_masks(targets: list[_Target], n: int) -> Tensor:
    pruned = None
    for _, module, name, dim in targets:
        mask = module._buffers.get(name + "_mask")
        if mask is None:
            continue
        zero = mask.detach().eq(0).movedim(dim, 0).reshape(n, -1).all(1).cpu()
        pruned = zero if pruned is None else pruned & zero
    return torch.zeros(n, dtype=torch.bool) if pruned is None else pruned


def _refresh_after_loading(module: nn.Module) -> None:
    """Recompute the module's pruned parameters after ``load_state_dict``, not only at forward."""
    if not any(h is _recompute_pruned for h in module._load_state_dict_post_hooks.values()):
        module.register_load_state_dict_post_hook(_recompute_pruned)


def _recompute_pruned(module: nn.Module, _incompatible_keys: object) -> None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            hook(module, ())


def _describe(value: object) -> str:
    """How an argument looks, for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
