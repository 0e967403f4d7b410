"""Which failed requests the client sends again, and how long it waits before each: one rule for
every transfer it makes (the drive's uploads, client/uploads.py; pod files, client/pod_files.py).

Sent again: a request that got no answer (the network, a cut: status 0), one that timed out
(408), one the server is too busy for now (429: too many transfers of yours at once) and one a
server could not serve for now (500, 502-504: a restart, a pod or store out of reach). Any other
answer is final: a 404 or a 400 stays what it is. Between tries the client waits what the answer's
``Retry-After`` asks, else a backoff from half a second doubling; each wait is stretched by up to
a quarter at random, so that transfers refused together do not all come back at the same moment,
and none is longer than :data:`LONGEST_WAIT_S`. A request that gets no answer at all is sent at
most :data:`UNANSWERED_TRIES` times however many tries the caller allows: a busy server says so
and is waited for, a server that is not there (a wrong address, a network down) is said to be
within seconds, not after minutes of waiting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

from client.errors import Refusal

T = TypeVar("T")
SENT_AGAIN = frozenset({0, 408, 429, 500, 502, 503, 504})
LONGEST_WAIT_S = 30.0
FIRST_BACKOFF_S = 0.5
UNANSWERED_TRIES = 4  # the most times a request that gets no answer (status 0) is sent


def retry_after(header: str | None) -> float | None:
    """A ``Retry-After`` header's seconds; None for none, or for its date form (backoff then)."""
    try:
        seconds = float(header) if header else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def worth_again(exc: BaseException) -> bool:
    return isinstance(exc, Refusal) and exc.status in SENT_AGAIN


def wait_before(failures: int, exc: Refusal) -> float:
    """Seconds to wait after the ``failures``-th failure in a row, ``exc``."""
    asked = exc.retry_after
    wait = asked if asked is not None else FIRST_BACKOFF_S * 2 ** min(failures - 1, 16)
    return min(wait * random.uniform(1.0, 1.25), LONGEST_WAIT_S)


def attempts(
    action: Callable[[], T], *, tries: int, most_waited_s: float = math.inf,
    give_up: Callable[[], bool] = lambda: False,
    on_wait: Callable[[Refusal, float], None] | None = None,
) -> T:
    """``action()`` until it succeeds or fails for good, raising its last failure then: one not
    worth another try, the ``tries``-th, one whose wait would take all the waits past
    ``most_waited_s``, or any once ``give_up()`` is true. ``on_wait`` hears of each wait first."""
    waited = 0.0
    unanswered = 0
    for failures in range(1, tries + 1):
        try:
            return action()
        except Refusal as exc:
            unanswered += exc.status == 0
            if failures == tries or not worth_again(exc) or unanswered == UNANSWERED_TRIES or give_up():
                raise
            wait = wait_before(failures, exc)
            if waited + wait > most_waited_s:
                raise
            if on_wait is not None:
                on_wait(exc, wait)
            time.sleep(wait)
            waited += wait
    raise ValueError("tries must be 1 or more")
