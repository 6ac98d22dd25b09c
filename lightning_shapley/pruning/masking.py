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
of ``<module>.<p>``, so its state dict loads only into a model masked the same way.
:func:`make_permanent` bakes the zeros in and leaves plain parameters, whose state dict
loads into a fresh model of the same class.

Which parameters hold a unit's channels, and along which dimension, is the layer-kind
table's to say (:mod:`~lightning_shapley.layers`).

The module is longer than most (over 600 lines) on purpose: every function here reads
the same reparametrization internals (``<p>_orig``, ``<p>_mask``, the pruning hooks and
their ``ChannelMask`` records), and split in two, each half would reach into the other's
private helpers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_shapley.checks import is_int
from lightning_shapley.layers import NORM, PRODUCER, Unit, by_channel, copies_of, kind_of, spread

# (module name, module, parameter name, channel dimension, copies of the channels along it)
_Target = tuple[str, nn.Module, str, int, int]


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
        if not is_int(dim):
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
    for _, module, name, dim, copies in targets:
        ChannelMask.apply(module, name, _target_entries(pruned, module, name, dim, copies), dim)
    _load_whole_or_nothing(model)


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
            method as well (``prune.l1_unstructured``, say), whose zeros in that channel
            cannot be told from ours.

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
        for module_name, module, name, dim, _ in targets:
            hook = _pruning_hook(module, name)[1]
            ndim = _maskable(module, name).ndim
            if hook is not None and not (isinstance(hook, ChannelMask) and hook.dim % ndim == dim):
                raise ValueError(
                    f"cannot un-prune channels {revived.nonzero().flatten().tolist()} of unit "
                    f"{unit.name!r}: {module_name}.{name} carries a {type(hook).__name__}, "
                    "not a ChannelMask alone, and its zeros there cannot be told from ours; "
                    "call make_permanent first, or prune that parameter with ChannelMask only"
                )
    for _, module, name, dim, copies in targets:
        hook = _pruning_hook(module, name)[1]
        revived_entries = _target_entries(revived, module, name, dim, copies)
        if revived.any() and hook is not None:  # a ChannelMask alone, checked above
            mask = module._buffers[name + "_mask"]
            with torch.no_grad():
                mask.movedim(dim, 0)[revived_entries.to(mask.device)] = 1
            hook.pruned = hook.pruned & ~revived_entries
        ChannelMask.apply(module, name, _target_entries(pruned, module, name, dim, copies), dim)
    _load_whole_or_nothing(model)


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
    for key, tensor, dim, copies in tensors:
        index = spread(channels, tensor.shape[dim], copies).nonzero().flatten().to(tensor.device)
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
    expected = {key for key, *_ in tensors}
    if set(state) != expected:
        raise ValueError(
            f"state holds {sorted(state)}, but unit {unit.name!r} has the tensors "
            f"{sorted(expected)}; pass what channel_state returned for this unit"
        )
    indices = [
        spread(channels, tensor.shape[dim], copies).nonzero().flatten()
        for _, tensor, dim, copies in tensors
    ]
    for (key, tensor, dim, _), index in zip(tensors, indices, strict=True):
        shape = (len(index), *tensor.movedim(dim, 0).shape[1:])
        if tuple(state[key].shape) != shape:
            raise ValueError(
                f"state[{key!r}] has shape {tuple(state[key].shape)}, but {int(channels.sum())} "
                f"channels of it have shape {shape}; pass the channels given to channel_state"
            )
    with torch.no_grad():
        for (key, tensor, dim, _), index in zip(tensors, indices, strict=True):
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


def zero_channels(model: nn.Module, unit: Unit) -> Tensor:
    """Boolean ``[unit.n_channels]``: the channels exactly zero in every coupled parameter.

    What a pruned channel leaves in plain weights (a checkpoint written through
    :func:`bake_masks`, a model after :func:`make_permanent`); a trained channel is never
    zero throughout, a BatchNorm's scale included.
    """
    zero = torch.ones(unit.n_channels, dtype=torch.bool)
    for _, module, name, dim, copies in _coupled_parameters(model, unit):
        tensor = getattr(module, name).detach()
        zero &= _zero_slices(tensor, dim, unit.n_channels, copies)
    return zero


