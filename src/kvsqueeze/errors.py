"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class KVSqueezeError(Exception):
    """A user-facing error: bad input, a missing package, an unsupported model."""
