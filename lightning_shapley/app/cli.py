"""The ``lightning-shapley`` command: the Hydra entry point of the pruning pipeline.

It composes ``conf/`` and hands the job to :func:`lightning_shapley.app.pipeline.run`. A
setting the run cannot take fails before any training, with one line on stderr (the key,
the value and what is allowed) and exit status 2: an unknown key is caught here before
Hydra composes (Hydra itself would only say "not in struct"), a bad value by the pipeline
when it builds the objects or when the pruning callback checks the model.
"""

from __future__ import annotations

import difflib
import importlib.util
import netrc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lightning_shapley.app.pipeline import SettingError, run

# A wheel carries the configs inside the package; a source checkout keeps them at the repo root.
_PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"
_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"
CONFIG_PATH = str(_PACKAGED_CONF if _PACKAGED_CONF.is_dir() else _REPO_CONF)
# The exit status of a refused setting (2, as argparse uses for usage errors).
SETTING_ERROR_STATUS = 2


# --------------------------------------------------------------------------- resolvers


def _run_name() -> str | None:
    """The job's overrides as one string (``pruning=l1,pruning.amount=0.25``); None if none."""
    return HydraConfig.get().job.override_dirname or None


def _sweep_group() -> str | None:
    """The multirun's folder, shared by its jobs; None for a single run."""
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def _wandb_offline() -> bool:
    """Whether W&B must run offline: no API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (OSError, netrc.NetrcParseError):
        return True


# The logger configs read these; registered on import, so composing the config outside the
# command (tests, notebooks) works too.
OmegaConf.register_new_resolver("ls.run_name", _run_name, replace=True)
OmegaConf.register_new_resolver("ls.sweep_group", _sweep_group, replace=True)
OmegaConf.register_new_resolver("ls.wandb_offline", _wandb_offline, replace=True)


# --------------------------------------------------------------------------- entry points


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any] | None:
    try:
        return run(cfg)
    except SettingError as error:
        _refuse(str(error))


def main() -> None:
    """The console script: checks the command line's keys, then hands over to Hydra."""
    message = check_overrides(sys.argv[1:])
    if message is not None:
        _refuse(message)
    _app()


def _refuse(message: str) -> NoReturn:
    # SystemExit, not an exception Hydra catches: one line, no traceback, and a multirun
    # stops at its first job instead of failing every job the same way.
    print(f"lightning-shapley: {message}", file=sys.stderr)
    raise SystemExit(SETTING_ERROR_STATUS)


# --------------------------------------------------------------------------- unknown keys


def check_overrides(argv: Sequence[str], config_dir: str = CONFIG_PATH) -> str | None:
    """Why a command line sets a key the configuration does not have, or None.

    Hydra refuses such a key with "Key 'x' is not in struct"; this names the key, the value
    and the keys that exist there (with the closest one). The groups chosen on the command
    line (the first option of a swept group) are composed first, since they decide which
    keys exist. An unknown option of a group is named with the options there. Anything
    else that is wrong (syntax, a value) is left to Hydra and the run.

    Args:
        argv: the command line after the program name.
        config_dir: the configuration folder.

    Returns:
        The message, or None when every key exists (or the line is not one to check).

    Example:
        >>> print(check_overrides(["pruning.amout=0.3"]))  # doctest: +ELLIPSIS
        pruning.amout=0.3: 'pruning' has no key 'amout' (did you mean pruning.amount?); ...
        >>> check_overrides(["pruning=l1", "pruning.amount=0.3"]) is None
        True
    """
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import OverrideType

        args, _ = get_args_parser().parse_known_args(list(argv))
        special = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun")
        if any(getattr(args, name, None) for name in special) or args.config_name:
            return None
        if args.config_path or args.config_dir:
            return None
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra reports a malformed command line better than we would
        return None

    groups, settings, added = [], [], []
    for override in overrides:
        key = override.key_or_group
        if key == "hydra/launcher" and not override.is_sweep_override():
            message = _missing_launcher(str(override.value()))
            if message is not None:
                return message
        if key.startswith("hydra") or override.package:
            continue
        if (Path(config_dir) / key).is_dir():
            message = _unknown_option(override, key, config_dir)
            if message is not None:
                return message
            if override.is_sweep_override():  # the first option decides which keys exist
                choice = next(iter(override.sweep_string_iterator()), None)
                groups.append(f"{key}={choice}")
            else:
                groups.append(override.input_line)
        elif override.type == OverrideType.CHANGE:
            settings.append(override)
        else:
            added.append(key)
    settings = [o for o in settings if not any(_is_under(o.key_or_group, k) for k in added)]
    if not settings:
        return None
    try:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(version_base="1.3", config_dir=config_dir, job_name="check"):
            cfg = compose(config_name="config", overrides=groups)
    except Exception:  # e.g. an unknown group option: Hydra lists the options itself
        return None
    tree = OmegaConf.to_container(cfg, resolve=False)
    for override in settings:
        value = (override.input_line or "").partition("=")[2]
        message = _missing_key(tree, override.key_or_group, value, config_dir)
        if message is not None:
            return message
    return None


