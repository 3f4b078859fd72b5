"""The errors a user's setting, input or storage raises, the one-line check that raises the first,
and the list of settings that differ from a recorded run (for resumes that must continue the same
thing).

`SettingError` is a `ValueError` whose message names the setting (or file) and what is allowed;
`WriteError` an `OSError` saying which file could not be written where, and the bytes it needs and
are free; `TrainingDiverged` says at which step training became non-finite and how to go on. The
command-line entry points print each as one line (see `arpg.cli`).
"""

from __future__ import annotations

import errno
from typing import Any

# OSError numbers that mean "the storage cannot take this file" (not a bug of the writer).
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


class SettingError(ValueError):
    """A setting, argument or input file that is not allowed; the message says which and why."""


class MissingPrerequisites(SettingError):
    """Files or packages a command needs and does not find; the message names all of them at once."""


class ProcessFailed(RuntimeError):
    """Another process of a multi-process job failed; the message names it and its error (which
    that process reports in full itself)."""


class WriteError(OSError):
    """A file could not be written because of where it goes (disk full, quota, read-only, no
    permission); `errno` is the cause, the message names the file and the bytes needed and free."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message names the step, the last
    good checkpoint and how to resume from it."""


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
