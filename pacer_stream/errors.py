"""User-facing errors.

Every mistake a user can make (a bad plan key, a corrupt shard, an unknown
architecture) raises :class:`PacerError`. The CLI prints it as one line and exits
with status 2; a traceback appears only with ``--debug``. Bugs stay ordinary
exceptions so they are never mistaken for user errors.
"""

from __future__ import annotations


class PacerError(Exception):
    """A problem with the user's input, explained in one line.

    The message names the file, tensor or config key at fault and, where there is
    one, what to do about it.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: newlines in a message would break log parsing.
        super().__init__(" ".join(str(message).split()))
