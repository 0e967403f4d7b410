"""GPU rentals, one job a module:

- ``requests``: what a rental request may ask for (and the exec checks runs share);
- ``placement``: the GPUs on offer, where a rental fits, the queue's order;
- ``lifecycle``: :class:`Rentals`, the service: rent (or queue), launch, pin a key, return;
- ``describe``: the caller's rentals and what the API says of one;
- ``reaper``: billing and ending on a timer, from what each pod is observed doing;
- ``phases``: a rental's phases and what a pod's status means for them.
"""

from gateway.rentals.lifecycle import Rentals
from gateway.rentals.phases import ACTIVE
from gateway.rentals.placement import lock_placement
from gateway.rentals.requests import RentRequest, check_command, check_env, parse_cpu, parse_memory

__all__ = [
    "ACTIVE", "Rentals", "RentRequest", "check_command", "check_env", "lock_placement", "parse_cpu", "parse_memory",
]
