"""The argument checks every layer of the package shares, so each rule exists once.

A setting is checked where it enters (a constructor, a public function) and raises a
``ValueError`` that names the setting, the bad value and what is allowed.
"""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer: Python's or numpy's, never a ``bool``.

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real number (ints included), never a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, least: int = 1, *, optional: bool = False) -> None:
    """Raises a ``ValueError`` unless ``value`` is an integer of at least ``least``.

    Args:
        name: the setting, as the user spells it.
        value: what was given.
        least: the smallest allowed value.
        optional: ``None`` is allowed too (the setting's "not set").

    Example:
        >>> check_int("score_batches", 0)
        Traceback (most recent call last):
        ...
        ValueError: score_batches=0 is not allowed; it must be an integer of at least 1
    """
    if optional and value is None:
        return
    if not is_int(value) or value < least:
        alternative = " or None" if optional else ""
        raise ValueError(
            f"{name}={value!r} is not allowed; it must be an integer of at least {least}"
            f"{alternative}"
        )
