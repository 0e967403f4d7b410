"""A rental's phases, the groups the code asks about, and the phase a live pod's status puts
its rental in."""

from __future__ import annotations

import json

from gateway.models import Rental
from gateway.pods import PodStatus

# Queued: waiting for GPUs (no pod yet, not billed); it still counts against the user's GPU cap.
ACTIVE = ("Queued", "Pending", "Running", "Terminating")

# A return asked of a gateway whose backend does not run the pod: the one that does finishes it.
HANDED_OVER = "returning through the gateway that runs its pod"


def apply_status(rental: Rental, status: PodStatus) -> None:
    """A live pod's status onto its rental."""
    rental.phase = "Running" if status.phase == "Running" else "Pending"
    rental.ready = status.ready
    rental.pending_reason = None if status.ready else status.reason
    if status.mounts is not None:
        rental.mounts_json = json.dumps(status.mounts)
