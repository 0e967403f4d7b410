"""The FastAPI application: wiring of settings, database, object store and routes."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from drive.changes import DbChangeMarks
from drive.facts import FactsBook
from drive.service import DriveService
from drive.store import ObjectStore
from drive.store.caching import CachingStore
from drive.store.embedded import AttachedS3Server, EmbeddedS3Server, EmbeddedStore
from drive.store.s3 import S3ObjectStore
from gateway import db, metrics, traffic
from gateway.auth import Authenticator
from gateway.dav_app import DavDispatcher
from gateway.data_dir import AUTH_GENERATION, secure_data_dir
from gateway.edge import Gateway
from gateway.errors import RequestIdMiddleware, install_error_handlers
from gateway.quota import DbUsageBook
from gateway.inventory import load_inventory
from gateway.leases import Lease
from gateway.models import DriveChange, ObjectFact, UploadUrl
from gateway.openapi import install as install_openapi
from gateway.pods import PodBackend
from gateway.pods.network import pod_host_address
from gateway.rentals import Rentals
from gateway.pod_files import PodFiles
from gateway.routes import admin, files, gpus, health, me, objects, orgs_admin, pod_files, runs, shared, web, web_admin
from gateway.routes import metrics as metrics_route
from gateway.runs import Runs
from gateway.settings import Settings
from gateway.shared_generation import SharedGeneration
from gateway.signin import AdmissionPolicy, OidcClient
from gateway.transit import TransitObjects
from gateway.web_session import CookieSigner, load_or_create_secret

log = logging.getLogger("kgpu")


def open_store(
    settings: Settings, pod_address: str | None = None, attach: bool = False
) -> tuple[ObjectStore, EmbeddedS3Server | AttachedS3Server | None]:
    """The configured store, or the embedded ``rclone serve s3`` started over the data directory
    (on ``pod_address`` when pods reach this host there, so presigned URLs work for them too), on
    the port kept in the data directory and supervised: restarted within seconds if it dies.
    ``attach``: a worker process of ``kgpu serve --workers N``, whose parent started the embedded
    store (gateway/serving.py): the worker follows it instead."""
    if not settings.uses_embedded_store:
        store = S3ObjectStore(
            settings.s3_endpoint_url,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
            settings.s3_bucket,
            settings.s3_region,
            settings.s3_public_endpoint_url or None,
            put_etag_is_md5=settings.s3_put_etag_is_md5,
        )
        return store, None
    server = follow_embedded(settings, pod_address) if attach else start_embedded(settings, pod_address)
    store = EmbeddedStore(
        server,
        server.endpoint_url,
        server.credentials.access_key,
        server.credentials.secret_key,
        settings.s3_bucket,
        settings.s3_region,
        settings.s3_public_endpoint_url or None,
    )
    return store, server


def _embedded_host(settings: Settings, pod_address: str | None) -> str:
    return settings.embedded_s3_host or pod_address or "127.0.0.1"


def start_embedded(settings: Settings, pod_address: str | None) -> EmbeddedS3Server:
    """The embedded store started and supervised by this process: restarted on the same port if
    it dies (the store answers 503 meanwhile)."""
    server = EmbeddedS3Server(settings.data_dir, _embedded_host(settings, pod_address), settings.embedded_s3_port)
    endpoint = server.start()
    server.supervise()
    log.info("embedded object store (rclone serve s3) at %s over %s", endpoint, server.root)
    return server


def follow_embedded(settings: Settings, pod_address: str | None) -> AttachedS3Server:
    """The embedded store that the parent of this worker process started (gateway/serving.py)."""
    server = AttachedS3Server(settings.data_dir, _embedded_host(settings, pod_address), settings.embedded_s3_port)
    server.follow()
    return server


# Multipart uploads unfinished for this long were left by a server that died mid-upload (a body
# that stalls is cut off after a minute): their parts only take room in the store.
STALE_UPLOAD_SECONDS = 24 * 3600


def abort_stale_uploads(store: ObjectStore) -> None:
    try:
        aborted = store.abort_stale_multiparts(STALE_UPLOAD_SECONDS)
    except Exception:  # noqa: BLE001 - best effort: the next start tries again
        log.warning("could not sweep unfinished multipart uploads", exc_info=True)
        return
    if aborted:
        log.info("aborted %d multipart uploads unfinished for over %d s", aborted, STALE_UPLOAD_SECONDS)


def open_pod_backend(settings: Settings, store_url: str | None = None) -> PodBackend:
    """``store_url``: where pods reach the object store (presigned URLs), besides the API base."""
    # What every backend is told alike.
    every = {
        "flush_timeout_s": settings.pod_flush_timeout_seconds, "pids_limit": settings.pod_pids_limit,
        "slots_dir": settings.slots_dir,
    }
    if settings.pod_backend == "docker":
        from gateway.pods.docker import DockerPodBackend

        return DockerPodBackend(
            network=settings.docker_network or None,
            pull=settings.docker_pull,
            disk_dir=settings.data_dir / "pod-disks",
            **every,
        )
    if settings.pod_backend == "slurm":
        from gateway.pods.slurm import SlurmPodBackend

        return SlurmPodBackend(
            conf=settings.slurm_conf,
            partition=settings.slurm_partition,
            prefix=settings.slurm_job_prefix,
            gpu_device_dir=settings.slurm_gpu_device_dir,
            nvidia_runtime=settings.slurm_nvidia_runtime,
            gpu_model=settings.slurm_gpu_model,
            gpu_price_per_hour_credits=settings.gpu_price_per_hour_credits,
            network=settings.slurm_docker_network,
            pull=settings.slurm_pull,
            direct_channel=settings.slurm_direct_channel,
            gateway_address=pod_host_address(settings) or "",
            **every,
        )
    from gateway.pods.local import LocalPodBackend

    return LocalPodBackend(
        settings.data_dir / "pods",
        mounts=settings.local_pod_mounts,
        reachable=[store_url] if store_url else [],
        trusted_single_user=settings.local_trusted_single_user,
        uid_base=settings.local_pod_uid_base,
        uid_count=settings.local_pod_uid_count,
        **every,
    )


async def reaper_loop(interval: float, lease: Lease, *ticks: Callable[[], object]) -> None:
    """Bill and reap rentals, sweep expired transit objects, on a timer, while this process holds
    the reaper's lease (gateway/leases.py: one process at a time among the workers and replicas
    that share a pod backend). Each tick is idempotent, so a lease taken over mid-tick loses nothing."""
    while True:
        await asyncio.sleep(interval)
        if not lease.held:
            continue
        for tick in ticks:
            try:
                await run_in_threadpool(tick)
            except Exception:
                log.exception("reaper tick %s failed", getattr(tick, "__qualname__", tick))


def reaper_lease(settings: Settings, sessions, rentals: Rentals) -> Lease:
    """The reaper's duty is per pod backend (its ``instance``: replicas with pods of their own each
    reap theirs, and never the others' pods); the worker processes of one server share it."""
    return Lease(sessions, lambda: f"reaper:{rentals.backend.instance}", settings.reaper_lease_seconds)


