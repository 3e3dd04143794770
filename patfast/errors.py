"""The one exception type for mistakes a user can make (bad path, unknown model, bad option...).

The CLI turns it into one line `patfast: error: ...` on stderr and exit status 2.
"""


class UserError(Exception):
    """A mistake the user can fix; its message is shown as is, without a traceback."""
