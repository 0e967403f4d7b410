"""The client's own failures; ``client.cli`` turns each into an exit code and a message.

(The server's refusals are ``client.api.ApiError``; not being logged in is
``client.config.NotLoggedIn``.)
"""


class UsageError(Exception):
    """A command line that cannot mean anything (exit code 2)."""


class TransferFailed(Exception):
    """rclone could not do it all, or a mount could not be drained (exit code 1)."""
