"""The error a user's setting or input raises, the one-line check that raises it, and the list of
settings that differ from a recorded run (for resumes that must continue the same thing).

`SettingError` is a `ValueError` whose message names the setting (or file) and what is allowed.
The command-line entry points print it as one line (see `arpg.cli`); library callers catch it as
a `ValueError`.
"""

from __future__ import annotations

from typing import Any


class SettingError(ValueError):
    """A setting, argument or input file that is not allowed; the message says which and why."""


class MissingPrerequisites(SettingError):
    """Files or packages a command needs and does not find; the message names all of them at once."""


class ProcessFailed(RuntimeError):
    """Another process of a multi-process job failed; the message names it and its error (which
    that process reports in full itself)."""


def require(ok: bool, message: str) -> None:
    """Raise `SettingError(message)` unless `ok`."""
    if not ok:
        raise SettingError(message)


def differences(recorded: dict, current: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded value, current value)} for each (nested) key of `current` whose value
    differs from `recorded`'s; keys `recorded` lacks are not compared (files written before they
    existed)."""
    changes = {}
    for key, value in current.items():
        if key not in recorded:
            continue
        if isinstance(value, dict) and isinstance(recorded[key], dict):
            changes.update(differences(recorded[key], value, f"{prefix}{key}."))
        elif recorded[key] != value:
            changes[prefix + key] = (recorded[key], value)
    return changes


def describe_differences(changes: dict[str, tuple[Any, Any]]) -> str:
    """"seed: 0 there, 1 now; data.count: ..." for `differences`' result."""
    return "; ".join(f"{key}: {was!r} there, {now!r} now" for key, (was, now) in changes.items())
