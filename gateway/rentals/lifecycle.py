"""GPU rentals: placing and starting them (or queueing them), pinning their SSH key, and
returning them; the service that wires placement, descriptions and the reaper together.

Times come from an injected clock (``now``) so tests move time instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from gateway import billing, users
from gateway.domain_errors import Conflict, InsufficientCredits, NoCapacity, Unavailable
from gateway.inventory import GpuClass
from gateway.models import ApiToken, Rental, utcnow
from gateway.pods import PodBackend, PodError, PodSpec, PodStatus
from gateway.pods.mounts import flush_report_logged
from gateway.principal import Principal
from gateway.rentals import describe as describing
from gateway.rentals.phases import ACTIVE, HANDED_OVER, OVER, WITH_POD, Phase, apply_status, pod_lost
from gateway.rentals.placement import Placement, lock_placement
from gateway.rentals.reaper import Reaper
from gateway.rentals.requests import RentRequest, parse_cpu, parse_memory
from gateway.settings import Settings
from gateway.ssh.keys import PinnedKey

log = logging.getLogger("kgpu.rentals")


def _check_key_is_theirs(session: Session, user_id: int, key: PinnedKey) -> None:
    """A public key is public: one account may not pin a key another account's live rental
    pins, or the other's ``ssh kgpu@`` logins would land in its pod."""
    taken = session.scalar(select(Rental.id).where(
        Rental.ssh_fingerprint == key.fingerprint, Rental.phase.in_(ACTIVE), Rental.user_id != user_id,
    ).limit(1))
    if taken is not None:
        raise Conflict("ssh_key_in_use", "another account's rental pins this SSH key; use a key of your own")


