"""The client's failures; ``client.cli`` turns each into an exit code and a message.

(Not being logged in is ``client.config.NotLoggedIn``.) They live here, away from the modules that
raise them, so that a command imports the HTTP stack only if it makes a request.
"""


class UsageError(Exception):
    """A command line that cannot mean anything (exit code 2)."""


class TransferFailed(Exception):
    """rclone could not do it all, or a mount could not be drained (exit code 1)."""


class Refusal(Exception):
    """A request that did not succeed: the answer's status (0: no answer came) and the seconds its
    ``Retry-After`` asked for (None: it named none)."""

    def __init__(self, message: str, status: int, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class ApiError(Refusal):
    """An answer of the kgpu server other than 2xx, with the envelope's ``error_code`` and ``message``
    (exit code 1); status 0 when none came (client/retry.py: which ones are worth another try)."""

    def __init__(self, status: int, error_code: str, message: str, retry_after: float | None = None):
        super().__init__(message, status, retry_after)
        self.error_code, self.message = error_code, message
