"""The error a user's setting or input raises, and the one-line check that raises it.

`SettingError` is a `ValueError` whose message names the setting (or file) and what is allowed.
The command-line entry points print it as one line (see `arpg.cli`); library callers catch it as
a `ValueError`.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A setting, argument or input file that is not allowed; the message says which and why."""


def require(ok: bool, message: str) -> None:
    """Raise `SettingError(message)` unless `ok`."""
    if not ok:
        raise SettingError(message)
