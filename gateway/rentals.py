"""GPU rentals: placing, starting, describing and ending pods, and the reaper that
bills them and returns idle, expired and unpaid ones.

Times come from an injected clock (``now``) so tests move time instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Callable

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func, select
from sqlalchemy import text as sql
from sqlalchemy.orm import Session, sessionmaker

from gateway import billing, tokens, users
from gateway.bounds import PlainText
from gateway.domain_errors import Conflict, InsufficientCredits, Invalid, NoCapacity, NotFound, Unavailable
from gateway.inventory import GpuClass, engine_inventory, free_indices
from gateway.models import ApiToken, Rental, User, utcnow
from gateway.pods import PodBackend, PodError, PodSpec, PodStatus
from gateway.principal import Principal
from gateway.settings import Settings
from gateway.ssh.keys import PinnedKey
from gateway.tokens import as_utc

log = logging.getLogger("kgpu.rentals")

# The load probe (seed 001): a pod whose processes use this share of a CPU is working.
LOAD_BUSY_CPUS = 0.10
LOAD_WINDOW_S = 5.0  # the shortest time the probe judges over (the reaper ticks every 15 s)
# Queued: waiting for GPUs (no pod yet, not billed); it still counts against the user's GPU cap.
ACTIVE = ("Queued", "Pending", "Running", "Terminating")
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,28}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RENTAL_ID = re.compile(r"^gpu-[0-9a-f]{1,40}$")
_IMAGE = re.compile(r"^[\x21-\x7e]+$")  # a docker reference: printable ASCII, no spaces
# What exec(2) can carry: Linux refuses one argument or NAME=value over 128 KiB, and all of
# argv and the environment together over about 2 MiB (E2BIG). A pod's env, and a run's
# command and env, each stay well inside that, with room for the image's own environment.
MAX_EXEC_STRING_BYTES = 64 << 10
MAX_EXEC_TOTAL_BYTES = 256 << 10
MAX_MEMORY_BYTES = 128 << 30
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


def parse_memory(value: str) -> int:
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError("memory must be a quantity such as 16Gi or 512Mi")
    amount = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(amount) or amount > MAX_MEMORY_BYTES:
        raise ValueError("memory must be more than 0 and at most 128Gi")
    return int(amount)


def parse_cpu(value: str | float) -> float:
    text = str(value).strip()
    cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return cores


def _exec_bytes(what: str, text: str) -> int:
    """Bytes one string takes in exec(2)'s argv or environment; what exec cannot carry is refused."""
    if "\x00" in text:
        raise ValueError(f"{what} holds a NUL character, which no process can be given")
    try:
        size = len(text.encode("utf-8")) + 1
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (a lone surrogate)") from None
    if size > MAX_EXEC_STRING_BYTES:
        raise ValueError(f"{what} is {size} bytes; one argument or variable is at most {MAX_EXEC_STRING_BYTES}")
    return size


def _check_total(what: str, total: int) -> None:
    if total > MAX_EXEC_TOTAL_BYTES:
        raise ValueError(f"{what} is {total} bytes in all; at most {MAX_EXEC_TOTAL_BYTES}")


def check_env(value: dict[str, str] | None) -> dict[str, str] | None:
    """Extra environment of a pod or a run: valid names, none of the variables kgpu sets, and
    values exec can carry (no NUL, bounded sizes)."""
    total = 0
    for name, text in (value or {}).items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"env name {name[:100]!r} is not a valid variable name")
        if name.startswith("KGPU_") or name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
            raise ValueError(f"env {name} is set by kgpu and cannot be overridden")
        total += _exec_bytes(f"env {name}", f"{name}={text}")
    _check_total("env", total)
    return value


def check_command(value: list[str]) -> list[str]:
    """A run's argv: strings exec can carry (no NUL, bounded sizes)."""
    _check_total("command", sum(_exec_bytes(f"command[{n}]", arg) for n, arg in enumerate(value)))
    return value


