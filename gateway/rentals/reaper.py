"""The reaper: on every tick, bill each live rental and end those that must end (their pod
lost, expired, idle, over their disk, out of credits), remove the pods of ended rentals, and
start what the queue can. Each pod is observed (status, live runs, load, disk) on its own,
side by side, outside any transaction.

Idempotent: several gateways on one database may each run it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select

from gateway import billing
from gateway.models import Rental, User
from gateway.pods import PodError, PodStatus
from gateway.rentals.phases import HANDED_OVER, OVER, WITH_POD, Phase, apply_status, pod_lost
from gateway.tokens import as_utc

if TYPE_CHECKING:
    from gateway.rentals.lifecycle import Rentals

log = logging.getLogger("kgpu.rentals")

# The load probe (seed 001): a pod whose processes use this share of a CPU is working.
LOAD_BUSY_CPUS = 0.10
LOAD_WINDOW_S = 5.0  # the shortest time the probe judges over (the reaper ticks every 15 s)


class Reaper:
    def __init__(self, rentals: "Rentals"):
        self.rentals = rentals
        # The observations of pods (status, live runs, disk use), and the pods being observed.
        self._observers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kgpu-observe")
        self._observing: set[str] = set()
        self._observing_lock = threading.Lock()
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # rental: (when, CPU seconds), for the load probe

    def close(self) -> None:
        self._observers.shutdown(wait=False, cancel_futures=True)

    def tick(self) -> list[tuple[str, str]]:
        """Bill every active rental and return those that must end; returns (rental, reason) ended."""
        now = self.rentals.now()
        ending: list[tuple[str, str]] = []
        # What this gateway's pods say, asked outside any transaction: each answer may take a
        # docker exec or an srun, and a transaction held meanwhile would hold up the others.
        with self.rentals.sessions() as session:
            watched = [
                (rental.id, rental.pod_ref, [int(i) for i in rental.gpu_indices.split(",") if i])
                for rental in session.scalars(select(Rental).where(Rental.phase.in_(WITH_POD)))
                if rental.pod_ref and self.rentals.mine(rental)
            ]
        seen = self._observe_all(watched)
        with self._observing_lock:  # forget the load of pods no longer watched
            self._cpu_seen = {r: v for r, v in self._cpu_seen.items() if r in {w[0] for w in watched}}
        with self.rentals.sessions.begin() as session:
            for rental in session.scalars(select(Rental).where(Rental.phase == Phase.TERMINATING)):
                if rental.pending_reason == HANDED_OVER and self.rentals.mine(rental):
                    ending.append((rental.id, rental.end_reason or "returned"))
            for rental in session.scalars(select(Rental).where(Rental.phase.in_(WITH_POD))):
                if not self.rentals.mine(rental):
                    billing.charge(session, rental, now)  # once per minute, whoever bills first
                    continue
                observed = seen.get(rental.id)  # None: its pod started since (seen next tick)
                if observed is not None:
                    if pod_lost(observed.status):
                        ending.append((rental.id, f"pod_lost: {observed.status.reason or observed.status.phase}"))
                        continue
                    apply_status(rental, observed.status)
                    if observed.busy:
                        rental.last_activity_at, rental.last_activity_kind = now, "run"
                    elif observed.loaded:
                        rental.last_activity_at, rental.last_activity_kind = now, "load"
                    if observed.storage is not None and observed.storage > rental.ephemeral_storage_gib << 30:
                        ending.append((rental.id, "ephemeral_storage_exceeded"))
                        continue
                billing.charge(session, rental, now)
                idle = (now - as_utc(rental.last_activity_at)).total_seconds()
                rental.idle_warning = idle >= self.rentals.settings.idle_warning_seconds
                started = as_utc(rental.started_at)
                if started and now >= started + timedelta(hours=rental.duration_hours):
                    ending.append((rental.id, "expired"))
                elif idle >= self.rentals.settings.idle_return_seconds:
                    ending.append((rental.id, "auto_idle"))
            session.flush()
            broke = {
                rental.id
                for rental in session.scalars(
                    select(Rental).join(User, User.id == Rental.user_id).where(
                        Rental.phase.in_(WITH_POD), User.credits <= 0
                    )
                )
            }
        ending += [(rental_id, "out_of_credits") for rental_id in broke if rental_id not in dict(ending)]
        self._remove_orphans()
        self.rentals.start_queued()
        # Each return may wait for its pod's /files flush (up to KGPU_POD_FLUSH_TIMEOUT_SECONDS):
        # side by side, so one slow pod does not hold back the others.
        if ending:
            with ThreadPoolExecutor(max_workers=min(8, len(ending)), thread_name_prefix="kgpu-return") as pool:
                list(pool.map(lambda item: self._finish_logged(item[0], item[1]), ending))
        return ending

    def _finish_logged(self, rental_id: str, reason: str) -> None:
        try:
            self.rentals.finish(rental_id, Phase.ENDED, reason)
        except Exception:  # noqa: BLE001 - the next tick ends it; the others end now
            log.exception("could not end rental %s (%s); the next tick tries again", rental_id, reason)

    def _remove_orphans(self) -> None:
        """Remove the pods this backend still runs for rentals that have ended (a start cut short,
        a return whose removal failed)."""
        try:
            pods = self.rentals.backend.adopt()
        except PodError:
            return
        if not pods:
            return
        with self.rentals.sessions() as session:
            ended = session.scalars(
                select(Rental.id).where(Rental.id.in_(list(pods)), Rental.phase.in_(OVER))
            ).all()
        for rental_id in ended:
            try:
                self.rentals.backend.destroy(pods[rental_id])
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.warning("could not remove the pod of ended rental %s", rental_id, exc_info=True)

    def _observe_all(self, watched: list[tuple[str, str, list[int]]]) -> dict[str, "_Observed"]:
        """Each pod observed on its own, side by side, within the tick's deadline: a pod whose
        answer fails, or has not come by then, is simply not seen this tick (billed as usual, its
        state kept), and is not asked again while its last observation still runs."""
        futures = {}
        for rental_id, ref, gpus in watched:
            with self._observing_lock:
                if ref in self._observing:
                    continue  # still stuck in last tick's observation
                self._observing.add(ref)
            futures[rental_id] = self._observers.submit(self._observe_once, rental_id, ref, gpus)
        done, _ = wait(futures.values(), timeout=self.rentals.settings.reaper_observe_timeout_seconds)
        return {
            rental_id: future.result()
            for rental_id, future in futures.items()
            if future in done and future.result() is not None
        }

    def _observe_once(self, rental_id: str, ref: str, gpus: list[int]) -> "_Observed | None":
        try:
            return self._observe(rental_id, ref, gpus)
        except Exception:  # noqa: BLE001 - one pod's trouble never ends the tick for the others
            log.exception("could not observe the pod of rental %s", rental_id)
            return None
        finally:
            with self._observing_lock:
                self._observing.discard(ref)

    def _observe(self, rental_id: str, ref: str, gpus: list[int]) -> "_Observed":
        status = self.rentals.pod_status(ref)
        if pod_lost(status):
            return _Observed(status, False, None)
        loaded = self._loaded(rental_id, ref) or self._gpus_busy(ref, gpus)
        return _Observed(status, self._has_live_run(ref), self._storage(ref), loaded)

    def _gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        """The load probe's GPU half: one of the rental's GPUs over 5 % busy (where nvidia-smi is)."""
        try:
            return bool(gpus) and self.rentals.backend.gpus_busy(ref, gpus)
        except PodError:
            return False

    def _loaded(self, rental_id: str, ref: str) -> bool:
        """The load probe: whether the pod's processes used a tenth of a CPU or more since its
        last observation (a job started over SSH, or detached, is work as a run is)."""
        try:
            used = self.rentals.backend.cpu_seconds(ref)
        except PodError:
            return False
        if used is None:
            return False
        now = time.monotonic()
        with self._observing_lock:
            before = self._cpu_seen.get(rental_id)
            if before is not None and now - before[0] < LOAD_WINDOW_S:
                return False  # too short to tell a job from a moment's work: measured from the older sample
            self._cpu_seen[rental_id] = (now, used)
        return before is not None and (used - before[1]) / (now - before[0]) >= LOAD_BUSY_CPUS

    def _storage(self, ref: str) -> int | None:
        try:
            return self.rentals.backend.storage_bytes(ref)
        except PodError:
            return None

    def _has_live_run(self, ref: str) -> bool:
        try:
            return any(
                (state := self.rentals.backend.run_state(ref, run_id, 0)) is not None and not state.finished
                for run_id in self.rentals.backend.run_ids(ref)
            )
        except PodError:
            return False


@dataclass(frozen=True)
class _Observed:
    """What the reaper learnt of a pod: its status, whether a run is alive, its disk use."""

    status: PodStatus
    busy: bool
    storage: int | None
    loaded: bool = False  # its processes used a tenth of a CPU since the last observation
