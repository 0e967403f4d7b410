"""Where rentals go: the GPUs on offer, which are taken, where a rental fits, and the queue's
order. Placements run one at a time across every gateway on the database (:func:`lock_placement`),
so no GPU is booked twice."""

from __future__ import annotations

import threading
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy import text as sql
from sqlalchemy.orm import Session

from gateway import tokens
from gateway.domain_errors import Invalid
from gateway.inventory import GpuClass, free_indices
from gateway.models import Rental
from gateway.pods import PodBackend
from gateway.rentals.phases import ACTIVE, Phase

# Any constant: the PostgreSQL advisory lock that placements take, on every gateway of the database.
PLACEMENT_LOCK = 0x6B677075  # "kgpu"


def lock_placement(session: Session) -> None:
    """One placement at a time across every gateway on this database, until the transaction
    ends: what the free GPUs are is read under it, so no GPU is booked twice. On SQLite the
    user's row lock that follows takes the database's write lock, which does the same."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK})


class Placement:
    def __init__(self, backend: PodBackend, configured: list[GpuClass]):
        self.backend = backend
        self.configured = configured  # the inventory of the settings (KGPU_INVENTORY)
        self.lock = threading.Lock()  # this process's placements, one at a time (with lock_placement)

    @property
    def inventory(self) -> list[GpuClass]:
        """The engine's nodes where the backend reads them (Slurm), else the configured ones."""
        found = self.backend.inventory()  # a workload engine's own nodes (Slurm's sinfo), else None
        return self.configured if found is None else found

    @staticmethod
    def busy(session: Session) -> dict[tuple[str, str], set[int]]:
        """The GPU indices live rentals hold, per (node, model)."""
        busy: dict[tuple[str, str], set[int]] = {}
        for node, model, indices in session.execute(
            select(Rental.node, Rental.gpu_model, Rental.gpu_indices).where(Rental.phase.in_(ACTIVE))
        ):
            busy.setdefault((node, model), set()).update(int(i) for i in indices.split(",") if i)
        return busy

    @staticmethod
    def offered(inventory: list[GpuClass], gpu_model: str | None) -> list[GpuClass]:
        """The classes of ``gpu_model`` ([] when none is offered); None: the first model offered,
        on every node that has it."""
        if gpu_model is None:
            gpu_model = inventory[0].gpu_model if inventory else ""
        return [c for c in inventory if c.gpu_model == gpu_model]

    def classes(self, inventory: list[GpuClass], gpu_model: str | None) -> list[GpuClass]:
        """As :meth:`offered`, refusing a model not offered here."""
        found = self.offered(inventory, gpu_model)
        if not found:
            menu = ", ".join(sorted({c.gpu_model for c in inventory}))
            raise Invalid(f"gpu_model {gpu_model!r} is not offered here (menu: {menu})")
        return found

    def cluster(self, session: Session) -> list[dict]:
        busy = self.busy(session)
        return [
            {
                "node": c.node,
                "gpu_model": c.gpu_model,
                "gpu_busy": len(busy.get((c.node, c.gpu_model), set())),
                "gpu_total": c.count,
                "ready": c.ready,
                "price_per_hour_credits": c.price_per_hour_credits,
            }
            for c in self.inventory
        ]

    def models(self, session: Session) -> list[dict]:
        """The menu per GPU model, over every node that has it: total, free, nodes, price."""
        menu: dict[str, dict] = {}
        for node in self.cluster(session):
            entry = menu.setdefault(node["gpu_model"], {
                "gpu_model": node["gpu_model"], "gpu_total": 0, "gpu_free": 0, "nodes": 0,
                "price_per_hour_credits": node["price_per_hour_credits"],
            })
            entry["gpu_total"] += node["gpu_total"]
            entry["gpu_free"] += node["gpu_total"] - node["gpu_busy"] if node["ready"] else 0
            entry["nodes"] += 1
            entry["price_per_hour_credits"] = min(entry["price_per_hour_credits"], node["price_per_hour_credits"])
        return list(menu.values())

    def fit(self, session: Session, classes: list[GpuClass], count: int) -> tuple[GpuClass, list[int]] | None:
        """The first class with ``count`` free GPUs, and which (None: none has them now)."""
        busy = self.busy(session)
        for gpu_class in classes:
            free = free_indices(gpu_class, busy.get((gpu_class.node, gpu_class.gpu_model), set()))
            if len(free) >= count:
                return gpu_class, free[:count]
        return None

    @staticmethod
    def queued_ahead(session: Session, gpu_model: str, before: datetime | None = None) -> int:
        """How many rentals wait for ``gpu_model`` (only those queued before ``before``, if given)."""
        query = select(func.count()).where(Rental.phase == Phase.QUEUED, Rental.gpu_model == gpu_model)
        if before is not None:
            query = query.where(Rental.created_at < before)
        return session.scalar(query) or 0

    @staticmethod
    def book(session: Session, rental: Rental, gpu_class: GpuClass, indices: list[int]) -> str:
        """Book the GPUs for the rental (under the placement lock) and issue its in-pod token."""
        rental.node = gpu_class.node
        rental.gpu_model = gpu_class.gpu_model
        rental.gpu_indices = ",".join(map(str, indices))
        rental.price_per_hour_credits = gpu_class.price_per_hour_credits
        rental.phase, rental.pending_reason = Phase.PENDING, "starting the pod"
        session.flush()
        _, pod_token = tokens.issue(session, rental.user_id, label=f"in-pod token of {rental.id}", rental_id=rental.id)
        return pod_token