class RentRequest(BaseModel):
    name: str = Field(default="rent", max_length=30)
    image: str | None = Field(default=None, max_length=300, pattern=_IMAGE.pattern)
    gpu_model: PlainText | None = Field(default=None, max_length=100)
    gpu_count: int | None = Field(default=None, ge=0, le=4)
    cpu: Annotated[str, Field(max_length=20)] | float = "2"
    memory: str = Field(default="16Gi", max_length=20)
    ephemeral_storage_gib: int = Field(default=100, ge=1, le=100)
    duration_hours: int = Field(default=12, ge=1, le=168)
    env: dict[str, str] | None = None
    ssh_pubkey: str | None = Field(
        default=None, max_length=16384,
        description="your OpenSSH public key (ed25519, ecdsa, RSA >= 2048) for SSH into the pod; omitted: one is minted "
                    "and its private half returned once (docs/ssh.md)",
    )
    queue: bool = Field(default=False, description="when no GPU is free, wait in the queue (phase Queued) rather than 409")

    @field_validator("name")
    @classmethod
    def _dns_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("name must be DNS-safe: lowercase letters, digits and inner '-', at most 30")
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value):
        try:
            cores = parse_cpu(value)
        except ValueError:
            raise ValueError("cpu must be a number of cores such as 2 or 500m") from None
        if not 0 < cores <= 16:
            raise ValueError("cpu must be more than 0 and at most 16 cores")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if not 0 < parse_memory(value) <= 128 << 30:
            raise ValueError("memory must be more than 0 and at most 128Gi")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value):
        return check_env(value)


def _check_key_is_theirs(session: Session, user_id: int, key: PinnedKey) -> None:
    """A public key is public: one account may not pin a key another account's live rental
    pins, or the other's ``ssh kgpu@`` logins would land in its pod."""
    taken = session.scalar(select(Rental.id).where(
        Rental.ssh_fingerprint == key.fingerprint, Rental.phase.in_(ACTIVE), Rental.user_id != user_id,
    ).limit(1))
    if taken is not None:
        raise Conflict("ssh_key_in_use", "another account's rental pins this SSH key; use a key of your own")


# A return asked of a gateway whose backend does not run the pod: the one that does finishes it.
HANDED_OVER = "returning through the gateway that runs its pod"

# Any constant: the PostgreSQL advisory lock that placements take, on every gateway of the database.
PLACEMENT_LOCK = 0x6B677075  # "kgpu"