def start_bastion(app: FastAPI, settings: Settings, run: bool = True):
    """The SSH bastion (gateway/ssh), unless KGPU_SSH_PORT is 0; a port in use stops start-up.
    ``run`` False: a worker process of ``kgpu serve --workers N``, whose parent runs the one bastion
    (gateway/serving.py); the worker only tells clients where it is."""
    app.state.ssh_published = app.state.bastion = None
    if not settings.ssh_port:
        return None
    from gateway.ssh import bastion as ssh  # asyncssh loads only where SSH is served

    bastion = None
    if run:
        bastion = ssh.Bastion(settings, app.state.rentals)
        bastion.start(settings.host, settings.ssh_port, getattr(app.state, "ssh_socket", None))
        host_key, door = bastion.host_key, bastion.door()
    else:
        host_key = ssh.load_host_key(settings.ssh_host_key.get_secret_value(), settings.data_dir)
        door = ssh.door(settings, settings.ssh_port, host_key)
    app.state.rentals.ssh_door = door
    app.state.ssh_published = ssh.published(door, host_key)
    app.state.bastion = bastion
    return bastion


def install_signin(app: FastAPI, settings: Settings) -> None:
    """The OIDC client (None: sign-in not configured), who is admitted, and the cookie signer of /view."""
    app.state.oidc = (
        OidcClient(
            settings.oidc_issuer, settings.oidc_client_id, settings.oidc_client_secret.get_secret_value(),
            settings.oidc_scopes,
        )
        if settings.signin_enabled
        else None
    )
    app.state.admission = AdmissionPolicy.from_lists(
        settings.admin_emails, settings.allowed_emails, settings.allowed_domains
    )
    secret = load_or_create_secret(settings.session_secret.get_secret_value(), settings.data_dir)
    app.state.cookie_signer = CookieSigner(secret, settings.session_max_age_seconds)


