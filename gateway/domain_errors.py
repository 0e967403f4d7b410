"""What the domain refuses, in its own words.

Each error carries the envelope's ``error_code`` and ``message`` (SPEC decision 9); which HTTP
status it answers with is decided in one place, the exception handler in ``gateway/errors.py``.
The domain (rentals, orgs, users, runs, the principal) raises these and never an HTTP status.
"""

from __future__ import annotations


class DomainError(Exception):
    def __init__(self, error_code: str, message: str):
        super().__init__(message)
        self.error_code = error_code
        self.message = message


class _OneCode:
    """Mixed into a kind of error whose ``error_code`` never varies (its ``code``): it takes only the message."""

    code: str

    def __init__(self, message: str):
        super().__init__(self.code, message)


class NotFound(DomainError):
    """No such thing, or none the caller may see."""


class Conflict(DomainError):
    """The thing's present state forbids it (a name taken, a rental ended, a cap reached)."""


class NoCapacity(_OneCode, Conflict):
    """No node has the GPUs asked for (now, or at all)."""

    code = "no_capacity"


class Gone(DomainError):
    """It existed and has ended."""


class Forbidden(DomainError):
    """The caller may not do this."""


class TooLarge(DomainError):
    """More bytes than a cap or a quota allows."""


class Invalid(_OneCode, DomainError):
    """A value the request's shape allowed but the domain refuses (a model not offered, a balance out of bounds)."""

    code = "validation_error"


class InsufficientCredits(_OneCode, DomainError):
    """The caller's balance does not cover what they ask for."""

    code = "insufficient_credits"


class Unavailable(DomainError):
    """A part the operation needs cannot serve it here (pods that cannot be isolated)."""


class BadInput(DomainError):
    """A value the domain refuses as unsafe or malformed where it stands (a pod file's path that
    leaves the allowed folders, or runs through a symlink)."""


class RangeNotSatisfiable(DomainError):
    """A span that starts past what there is; ``size``: what there is now (a resume starts there)."""

    def __init__(self, message: str, size: int):
        super().__init__("range_not_satisfiable", message)
        self.size = size


class NoSpace(DomainError):
    """The place being written has no room left (a pod's disk)."""


class Busy(DomainError):
    """The caller already has as many of these going at once as one caller may (pod-file
    transfers): refused at once, to try again once one of theirs ends (Retry-After)."""