def lock_placement(session: Session) -> None:
    """One placement at a time across every gateway on this database, until the transaction
    ends: what the free GPUs are is read under it, so no GPU is booked twice. On SQLite the
    user's row lock that follows takes the database's write lock, which does the same."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sql("SELECT pg_advisory_xact_lock(:key)"), {"key": PLACEMENT_LOCK})


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
        self._inventory = inventory
        self.now = now
        self._placement_lock = threading.Lock()
        # Starts queued rentals after a return, off the returning request's thread.
        self._queue_starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kgpu-queue")
        # The reaper's observations of pods (status, live runs, disk use), and the pods being observed.
        self._observers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kgpu-observe")
        self._observing: set[str] = set()
        self._observing_lock = threading.Lock()
        self._cpu_seen: dict[str, tuple[float, float]] = {}  # rental: (when, CPU seconds), for the load probe
        # Where the SSH bastion listens ({"ssh_host", "ssh_port", "host_key_fingerprint"}; None: no SSH).
        self.ssh_door: dict | None = None

    def close(self) -> None:
        self._queue_starter.shutdown(wait=False, cancel_futures=True)
        self._observers.shutdown(wait=False, cancel_futures=True)

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

    # ------------------------------------------------------------------ placing

    @property
    def inventory(self) -> list[GpuClass]:
        """The engine's nodes where the backend reads them (Slurm), else the configured ones."""
        found = engine_inventory(self.backend)
        return self._inventory if found is None else found

    def _busy(self, session: Session) -> dict[tuple[str, str], set[int]]:
        busy: dict[tuple[str, str], set[int]] = {}
        for node, model, indices in session.execute(
            select(Rental.node, Rental.gpu_model, Rental.gpu_indices).where(Rental.phase.in_(ACTIVE))
        ):
            busy.setdefault((node, model), set()).update(int(i) for i in indices.split(",") if i)
        return busy

    @staticmethod
    def _offered(inventory: list[GpuClass], gpu_model: str | None) -> list[GpuClass]:
        """The classes of ``gpu_model`` ([] when none is offered); None: the first model offered,
        on every node that has it."""
        if gpu_model is None:
            gpu_model = inventory[0].gpu_model if inventory else ""
        return [c for c in inventory if c.gpu_model == gpu_model]

    def _classes(self, inventory: list[GpuClass], gpu_model: str | None) -> list[GpuClass]:
        found = self._offered(inventory, gpu_model)
        if not found:
            menu = ", ".join(sorted({c.gpu_model for c in inventory}))
            raise Invalid(f"gpu_model {gpu_model!r} is not offered here (menu: {menu})")
        return found

    def cluster(self, session: Session) -> list[dict]:
        busy = self._busy(session)
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

    def check_pods_available(self) -> None:
        """Refuse (Unavailable) when this server's backend cannot isolate pods here."""
        refusal = getattr(self.backend, "refusal", None)
        if refusal:
            raise Unavailable("pods_unavailable", refusal)

    def rent(self, principal: Principal, request: RentRequest, api_base: str, ssh_key: PinnedKey | None = None) -> Rental:
        """Place and start a rental; with ``request.queue``, queue it when nothing fits now.
        ``ssh_key``: the key SSH logins into it use (gateway/ssh)."""
        # Read before the placement lock: on Slurm it is an sinfo, too slow to hold the lock for.
        classes = self._classes(self.inventory, request.gpu_model)
        with self._placement_lock, self.sessions.begin() as session:
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
            queued = self._queued_ahead(session, classes[0].gpu_model) if count else 0
            placement = None if queued else self._placement(session, classes, count)
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
                phase="Queued",
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
            pod_token = self._place(session, rental, *placement)
        return self._launch(rental.id, pod_token)

    def start_queued(self) -> list[str]:
        """Start the queued rentals that fit now, first come first served per GPU model (one
        that does not fit holds back the later ones of its model). Returns those started."""
        started: list[tuple[str, str]] = []
        inventory = self.inventory  # once, before the lock (an sinfo on Slurm)
        with self._placement_lock, self.sessions.begin() as session:
            lock_placement(session)
            blocked: set[str] = set()
            for rental in session.scalars(select(Rental).where(Rental.phase == "Queued").order_by(Rental.created_at)):
                if rental.gpu_model in blocked:
                    continue
                user = users.get_locked(session, rental.user_id)
                classes = self._offered(inventory, rental.gpu_model)  # []: its nodes have gone
                placement = self._placement(session, classes, rental.gpu_count) if classes else None
                if placement is None:
                    blocked.add(rental.gpu_model)
                    continue
                if user.credits < max(rental.gpu_count, 1) * placement[0].price_per_hour_credits:
                    rental.phase, rental.ended_at = "Ended", self.now()
                    rental.end_reason, rental.pending_reason = "insufficient_credits", None
                    continue
                started.append((rental.id, self._place(session, rental, *placement)))
        for rental_id, pod_token in started:
            self._launch(rental_id, pod_token)
        return [rental_id for rental_id, _ in started]

    def _placement(self, session: Session, classes: list[GpuClass], count: int) -> tuple[GpuClass, list[int]] | None:
        busy = self._busy(session)
        for gpu_class in classes:
            free = free_indices(gpu_class, busy.get((gpu_class.node, gpu_class.gpu_model), set()))
            if len(free) >= count:
                return gpu_class, free[:count]
        return None

    @staticmethod
    def _queued_ahead(session: Session, gpu_model: str, before: datetime | None = None) -> int:
        query = select(func.count()).where(Rental.phase == "Queued", Rental.gpu_model == gpu_model)
        if before is not None:
            query = query.where(Rental.created_at < before)
        return session.scalar(query) or 0

    def _place(self, session: Session, rental: Rental, gpu_class: GpuClass, indices: list[int]) -> str:
        """Book the GPUs for the rental (under the placement lock) and issue its in-pod token."""
        rental.node = gpu_class.node
        rental.gpu_model = gpu_class.gpu_model
        rental.gpu_indices = ",".join(map(str, indices))
        rental.price_per_hour_credits = gpu_class.price_per_hour_credits
        rental.phase, rental.pending_reason = "Pending", "starting the pod"
        session.flush()
        _, pod_token = tokens.issue(session, rental.user_id, label=f"in-pod token of {rental.id}", rental_id=rental.id)
        return pod_token

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
            return self._finish(rental.id, "Failed", f"start_failed: {exc}")
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental.id)
            rental.pod_ref = ref
            rental.pod_instance = instance
            _apply(rental, self.backend.status(ref))
            rental.started_at = self.now()
            billing.charge(session, rental, self.now())
            return rental

    # ------------------------------------------------------------------ reading

    def get(self, session: Session, principal: Principal, rental_id: str) -> Rental:
        rental = session.get(Rental, rental_id) if _RENTAL_ID.match(rental_id) else None
        if rental is None or rental.user_id != principal.user_id or (
            principal.rental_id is not None and principal.rental_id != rental_id
        ):
            raise NotFound("gpu_not_found", f"no rental {rental_id} of yours")
        return rental

    def active_of(self, session: Session, principal: Principal) -> list[Rental]:
        query = select(Rental).where(Rental.user_id == principal.user_id, Rental.phase.in_(ACTIVE))
        if principal.rental_id is not None:
            query = query.where(Rental.id == principal.rental_id)
        return list(session.scalars(query.order_by(Rental.created_at)))

    def describe(self, session: Session, rental: Rental) -> dict:
        now = self.now()
        last = as_utc(rental.last_activity_at)
        started = as_utc(rental.started_at)
        return {
            "gpu_id": rental.id,
            "rent_id": rental.id,
            "name": rental.name,
            "image": rental.image,
            "node": rental.node,
            "gpu_model": rental.gpu_model,
            "gpu_count": rental.gpu_count,
            "phase": rental.phase,
            "ready": rental.ready,
            "pending_reason": rental.pending_reason,
            "queue_position": (
                self._queued_ahead(session, rental.gpu_model, rental.created_at) + 1
                if rental.phase == "Queued" else None
            ),
            "end_reason": rental.end_reason,
            "mounts": json.loads(rental.mounts_json) if rental.mounts_json else None,
            "flush_error": rental.flush_error,
            "created_at": as_utc(rental.created_at).isoformat(),
            "started_at": started.isoformat() if started else None,
            "expires_at": (started + timedelta(hours=rental.duration_hours)).isoformat() if started else None,
            "ended_at": as_utc(rental.ended_at).isoformat() if rental.ended_at else None,
            "last_activity_at": last.isoformat() if last else None,
            "idle_seconds": int((now - last).total_seconds()) if last and rental.phase in ACTIVE else None,
            "idle_warning": rental.idle_warning,
            "activity": rental.last_activity_kind,
            "price_per_hour_credits": billing.hourly_price(rental),
            "credits_charged": billing.charged_total(session, rental.id),
            "ssh_access": self._ssh_access(session, rental),
        }

    def _ssh_access(self, session: Session, rental: Rental) -> dict | None:
        """How to SSH into a live rental (None: no SSH here, no key, or it has ended). The login
        name is ``kgpu`` unless the key is pinned to another live rental too."""
        if self.ssh_door is None or not rental.ssh_fingerprint or rental.phase not in ACTIVE:
            return None
        shared = session.scalar(select(func.count()).select_from(Rental).where(
            Rental.ssh_fingerprint == rental.ssh_fingerprint, Rental.phase.in_(ACTIVE), Rental.id != rental.id,
        ))
        return {**self.ssh_door, "fingerprint": rental.ssh_fingerprint, "ssh_user": rental.id if shared else "kgpu"}

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
        return rental.phase in ("Pending", "Running") and not rental.ready

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
                status = self._status(rental.pod_ref)
                if status.phase not in ("Gone", "Failed"):  # the reaper ends lost pods
                    _apply(rental, status)

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
        return self._finish(rental.id, "Ended", reason)

    def _finish(self, rental_id: str, phase: str, reason: str) -> Rental:
        with self.sessions.begin() as session:
            rental = session.get(Rental, rental_id)
            if rental.phase in ("Ended", "Failed"):
                return rental
            rental.phase = "Terminating"
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
            log.warning("rental %s ended (%s) but not every write to /files was uploaded: %s", rental_id, reason, lost)
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

    # ------------------------------------------------------------------ reaper

    def tick(self) -> list[tuple[str, str]]:
        """Bill every active rental and return those that must end; returns (rental, reason) ended."""
        now = self.now()
        ending: list[tuple[str, str]] = []
        # What this gateway's pods say, asked outside any transaction: each answer may take a
        # docker exec or an srun, and a transaction held meanwhile would hold up the others.
        with self.sessions() as session:
            watched = [
                (rental.id, rental.pod_ref, [int(i) for i in rental.gpu_indices.split(",") if i])
                for rental in session.scalars(select(Rental).where(Rental.phase.in_(("Pending", "Running"))))
                if rental.pod_ref and self.mine(rental)
            ]
        seen = self._observe_all(watched)
        with self._observing_lock:  # forget the load of pods no longer watched
            self._cpu_seen = {r: v for r, v in self._cpu_seen.items() if r in {w[0] for w in watched}}
        with self.sessions.begin() as session:
            for rental in session.scalars(select(Rental).where(Rental.phase == "Terminating")):
                if rental.pending_reason == HANDED_OVER and self.mine(rental):
                    ending.append((rental.id, rental.end_reason or "returned"))
            for rental in session.scalars(select(Rental).where(Rental.phase.in_(("Pending", "Running")))):
                if not self.mine(rental):
                    billing.charge(session, rental, now)  # once per minute, whoever bills first
                    continue
                observed = seen.get(rental.id)  # None: its pod started since (seen next tick)
                if observed is not None:
                    if observed.status.phase in ("Gone", "Failed"):
                        ending.append((rental.id, f"pod_lost: {observed.status.reason or observed.status.phase}"))
                        continue
                    _apply(rental, observed.status)
                    if observed.busy:
                        rental.last_activity_at, rental.last_activity_kind = now, "run"
                    elif observed.loaded:
                        rental.last_activity_at, rental.last_activity_kind = now, "load"
                    if observed.storage is not None and observed.storage > rental.ephemeral_storage_gib << 30:
                        ending.append((rental.id, "ephemeral_storage_exceeded"))
                        continue
                billing.charge(session, rental, now)
                idle = (now - as_utc(rental.last_activity_at)).total_seconds()
                rental.idle_warning = idle >= self.settings.idle_warning_seconds
                started = as_utc(rental.started_at)
                if started and now >= started + timedelta(hours=rental.duration_hours):
                    ending.append((rental.id, "expired"))
                elif idle >= self.settings.idle_return_seconds:
                    ending.append((rental.id, "auto_idle"))
            session.flush()
            broke = {
                rental.id
                for rental in session.scalars(
                    select(Rental).join(User, User.id == Rental.user_id).where(
                        Rental.phase.in_(("Pending", "Running")), User.credits <= 0
                    )
                )
            }
        ending += [(rental_id, "out_of_credits") for rental_id in broke if rental_id not in dict(ending)]
        self._remove_orphans()
        self.start_queued()
        # Each return may wait for its pod's /files flush (up to KGPU_POD_FLUSH_TIMEOUT_SECONDS):
        # side by side, so one slow pod does not hold back the others.
        if ending:
            with ThreadPoolExecutor(max_workers=min(8, len(ending)), thread_name_prefix="kgpu-return") as pool:
                list(pool.map(lambda item: self._finish_logged(item[0], item[1]), ending))
        return ending

    def _finish_logged(self, rental_id: str, reason: str) -> None:
        try:
            self._finish(rental_id, "Ended", reason)
        except Exception:  # noqa: BLE001 - the next tick ends it; the others end now
            log.exception("could not end rental %s (%s); the next tick tries again", rental_id, reason)

    def _remove_orphans(self) -> None:
        """Remove the pods this backend still runs for rentals that have ended (a start cut short,
        a return whose removal failed)."""
        try:
            pods = self.backend.adopt()
        except PodError:
            return
        if not pods:
            return
        with self.sessions() as session:
            ended = session.scalars(
                select(Rental.id).where(Rental.id.in_(list(pods)), Rental.phase.in_(("Ended", "Failed")))
            ).all()
        for rental_id in ended:
            try:
                self.backend.destroy(pods[rental_id])
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
        done, _ = wait(futures.values(), timeout=self.settings.reaper_observe_timeout_seconds)
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
        status = self._status(ref)
        if status.phase in ("Gone", "Failed"):
            return _Observed(status, False, None)
        loaded = self._loaded(rental_id, ref) or self._gpus_busy(ref, gpus)
        return _Observed(status, self._has_live_run(ref), self._storage(ref), loaded)

    def _gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        """The load probe's GPU half: one of the rental's GPUs over 5 % busy (where nvidia-smi is)."""
        try:
            return bool(gpus) and self.backend.gpus_busy(ref, gpus)
        except PodError:
            return False

    def _loaded(self, rental_id: str, ref: str) -> bool:
        """The load probe: whether the pod's processes used a tenth of a CPU or more since its
        last observation (a job started over SSH, or detached, is work as a run is)."""
        try:
            used = self.backend.cpu_seconds(ref)
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

    def _status(self, ref: str) -> PodStatus:
        try:
            return self.backend.status(ref)
        except PodError as exc:
            return PodStatus("Pending", False, f"pod status unknown: {exc}")

    def _storage(self, ref: str) -> int | None:
        try:
            return self.backend.storage_bytes(ref)
        except PodError:
            return None

    def _has_live_run(self, ref: str) -> bool:
        try:
            return any(
                (state := self.backend.run_state(ref, run_id, 0)) is not None and not state.finished
                for run_id in self.backend.run_ids(ref)
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


def _apply(rental: Rental, status: PodStatus) -> None:
    """A live pod's status onto its rental."""
    rental.phase = "Running" if status.phase == "Running" else "Pending"
    rental.ready = status.ready
    rental.pending_reason = None if status.ready else status.reason
    if status.mounts is not None:
        rental.mounts_json = json.dumps(status.mounts)
