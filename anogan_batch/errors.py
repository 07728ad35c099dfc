"""Exceptions for user errors.

Everything the user can fix (a bad flag, a bad file, a bad column) raises a subclass of
`AnoganError`. The CLI maps that root to exit code 2 with the message only; anything else is a
bug and exits 1 with a traceback. Keep messages to one paragraph that names the offending file,
column, field or value.
"""

from __future__ import annotations

from typing import Any


class AnoganError(Exception):
    """Root of all user-facing errors (exit code 2)."""


class MachineError(RuntimeError):
    """A fault of the machine, not of the input: a GPU torch cannot use, a batch that failed
    on several devices. Exit 1 with the message (no traceback); a rerun resumes the job."""


class ConfigError(AnoganError):
    """A configuration field has a bad value."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        self.field, self.value, self.why = field, value, why
        super().__init__(f"invalid value for '{field}': {value!r} ({why})")


class InputError(AnoganError):
    """An input table, file or row cannot be used."""


class ModelError(AnoganError):
    """A model directory is missing, corrupt, or does not fit the data."""


# Credentials a message could carry by accident (an SDK error quoting a request, a URI with
# user info); they never reach a log, job.json or the terminal.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def redact(text: str) -> str:
    """`text` with the value of every credential variable set in this process replaced."""
    import os

    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:  # a one-letter "secret" would blank unrelated text
            text = text.replace(value, f"<{name}>")
    return text


def describe_machine_failure(exc: BaseException) -> str | None:
    """The message of a MachineError anywhere in `exc`'s chain, Ray's wrappers included (an
    actor whose constructor raised reaches the driver as text only), or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        marker = f"{MachineError.__name__}: "
        for line in str(e).splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
        if isinstance(e, MachineError):
            return str(e)
        stack += [e.__cause__, e.__context__]
    return None
