"""SQLAlchemy models. Every change here comes with an Alembic revision in migrations/versions."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from gateway.db import Base


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16), default="user")  # user | admin
    status: Mapped[str] = mapped_column(String(16), default="approved")  # approved | pending | suspended
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    # Credits charged for this account's rentals in all, its ledger rows' sum, moved with each
    # (gateway/billing.py:charge): /metrics adds these up instead of scanning the ledger.
    credits_charged: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    tokens: Mapped[list["ApiToken"]] = relationship(back_populates="user")


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters of the token, so a person can tell tokens apart in a list.
    hint: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set for in-pod tokens: scoped to this rental and revoked when it ends.
    rental_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)

    user: Mapped[User] = relationship(back_populates="tokens")


class DriveUsage(Base):
    """Bytes stored under a drive prefix, kept here so a quota check never lists the drive."""

    __tablename__ = "drive_usage"

    prefix: Mapped[str] = mapped_column(String(300), primary_key=True)
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bytes promised to uploads in flight and to presigned PUTs not yet settled (gateway/quota.py):
    # a reservation succeeds only while used + reserved + n <= quota, in one UPDATE.
    reserved_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    inflight: Mapped[int] = mapped_column(Integer, default=0)  # uploads and holds open
    # The drive's WebDAV dead properties (name and XML value of each): they count in the quota too.
    property_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    changes: Mapped[int] = mapped_column(BigInteger, default=0)  # bumped by every change; a recount checks it
    reconciled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class QuotaHold(Base):
    """Bytes reserved for a presigned PUT (a 307 or a mint): the client writes straight to the
    store, so the hold stays until the object appears (then it becomes usage) or the URL expires."""

    __tablename__ = "quota_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(300), index=True)
    key: Mapped[str] = mapped_column(String(1024))
    # "put": a presigned PUT (a 307 or a mint); "stream": the lease of an upload streamed through
    # a gateway, renewed while its bytes flow and given back if it runs out (that gateway died);
    # "parts": a multipart upload a client sends straight to the store (drive/direct.py).
    kind: Mapped[str] = mapped_column(String(8), default="put")
    bytes: Mapped[int] = mapped_column(BigInteger)
    # The object the upload replaces (None: there was none), so its appearance can be told apart.
    previous_etag: Mapped[str | None] = mapped_column(String(100), nullable=True)
    previous_size: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # A "parts" hold: the store's upload id, the declared size and the size of each part but the last.
    upload_id: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    part_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Org(Base):
    """An organisation (lab) and its shared drive at ``orgs/{slug}/``."""

    __tablename__ = "orgs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    owner_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class OrgMember(Base):
    __tablename__ = "org_members"

    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True)
    role: Mapped[str] = mapped_column(String(16))  # admin | uploader | member
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SharedFile(Base):
    """A file put into a shared drive out of band (presigned PUT), recorded after the fact."""

    __tablename__ = "shared_files"
    __table_args__ = (UniqueConstraint("org_id", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(1024))  # relative to the org's drive
    size: Mapped[int] = mapped_column(BigInteger)
    etag: Mapped[str] = mapped_column(String(100))
    content_type: Mapped[str | None] = mapped_column(String(200), nullable=True)
    uploader_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Rental(Base):
    """A GPU rental (a pod). Rows are kept after the rental ends, so its story stays readable."""

    __tablename__ = "rentals"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "gpu-…", also KGPU_RENT_ID
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(30))
    image: Mapped[str] = mapped_column(String(300))
    node: Mapped[str] = mapped_column(String(100))
    gpu_model: Mapped[str] = mapped_column(String(50))
    gpu_count: Mapped[int] = mapped_column(Integer)
    gpu_indices: Mapped[str] = mapped_column(String(100), default="")  # "0,1"
    cpu: Mapped[float] = mapped_column(Float)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    ephemeral_storage_gib: Mapped[int] = mapped_column(Integer)
    duration_hours: Mapped[int] = mapped_column(Integer)
    env_json: Mapped[str] = mapped_column(Text, default="{}")
    backend: Mapped[str] = mapped_column(String(20))
    pod_ref: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Which backend instance runs the pod (PodBackend.instance): gateway replicas act only on their own.
    pod_instance: Mapped[str | None] = mapped_column(String(100), nullable=True)
    phase: Mapped[str] = mapped_column(String(20), index=True)  # Queued Pending Running Terminating Ended Failed
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    pending_reason: Mapped[str | None] = mapped_column(String(300), nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(300), nullable=True)
    price_per_hour_credits: Mapped[int] = mapped_column(Integer)
    idle_warning: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_activity_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What that activity was: "rent", "run" (a run started or running), "ssh" (a session or forward).
    last_activity_kind: Mapped[str | None] = mapped_column(String(20), nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What kgpu-bootstrap reported about /shared and /files (JSON); None: the image has no bootstrap.
    mounts_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set on return when writes to /files could not all be uploaded before the pod went.
    flush_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The SSH key this rental pins (gateway/ssh): logins with it land in its pod while it is live.
    ssh_pubkey: Mapped[str | None] = mapped_column(Text, nullable=True)
    ssh_fingerprint: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)


class CreditCharge(Base):
    """One minute of one rental, charged once: the (rental, minute) pair is unique."""

    __tablename__ = "credit_charges"
    __table_args__ = (UniqueConstraint("rental_id", "minute"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rental_id: Mapped[str] = mapped_column(ForeignKey("rentals.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    minute: Mapped[int] = mapped_column(Integer)
    credits: Mapped[int] = mapped_column(Integer)
    charged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# A WebDAV URL (the quoted object key): compared byte by byte, so that "every URL under a
# folder" is one range query (drive/dav/storage.py); SQLite compares so already.
DAV_URL = Text().with_variant(Text(collation="C"), "postgresql")


class DriveWrite(Base):
    """A file or folder of a drive that one request is writing now (gateway/quota.py,
    :meth:`~gateway.quota.DbUsageBook.writing`): writes to one key are one at a time, on every
    replica, so what a write replaces, and so the quota, is counted once. ``path`` is an object
    key, or a folder's key ending in ``/`` (everything under it); a shared row (a COPY's source)
    lets other readers in. A lease: renewed while its request runs, it runs out if the gateway dies."""

    __tablename__ = "drive_writes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(300), index=True)
    path: Mapped[str] = mapped_column(DAV_URL)
    exclusive: Mapped[bool] = mapped_column(Boolean, default=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DavProperty(Base):
    """A WebDAV dead property (PROPPATCH) of a file or folder, shared by every gateway replica."""

    __tablename__ = "dav_properties"

    url: Mapped[str] = mapped_column(DAV_URL, primary_key=True)  # "/users/7/a%20b", "/users/7/folder/"
    name: Mapped[str] = mapped_column(DAV_URL, primary_key=True)  # "{namespace}local"
    value: Mapped[bytes] = mapped_column(LargeBinary)  # the property's XML element


class DavLock(Base):
    """A WebDAV lock, shared by every gateway replica; the fields are wsgidav's lock dictionary."""

    __tablename__ = "dav_locks"

    token: Mapped[str] = mapped_column(String(100), primary_key=True)  # "opaquelocktoken:0x…"
    root: Mapped[str] = mapped_column(DAV_URL, index=True)  # the locked URL, no trailing "/"
    principal: Mapped[str] = mapped_column(String(100))  # "user:7"
    scope: Mapped[str] = mapped_column(String(16))  # exclusive | shared
    type: Mapped[str] = mapped_column(String(16))  # write
    depth: Mapped[str] = mapped_column(String(16))  # 0 | infinity
    owner: Mapped[bytes] = mapped_column(LargeBinary)  # the client's <owner> XML
    timeout: Mapped[float] = mapped_column(Float)  # seconds, as granted
    expire: Mapped[float] = mapped_column(Float, index=True)  # when it runs out, seconds since the epoch


