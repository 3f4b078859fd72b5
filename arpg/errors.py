"""The error a user's setting or input raises, the one-line check that raises it, and the list of
settings that differ from a recorded run (for resumes that must continue the same thing).

`SettingError` is a `ValueError` whose message names the setting (or file) and what is allowed.
The command-line entry points print it as one line (see `arpg.cli`); library callers catch it as
a `ValueError`.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting, argument or input file that is not allowed; the message says which and why."""


class MissingPrerequisites(SettingError):
    """Files or packages a command needs and does not find; the message names all of them at once."""


def require(ok: bool, message: str) -> None:
    """Raise `SettingError(message)` unless `ok`."""
    if not ok:
        raise SettingError(message)


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """"key: A there, B now" for each (dotted, nested) key of `current` whose value differs from
    `recorded`'s; keys `recorded` lacks are not compared (files written before they existed)."""
    changes = []
    for key, value in current.items():
        if key not in recorded:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            changes += differences(recorded[key], value, f"{prefix}{key}.")
        elif recorded[key] != value:
            changes.append(f"{prefix}{key}: {recorded[key]!r} there, {value!r} now")
    return changes
