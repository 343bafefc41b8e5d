"""qstream's own error type: one sentence a user can act on."""

from __future__ import annotations


class QStreamError(Exception):
    """A problem with the input, the options or the environment.

    The message names the file or tensor concerned and says what to do; the CLI
    prints it without a traceback and exits non-zero.
    """