class ObjectFact(Base):
    """What the gateway knows of an object beyond what the store lists (drive/facts.py): the
    modification time a client gave and the SHA1 and MD5 of bytes that passed through it. Valid
    only while the object's ETag and size are still these; ``pending_*``: a presigned PUT handed
    out with a modification time, taken once an object of that size appears."""

    __tablename__ = "object_facts"

    key: Mapped[str] = mapped_column(DAV_URL, primary_key=True)  # the object key, "users/7/a/b.txt"
    folder: Mapped[str] = mapped_column(DAV_URL, index=True)  # the key's folder, "users/7/a/"
    etag: Mapped[str | None] = mapped_column(String(200), nullable=True)  # unquoted, as the store lists it
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    mtime: Mapped[float | None] = mapped_column(Float, nullable=True)  # seconds since the epoch; None: the store's
    sha1: Mapped[str | None] = mapped_column(String(40), nullable=True)  # lowercase hex
    md5: Mapped[str | None] = mapped_column(String(32), nullable=True)
    pending_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    pending_mtime: Mapped[float | None] = mapped_column(Float, nullable=True)
    pending_since: Mapped[float | None] = mapped_column(Float, nullable=True)  # when the URL was handed out
    pending_until: Mapped[float | None] = mapped_column(Float, nullable=True)  # when it expires
    # Who vouches for its MD5 (drive/facts.py proven_md5): the hex a client declared, which its URL
    # signs (Content-MD5), or "etag" where the store's ETags are MD5s.
    pending_md5: Mapped[str | None] = mapped_column(String(32), nullable=True)


