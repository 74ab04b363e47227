"""Errors shared across commands.

`CommandError` lives here rather than in `crdtchat.cli` so that it is one class even when the
CLI runs as `python -m crdtchat.cli` (then that module is also `__main__`).
"""


class CommandError(Exception):
    """A failure to report as one line on stderr with exit status 1."""
