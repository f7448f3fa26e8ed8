"""User-facing errors.

Every error ggfuse raises on purpose is a GGFuseError: one line, naming the
file it is about, so the CLI can print it and exit without a traceback.
"""

from __future__ import annotations

import os


class GGFuseError(Exception):
    """A one-line, user-facing error: ``str(e) == f"{path}: {message}"``."""

    def __init__(self, path: str | os.PathLike[str] | None, message: str):
        self.path = os.fspath(path) if path is not None else None
        if isinstance(self.path, bytes):
            self.path = os.fsdecode(self.path)
        # Keep it on one line whatever the caller passed in (e.g. a wrapped
        # exception's text), so CLI output and logs stay greppable.
        self.message = escape(" ".join(str(message).split()))
        super().__init__(self.path, self.message)

    def __str__(self) -> str:
        return f"{escape(self.path)}: {self.message}" if self.path is not None else self.message


def escape(s: str) -> str:
    """s with control and other unprintable characters written as escapes (a file name holding a
    newline or a terminal escape stays on one line and harmless)."""
    s = str(s)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in s)


class GGUFFormatError(GGFuseError):
    """The GGUF file is malformed, truncated or hostile."""


class UnsupportedError(GGFuseError):
    """Well-formed input that ggfuse does not handle (architecture, tensor, ggml type)."""


class PlanError(GGFuseError):
    """A plan file is unusable: wrong version, made from a different GGUF, ..."""


class DeviceError(GGFuseError):
    """The device cannot run the plan: CUDA not available, out of memory, ..."""