def has_masks(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` carries a ``torch.nn.utils.prune`` method."""
    return any(
        isinstance(hook, prune.BasePruningMethod)
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
    )


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


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask baked in (:func:`make_permanent`); ``model`` stays."""
    replica = copy_model(model)
    make_permanent(replica)
    return replica


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
        pre_hooks = module._load_state_dict_pre_hooks
        for key in [k for k, hook in pre_hooks.items() if hook.hook is _accept_plain_weights]:
            del pre_hooks[key]


# --------------------------------------------------------------------------- helpers


def _coupled_parameters(model: nn.Module, unit: Unit) -> list[_Target]:
    """Every parameter coupled to the unit's channels, checked against ``n_channels``."""
    n = unit.n_channels
    if not is_int(n) or n < 1:
        raise ValueError(f"unit {unit.name!r} has n_channels={n!r}; it must be a positive integer")
    if not unit.producers:
        raise ValueError(f"unit {unit.name!r} has no producers; it needs at least one")
    modules = dict(model.named_modules())
    targets: list[_Target] = []
    copies = copies_of(unit)
    for role, names in ((PRODUCER, unit.producers), (NORM, unit.batchnorms)):
        for module_name in names:
            module = modules.get(module_name) if module_name else None
            if module is None:
                raise ValueError(
                    f"unit {unit.name!r} names the {role} {module_name!r}, which is not a "
                    f"module of {type(model).__name__}"
                )
            for name, dim in _channel_parameters(unit.name, module_name, module, role):
                size = _maskable(module, name).shape[dim]
                if size % (n * copies):
                    raise ValueError(
                        f"the {role} {module_name!r} of unit {unit.name!r} has {size} "
                        f"channels ({name} dim {dim}), but the unit has n_channels={n} "
                        f"(held {copies} times); they must match, or be a multiple of it "
                        "(each channel of the unit a block of consecutive entries: a group, "
                        "an attention head)"
                    )
                targets.append((module_name, module, name, dim, copies))
    return targets


def _channel_tensors(model: nn.Module, unit: Unit) -> list[tuple[str, Tensor, int, int]]:
    """Every tensor that holds the unit's channels: ``(key, tensor, channel dim, copies)``."""
    tensors = [
        (f"{module_name}.{name}", _maskable(module, name), dim, copies)
        for module_name, module, name, dim, copies in _coupled_parameters(model, unit)
    ]
    for module_name in unit.batchnorms:
        module = model.get_submodule(module_name)
        for name in kind_of(module).statistics:
            buffer = getattr(module, name, None)
            if isinstance(buffer, Tensor):
                tensors.append((f"{module_name}.{name}", buffer, 0, copies_of(unit)))
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


def _channel_parameters(
    unit: str, module_name: str, module: nn.Module, role: str
) -> list[tuple[str, int]]:
    """The ``(parameter, dim)`` holding the unit's channels in a module, as its kind says."""
    kind = kind_of(module)
    if kind is None or kind.role != role:
        raise ValueError(
            f"the {role} {module_name!r} of unit {unit!r} is a {type(module).__name__}; a "
            f"{role} must be a layer of a kind in the layer-kind table whose role is {role}"
        )
    problem = kind.problem(module)
    if problem is not None:
        raise ValueError(f"the {role} {module_name!r} of unit {unit!r} is {problem}")
    params = kind.channel_parameters(module)
    for name, _ in params:
        _check_maskable(unit, module_name, module, name)
    return params


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
    for _, module, name, dim, copies in targets:
        mask = module._buffers.get(name + "_mask")
        if mask is None:
            continue
        zero = _zero_slices(mask, dim, n, copies)
        pruned = zero if pruned is None else pruned & zero
    return torch.zeros(n, dtype=torch.bool) if pruned is None else pruned


def _refresh_after_loading(module: nn.Module) -> None:
    """Lets ``load_state_dict`` take plain weights, and recomputes the pruned parameters after.

    Without the pre-hook a masked module refuses the state dict of a plain checkpoint
    (``p`` where it has ``p_orig`` and ``p_mask``); without the post-hook its effective
    weights would be stale until the next forward pass.
    """
    if not any(h is _recompute_pruned for h in module._load_state_dict_post_hooks.values()):
        module.register_load_state_dict_post_hook(_recompute_pruned)
        module.register_load_state_dict_pre_hook(_accept_plain_weights)


def _load_whole_or_nothing(model: nn.Module) -> None:
    """Makes a strict ``load_state_dict`` of ``model`` refuse a bad state dict up front."""
    hooks = model._load_state_dict_pre_hooks.values()
    if not any(getattr(hook, "hook", None) is _check_before_loading for hook in hooks):
        model.register_load_state_dict_pre_hook(_check_before_loading)


def _check_before_loading(
    model: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_args: object
) -> None:
    """Raises before anything is copied if a tensor of ``state_dict`` has another shape.

    ``load_state_dict`` copies every tensor that fits before it reports the ones that do
    not, leaving a model half one state and half another; a tensor of another shape fails
    the load strict or not, so it is refused here, before the first copy. (Missing and
    unexpected keys are the load's to judge: only it knows whether it is strict. A masked
    parameter takes a plain ``<p>`` as well as ``<p>_orig``: see
    :func:`_accept_plain_weights`.)
    """
    own = model.state_dict()
    for key in [k for k in own if k.endswith("_orig")]:
        own.setdefault(key.removesuffix("_orig"), own[key])
    resized = sorted(
        key
        for key, tensor in state_dict.items()
        if key.startswith(prefix)
        and isinstance(tensor, Tensor)
        and key[len(prefix) :] in own
        and tensor.shape != own[key[len(prefix) :]].shape
    )
    if resized:
        shapes = {key: tuple(state_dict[key].shape) for key in resized[:3]}
        raise RuntimeError(
            f"the state dict holds tensors of other shapes than {type(model).__name__}'s "
            f"({shapes}), so nothing was loaded"
        )


def _accept_plain_weights(
    module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *_args: object
) -> None:
    """Turns plain weights in ``state_dict`` into this module's ``p_orig`` and ``p_mask``.

    A checkpoint written through :func:`bake_masks` holds ``p = p_orig * p_mask``, its
    pruned channels exactly zero; the masks are taken back from those zeros (a channel
    slice of a ``ChannelMask`` that is all zero, an element for other methods), so the
    module computes what the checkpoint's model computed, with the checkpoint's masks.
    """
    for hook in list(module._forward_pre_hooks.values()):
        if not isinstance(hook, prune.BasePruningMethod):
            continue
        name = prefix + hook._tensor_name
        if name not in state_dict or f"{name}_orig" in state_dict:
            continue
        weights = state_dict.pop(name)
        state_dict[f"{name}_orig"] = weights
        if isinstance(hook, ChannelMask):
            zero = _zero_slices(weights, hook.dim, len(hook.pruned))
            mask = ChannelMask(zero, hook.dim).compute_mask(weights, torch.ones_like(weights))
            state_dict[f"{name}_mask"] = mask
        else:
            state_dict[f"{name}_mask"] = weights.ne(0).to(weights.dtype)


def _recompute_pruned(module: nn.Module, _incompatible_keys: object) -> None:
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, ChannelMask):
            # The masks may have been loaded: the record follows them.
            mask = module._buffers[hook._tensor_name + "_mask"]
            hook.pruned = _zero_slices(mask, hook.dim, len(hook.pruned))
        if isinstance(hook, prune.BasePruningMethod):
            hook(module, ())


def _target_entries(
    channels: Tensor, module: nn.Module, name: str, dim: int, copies: int
) -> Tensor:
    """Per-channel flags spread over the entries of ``module.<name>`` along ``dim``."""
    return spread(channels, _maskable(module, name).shape[dim], copies)


def _zero_slices(tensor: Tensor, dim: int, n: int, copies: int = 1) -> Tensor:
    """Boolean ``[n]`` on the CPU: which of the ``n`` channels along ``dim`` are all zero.

    The channels are laid out as :func:`~lightning_shapley.layers.spread` says.
    """
    return by_channel(tensor.detach().eq(0).movedim(dim, 0), n, copies).all(1).cpu()


def _describe(value: object) -> str:
    """How an argument looks, for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def bake_masks(state_dict: dict[str, Tensor]) -> None:
    """Turns a masked model's state dict into plain weights, in place: ``p = p_orig * p_mask``.

    The result loads into a fresh model, with no ``<p>_orig`` or ``<p>_mask`` keys.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> _ = ChannelMask.apply(net, "weight", torch.tensor([True, False]))
        >>> state = net.state_dict()
        >>> bake_masks(state)
        >>> sorted(state), state["weight"][0].abs().sum().item()
        (['bias', 'weight'], 0.0)
    """
    for key in [k for k in state_dict if k.endswith("_orig")]:
        base = key.removesuffix("_orig")
        mask = state_dict.pop(f"{base}_mask", None)
        original = state_dict.pop(key)
        state_dict[base] = original if mask is None else original * mask


def unmasked_parameters(model: nn.Module) -> int:
    """Parameters not held at zero by a pruning mask (a masked one counts its ones).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> _ = ChannelMask.apply(net, "weight", torch.tensor([True, False]))
        >>> unmasked_parameters(net)
        5
    """
    total = 0
    for name, parameter in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        mask = owner._buffers.get(leaf.removesuffix("_orig") + "_mask")
        total += (
            int(mask.sum()) if leaf.endswith("_orig") and mask is not None else parameter.numel()
        )
    return total
