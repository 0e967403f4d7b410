"""A rental's phases, the groups the code asks about, and what a pod's status means for its
rental. The values are what the database stores and the API answers."""

from __future__ import annotations

import json
from enum import StrEnum

from gateway.models import Rental
from gateway.pods import PodStatus


class Phase(StrEnum):
    QUEUED = "Queued"  # waiting for GPUs: no pod yet, not billed; it counts against the user's GPU cap
    PENDING = "Pending"  # its GPUs booked, its pod starting
    RUNNING = "Running"
    TERMINATING = "Terminating"  # being returned (or handed over to the gateway that runs its pod)
    ENDED = "Ended"
    FAILED = "Failed"  # its pod could not start


ACTIVE = (Phase.QUEUED, Phase.PENDING, Phase.RUNNING, Phase.TERMINATING)
WITH_POD = (Phase.PENDING, Phase.RUNNING)  # a pod exists: it is watched, billed, may take runs
OVER = (Phase.ENDED, Phase.FAILED)

# A return asked of a gateway whose backend does not run the pod: the one that does finishes it.
HANDED_OVER = "returning through the gateway that runs its pod"


def pod_lost(status: PodStatus) -> bool:
    """Whether a pod's status says it is gone for good (the reaper ends its rental)."""
    return status.phase in ("Gone", "Failed")


def apply_status(rental: Rental, status: PodStatus) -> None:
    """A live pod's status onto its rental."""
    rental.phase = Phase.RUNNING if status.phase == "Running" else Phase.PENDING
    rental.ready = status.ready
    rental.pending_reason = None if status.ready else status.reason
    if status.mounts is not None:
        rental.mounts_json = json.dumps(status.mounts)
