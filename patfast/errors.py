"""The one exception type for mistakes a user can make (bad path, unknown model, bad option...).

The CLI turns it into one line `patfast: error: ...` on stderr and exit status 2.
"""


class UserError(Exception):
    """A mistake the user can fix; its message is shown as is, without a traceback."""


class TrainingStopped(Exception):
    """A run that stopped on purpose, its last checkpoint intact: the CLI prints the message (one line) and exits
    with `status` (3: non-finite losses; 128 + signal number: SIGINT / SIGTERM)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
