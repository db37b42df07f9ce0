"""User-facing errors. The CLI prints ``str(err)`` on one line and exits with ``err.exit_code``."""

from __future__ import annotations


class VidsparseError(Exception):
    """Base class of every error a user can cause. The message says what is wrong and what to do."""

    exit_code = 2


class InputError(VidsparseError):
    """Bad input: a missing, corrupt or unsupported file, a bad budget, a malformed spec."""


class SpecError(InputError):
    """A method spec (``name:k=v,...``) or recipe that cannot be parsed or names an unknown method."""


class UnsupportedError(VidsparseError):
    """A valid request this installation or device cannot serve (missing optional package, no CUDA)."""


class ResourceError(VidsparseError):
    """Out of memory or another resource; the message suggests a smaller budget."""