class DriveChange(Base):
    """A drive's generation, bumped after every change the gateways make to its objects, so a
    replica's cached folder listings (drive/store/caching.py) know when to list again."""

    __tablename__ = "drive_changes"

    prefix: Mapped[str] = mapped_column(String(300), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class UploadUrl(Base):
    """A presigned PUT handed out (a 307, a mint) and still valid: the client writes straight to
    the store, so cached listings of the folders above ``key`` check it (drive/store/caching.py)."""

    __tablename__ = "upload_urls"
    __table_args__ = (Index("ix_upload_urls_prefix_key", "prefix", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(300))
    key: Mapped[str] = mapped_column(DAV_URL)
    expires_at: Mapped[float] = mapped_column(Float)  # seconds since the epoch


class CliLoginCode(Base):
    """A one-time code of ``kgpu login --browser`` (gateway/cli_login.py): the dashboard hands it
    to the command's loopback listener, and only the command, holding the PKCE verifier whose S256
    challenge the code is bound to, exchanges it for the token, once, within a minute. The token
    is kept sealed under a key only the code gives, so this table alone reveals no token."""

    __tablename__ = "cli_login_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 hex of the code
    code_challenge: Mapped[str] = mapped_column(String(43))  # BASE64URL(SHA-256(verifier)), RFC 7636
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"))
    sealed_token: Mapped[bytes] = mapped_column(LargeBinary)  # AES-GCM under a key derived from the code
    created_at: Mapped[float] = mapped_column(Float)  # seconds since the epoch (compared on every database alike)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    used_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # redeemed (or tried): never again


class TransitObject(Base):
    """A scratch object (gateway/transit.py): uploaded once with a presigned PUT, fetched by any
    number of pods with presigned GETs, gone 24 h after it was minted. Its declared size stays
    reserved in its owner's transit usage (gateway/quota.py) from the mint until the row goes."""

    __tablename__ = "transit_objects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # obj-<24 hex>
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    # When its presigned PUT stops working: until then the upload may still land, even after a DELETE.
    upload_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class DutyLease(Base):
    """Who does a duty that one process at a time must do (the reaper of a pod backend): held by
    ``holder`` until ``expires_at``, renewed while it lives, taken over once it lapses
    (gateway/leases.py). Shared by the worker processes of one server and by replicas alike."""

    __tablename__ = "duty_leases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[float] = mapped_column(Float)  # seconds since the epoch