# The launcher options and the plugin each needs (Hydra would only say "Could not load").
_LAUNCHER_PLUGINS = {
    "local": ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    "joblib": ("hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def _missing_launcher(option: str) -> str | None:
    """Why ``hydra/launcher=option`` cannot load: its plugin is not installed; else None."""
    if option not in _LAUNCHER_PLUGINS:
        return None
    module, package = _LAUNCHER_PLUGINS[option]
    try:
        if importlib.util.find_spec(f"hydra_plugins.{module}") is not None:
            return None
    except ModuleNotFoundError:  # no Hydra plugin installed at all
        pass
    return f"hydra/launcher={option} needs the {package} plugin: pip install {package}"


def _is_under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _missing_key(tree: Any, key: str, value: str, config_dir: str) -> str | None:
    """What is wrong with setting ``key`` in the plain config ``tree``, or None."""
    node, path = tree, []
    for part in key.split("."):
        where = ".".join(path)
        if isinstance(node, dict):
            if part not in node:
                options = _group_options(config_dir, ".".join([*path, part]))
                if options:
                    return (
                        f"{key}={value}: the group {'.'.join([*path, part])!r} has no option "
                        f"chosen; choose one first: {'/'.join([*path, part])}={'|'.join(options)}"
                    )
                known = [str(k) for k in node if not str(k).startswith("_")]
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
                return (
                    f"{key}={value}: {repr(where) if where else 'the config'} has no key "
                    f"{part!r}{hint}; its keys are {', '.join(known)}. "
                    f"To add a new key, write +{key}={value}"
                )
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return f"{key}={value}: {where!r} is a list of {len(node)}; {part!r} is no index"
            node = node[int(part)]
        elif node is None:
            options = _group_options(config_dir, where)
            hint = f"; choose one first: {where}={'|'.join(options)}" if options else ""
            return f"{key}={value}: {where!r} is null here, so it has no key {part!r}{hint}"
        else:
            return f"{key}={value}: {where!r} is a value ({node!r}), not a group of keys"
        path.append(part)
    return None


def _unknown_option(override: Any, group: str, config_dir: str) -> str | None:
    """Why a group override chooses an option the group lacks, or None."""
    if override.is_delete() or (not override.is_sweep_override() and override.value() is None):
        return None  # "~group" or "group=null": no option chosen
    choices = (
        list(override.sweep_string_iterator())
        if override.is_sweep_override()
        else [str(override.value())]
    )
    options = _group_options(config_dir, group)
    unknown = [choice for choice in choices if choice not in (*options, "null")]
    if not unknown:
        return None
    return (
        f"{group}={','.join(choices)}: {group!r} has no option {unknown[0]!r}; "
        f"choose one of {'|'.join(options)}"
    )


def _group_options(config_dir: str, group: str) -> list[str]:
    folder = Path(config_dir) / group.replace(".", "/")
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


if __name__ == "__main__":
    main()