def create_app(settings: Settings | None = None, store: ObjectStore | None = None, worker: bool = False) -> FastAPI:
    """``worker``: one of the processes of ``kgpu serve --workers N`` (gateway/serving.py), whose
    parent runs the embedded store and the SSH bastion for them all."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        secure_data_dir(settings.data_dir)  # 0711, the database and the store's files private
        url = settings.resolved_database_url
        db.migrate(url)
        engine = db.make_engine(url)
        sessions = db.make_sessionmaker(engine)
        embedded = None
        active_store = store
        app.state.pod_address = pod_host_address(settings)
        if active_store is None:
            active_store, embedded = open_store(settings, app.state.pod_address, attach=worker)
        # Every write goes through the cache's wrapper, which drops the listings it changes.
        active_store = CachingStore(active_store, DbChangeMarks(sessions, DriveChange.__table__, UploadUrl.__table__))
        try:
            active_store.ensure_bucket()
        except Exception:
            log.warning("object store not reachable at start-up; drive routes will answer 503", exc_info=True)
        else:
            threading.Thread(target=abort_stale_uploads, args=(active_store,), daemon=True).start()
        app.state.settings = settings
        app.state.sessions = sessions
        app.state.store = active_store
        install_signin(app, settings)
        app.state.authenticator = Authenticator(
            sessions, settings.admin_token, settings.auth_cache_seconds, shared=SharedGeneration(settings.data_dir / AUTH_GENERATION)
        )
        app.state.usage = DbUsageBook(sessions, active_store, settings.quota_reconcile_seconds)
        app.state.facts = FactsBook(sessions, ObjectFact.__table__)
        app.state.drive = DriveService(active_store, app.state.usage, app.state.facts, settings)
        app.state.rentals = Rentals(
            settings,
            sessions,
            open_pod_backend(settings, getattr(active_store, "presign_endpoint_url", None)),
            load_inventory(settings),
            tokens_revoked=app.state.authenticator.invalidate,
        )
        app.state.runs = Runs(app.state.rentals)
        app.state.pod_files = PodFiles(
            app.state.runs, settings.pod_files_idle_seconds, per_user=settings.pod_files_per_user,
            slots_dir=settings.slots_dir,
        )
        app.state.transit = TransitObjects(settings, sessions, active_store, app.state.usage)
        snapshots = traffic.Snapshots(settings.metrics_dir)  # this process's counts, for its siblings' scrapes
        snapshots.start()
        app.state.metrics = metrics.registry(sessions, snapshots)
        app.serve_redirects(app.state.authenticator, app.state.drive)
        bastion = start_bastion(app, settings, run=not worker)
        lease = reaper_lease(settings, sessions, app.state.rentals)
        loop = asyncio.get_running_loop()
        keeper = loop.create_task(lease.keep())
        reaper = loop.create_task(
            reaper_loop(settings.reaper_interval_seconds, lease, app.state.rentals.tick, app.state.transit.sweep)
        )
        gc.collect()
        gc.freeze()  # what start-up built stays for good: a full collection then walks only what requests made
        try:
            yield
        finally:
            reaper.cancel()
            app.stop_redirects()
            snapshots.stop()
            keeper.cancel()
            await run_in_threadpool(lease.release)
            if bastion is not None:
                bastion.stop()
            app.state.rentals.close()
            app.state.authenticator.close()
            app.state.usage.close()
            if embedded is not None:
                embedded.stop()
            engine.dispose()

    app = Gateway(  # FastAPI, with the download redirect and the access log in front (gateway/edge.py)
        title="kgpu",
        version="0.1.0",
        description="GPU-rental gateway with a persistent drive. Every route is under /v1.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app)  # every status each route answers, the error envelope, bearer and Basic
    app.add_middleware(DavDispatcher)  # WebDAV on /v1/files/ and /v1/dav/, inside request ids
    app.add_middleware(RequestIdMiddleware)
    hottest_first = (
        files, shared, gpus, runs, pod_files, objects, me, admin, orgs_admin, health, metrics_route, web, web_admin,
    )
    for module in hottest_first:
        app.include_router(module.router)
    app.mount("/view/static", StaticFiles(directory=Path(__file__).resolve().parent / "static"), name="view-static")
    return app