class Rentals:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker,
        backend: PodBackend,
        inventory: list[GpuClass],
        now: Callable[[], datetime] = utcnow,
        tokens_revoked: Callable[[], None] = lambda: None,
    ):
        """``tokens_revoked`` is called when a rental's in-pod token dies (to clear auth caches)."""
        self.settings = settings
        self.tokens_revoked = tokens_revoked
        self.sessions = sessions
        self.backend = backend
        self.now = now
        self.placement = Placement(backend, inventory)
        self.reaper = Reaper(self)
        # Starts queued rentals after a return, off the returning request's thread.
        self._queue_starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-queue")
        # Where the SSH bastion listens ({"ssh_host", "ssh_port", "host_key_fingerprint"}; None: no SSH).
        self.ssh_door: dict | None = None

    def close(self) -> None:
        self._queue_starter.shutdown(wait=False, cancel_futures=True)
        self.reaper.close()

    def tick(self) -> list[tuple[str, str]]:
        """The reaper's tick (gateway/rentals/reaper.py): returns the (rental, reason) it ended."""
        return self.reaper.tick()

    def _start_queued_soon(self) -> None:
        try:
            self._queue_starter.submit(self._start_queued_logged)
        except RuntimeError:
            pass  # shutting down

    def _start_queued_logged(self) -> None:
        try:
            self.start_queued()
        except Exception:  # noqa: BLE001 - the reaper's next tick tries again
            log.exception("could not start queued rentals")

    # ------------------------------------------------------------------ reading

    @property
    def inventory(self) -> list[GpuClass]:
        return self.placement.inventory

    def cluster(self, session: Session) -> list[dict]:
        return self.placement.cluster(session)

    def models(self, session: Session) -> list[dict]:
        return self.placement.models(session)

    def get(self, session: Session, principal: Principal, rental_id: str) -> Rental:
        return describing.get(session, principal, rental_id)

    def active_of(self, session: Session, principal: Principal) -> list[Rental]:
        return describing.active_of(session, principal)

    def describe(self, session: Session, rental: Rental) -> dict:
        return describing.describe(session, rental, self.now(), self.ssh_door)

    # ------------------------------------------------------------------ renting

    def check_pods_available(self) -> None:
        """Refuse (Unavailable) when this server's backend cannot isolate pods here."""
        refusal = self.backend.refusal
        if refusal:
            raise Unavailable("pods_unavailable", refusal)

    def rent(self, principal: Principal, request: RentRequest, api_base: str, ssh_key: PinnedKey | None = None) -> Rental:
        """Place and start a rental; with ``request.queue``, queue it when nothing fits now.
        ``ssh_key``: the key SSH logins into it use (gateway/ssh)."""
        # Read before the placement lock: on Slurm it is an sinfo, too slow to hold the lock for.
        classes = self.placement.classes(self.inventory, request.gpu_model)
        with self.placement.lock, self.sessions.begin() as session:
            lock_placement(session)
            user = users.get_locked(session, principal.user_id)
            if ssh_key is not None:
                _check_key_is_theirs(session, user.id, ssh_key)
            count = request.gpu_count if request.gpu_count is not None else (1 if classes[0].count else 0)
            mine = session.scalars(
                select(Rental.gpu_count).where(Rental.user_id == user.id, Rental.phase.in_(ACTIVE))
            ).all()
            if sum(mine) + count > self.settings.max_gpus_per_user:
                raise Conflict(
                    "gpu_cap_reached", f"you hold {sum(mine)} GPUs; the cap is {self.settings.max_gpus_per_user}"
                )
            if not any(c.count >= count for c in classes):
                raise NoCapacity(f"no node here has {count} {classes[0].gpu_model} GPUs")
            # Nobody jumps the queue: while rentals wait for this model, a new one waits behind
            # them. One that takes no GPU waits for none.
            queued = self.placement.queued_ahead(session, classes[0].gpu_model) if count else 0
            placement = None if queued else self.placement.fit(session, classes, count)
            if placement is None and not request.queue:
                raise NoCapacity(f"no node has {count} free {classes[0].gpu_model} GPUs right now"
                               + (f" ({queued} rentals are queued for them)" if queued else ""))
            gpu_class = placement[0] if placement else min(classes, key=lambda c: c.price_per_hour_credits)
            hourly = max(count, 1) * gpu_class.price_per_hour_credits
            if user.credits < hourly:
                raise InsufficientCredits(f"one hour costs {hourly} credits; your balance is {user.credits}")
            now = self.now()
            rental = Rental(
                id="gpu-" + secrets.token_hex(6),
                user_id=user.id,
                name=request.name,
                image=request.image or self.settings.default_image,
                node="",
                gpu_model=gpu_class.gpu_model,
                gpu_count=count,
                gpu_indices="",
                cpu=parse_cpu(request.cpu),
                memory_bytes=parse_memory(request.memory),
                ephemeral_storage_gib=request.ephemeral_storage_gib,
                duration_hours=request.duration_hours,
                # Everything the pod's environment holds but its token (issued when it starts).
                env_json=json.dumps({**(request.env or {}), "KGPU_API_BASE": api_base}),
                backend=self.backend.name,
                phase=Phase.QUEUED,
                ready=False,
                pending_reason=f"waiting for {count} free {gpu_class.gpu_model} GPUs",
                price_per_hour_credits=gpu_class.price_per_hour_credits,
                created_at=now,
                last_activity_at=now,
                last_activity_kind="rent",
                ssh_pubkey=ssh_key.line if ssh_key else None,
                ssh_fingerprint=ssh_key.fingerprint if ssh_key else None,
            )
            session.add(rental)
            session.flush()
            if placement is None:
                return rental
            pod_token = self.placement.book(session, rental, *placement)
        return self._launch(rental.id, pod_token)

    def start_queued(self) -> list[str]:
        """Start the queued rentals that fit now, first come first served per GPU model (one
        that does not fit holds back the later ones of its model). Returns those started."""
        started: list[tuple[str, str]] = []
        inventory = self.inventory  # once, before the lock (an sinfo on Slurm)
        with self.placement.lock, self.sessions.begin() as session:
            lock_placement(session)
            blocked: set[str] = set()
            for rental in session.scalars(select(Rental).where(Rental.phase == Phase.QUEUED).order_by(Rental.created_at)):
                if rental.gpu_model in blocked:
                    continue
                user = users.get_locked(session, rental.user_id)
                classes = self.placement.offered(inventory, rental.gpu_model)  # []: its nodes have gone
                placement = self.placement.fit(session, classes, rental.gpu_count) if classes else None
                if placement is None:
                    blocked.add(rental.gpu_model)
                    continue
                if user.credits < max(rental.gpu_count, 1) * placement[0].price_per_hour_credits:
                    rental.phase, rental.ended_at = Phase.ENDED, self.now()
                    rental.end_reason, rental.pending_reason = "insufficient_credits", None
                    continue
                started.append((rental.id, self.placement.book(session, rental, *placement)))
        for rental_id, pod_token in started:
            self._launch(rental_id, pod_token)
        return [rental_id for rental_id, _ in started]

    def _launch(self, rental_id: str, pod_token: str) -> Rental:
        """Start the pod of a placed rental; billing starts with it."""
        with self.sessions() as session:
            rental = session.get(Rental, rental_id)
            session.expunge(rental)
        spec = PodSpec(
            rental_id=rental.id,
            image=rental.image,
            gpu_indices=[int(i) for i in rental.gpu_indices.split(",") if i],
            cpu=rental.cpu,
            memory_bytes=rental.memory_bytes,
            ephemeral_storage_gib=rental.ephemeral_storage_gib,
            node=rental.node,
            duration_hours=rental.duration_hours,
            env={
                **json.loads(rental.env_json),
                "KGPU_GPU_ID": rental.id,
                "KGPU_RENT_ID": rental.id,
                "KGPU_API_TOKEN": pod_token,
            },
        )
        try:
            instance = self.backend.instance
            ref = self.backend.start(spec)
        except PodError as exc:
            return self.finish(rental.id, Phase.FAILED, f"start_failed: {exc}")
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental.id)
            rental.pod_ref = ref
            rental.pod_instance = instance
            apply_status(rental, self.backend.status(ref))
            rental.started_at = self.now()
            billing.charge(session, rental, self.now())
            return rental

    def pin_key(self, principal: Principal, rental_id: str, key: PinnedKey) -> Rental:
        """Pin a new SSH key on a live rental: the old one stops at once (the bastion ends its
        sessions within a second). The route takes the account's token only: a pod cannot lock its owner out."""
        with self.sessions.begin() as session:
            lock_placement(session)  # keys are pinned one at a time, as GPUs are placed
            rental = self.get(session, principal, rental_id)
            if rental.phase not in ACTIVE:
                raise Conflict("gpu_not_live", f"rental {rental_id} has ended ({rental.phase})")
            _check_key_is_theirs(session, rental.user_id, key)
            rental.ssh_pubkey, rental.ssh_fingerprint = key.line, key.fingerprint
            return rental

    @staticmethod
    def starting(rental: Rental) -> bool:
        """Live but not ready yet: its pod's state is worth asking for now (``refresh``)."""
        return rental.phase in WITH_POD and not rental.ready

    def mine(self, rental: Rental) -> bool:
        """Whether this gateway's backend runs the rental's pod (replicas share the database, not
        their pods: one never ends, or reads as lost, a pod it cannot see)."""
        if rental.pod_instance is None:
            return True  # started before pods were told apart
        try:
            return rental.pod_instance == self.backend.instance
        except PodError:
            return False  # the backend cannot say who it is: act on nothing

    def refresh(self, rental_id: str) -> None:
        """Ask the backend how a starting pod is doing now, rather than at the reaper's next tick."""
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental_id)
            if self.starting(rental) and rental.pod_ref and self.mine(rental):
                status = self.pod_status(rental.pod_ref)
                if not pod_lost(status):  # the reaper ends lost pods
                    apply_status(rental, status)

    def touch(self, rental_id: str) -> None:
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental_id)
            rental.last_activity_at = self.now()
            rental.last_activity_kind = "run"
            rental.idle_warning = False

    # ------------------------------------------------------------------ ending

    def end(self, principal: Principal, rental_id: str, reason: str = "returned") -> Rental:
        with self.sessions() as session:
            rental = self.get(session, principal, rental_id)
        if rental.phase not in ACTIVE:
            return rental
        return self.finish(rental.id, Phase.ENDED, reason)

    def finish(self, rental_id: str, phase: Phase, reason: str) -> Rental:
        """End a rental: its pod removed (its /files flushed first), its in-pod token revoked, its
        last minutes billed; then the queue moves."""
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental_id)
            if rental.phase in OVER:
                return rental
            rental.phase = Phase.TERMINATING
            rental.ready = False
            if rental.pod_ref and not self.mine(rental):
                # Another gateway runs the pod: it flushes and removes it at its next reaper tick,
                # then ends the rental (its token must live until the flush is done).
                rental.pending_reason = HANDED_OVER
                rental.end_reason = reason
                return rental
            rental.pending_reason = None
            ref = rental.pod_ref
        lost = None
        if ref:
            try:
                lost = self.backend.destroy(ref)
            except Exception:  # noqa: BLE001 - whatever broke, the token must die and the rental end
                log.warning("could not destroy pod %s of %s", ref, rental_id, exc_info=True)
        # Only now: the pod's /files mount uploads its last writes with the in-pod token.
        with self.sessions.begin() as session:
            for token in session.scalars(select(ApiToken).where(ApiToken.rental_id == rental_id)):
                token.revoked_at = token.revoked_at or utcnow()
        self.tokens_revoked()
        if lost:
            log.warning("rental %s ended (%s) but not every write to /files was uploaded: %s", rental_id, reason,
                        flush_report_logged(lost))
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental_id)
            rental.flush_error = lost
            rental.ended_at = self.now()
            billing.charge(session, rental, rental.ended_at)
            rental.phase = phase
            rental.end_reason = reason
            rental.pending_reason = None
        self._start_queued_soon()  # its GPUs are free: the queue moves
        return rental

    def pod_status(self, ref: str) -> PodStatus:
        """The pod's status; one the backend cannot tell is Pending, with why."""
        try:
            return self.backend.status(ref)
        except PodError as exc:
            return PodStatus("Pending", False, f"pod status unknown: {exc}")
