"""How ``kgpu serve`` runs: one process, or a parent and ``KGPU_WORKERS`` worker processes on one port.

With one worker the server is one process: uvicorn, the embedded store and its supervisor, the SSH
bastion and the reaper. With N > 1 (the default on a machine of N cores):

* the parent (uvicorn's process manager) binds the HTTP and SSH ports, migrates the database,
  starts and supervises the one embedded store (``rclone serve s3``), runs the one SSH bastion (so
  its per-address and per-user limits count every connection), and restarts a worker that dies;
* each worker (:func:`worker_app`) serves HTTP on the shared sockets, follows the parent's store
  (drive/store/embedded.py:AttachedS3Server) and tells clients where the bastion is; the reaper runs
  in the one worker that holds its lease in the database (gateway/leases.py), as among replicas.

What each worker caches stays current: folder listings check the database's per-drive generation
(drive/store/caching.py), as between replicas; token lookups are dropped in every worker at once
when one of them revokes a token or changes an account (gateway/shared_generation.py).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import socket
from contextlib import contextmanager
from typing import Iterator

import uvicorn
from uvicorn.supervisors import Multiprocess

from gateway import access_log, db, metrics, traffic
from gateway.app import create_app, open_pod_backend, start_embedded
from gateway.inventory import load_inventory
from gateway.pods.network import pod_host_address
from gateway.settings import Settings

log = logging.getLogger("kgpu")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT; the exit code."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    traffic.clear(settings.metrics_dir)  # counters start again with the server
    if settings.metrics_address:  # bound before the API's port, as SSH's: a taken address stops here
        sessions = db.make_sessionmaker(db.make_engine(settings.resolved_database_url))
        try:
            metrics.serve(settings.metrics_address, metrics.registry(sessions, traffic.Snapshots(settings.metrics_dir)))
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s", settings.metrics_address, exc)
            return 1
    ssh_socket = None
    if settings.ssh_port:  # bound first, as the HTTP port is: a taken port stops here with a message
        from gateway.ssh.bastion import SshPortInUse, listen_socket

        try:
            ssh_socket = listen_socket(settings.host, settings.ssh_port)
        except SshPortInUse as exc:
            log.error("%s", exc)
            return 1
    if settings.workers == 1:
        return _serve_alone(settings, ssh_socket)
    return _serve_workers(settings, ssh_socket)


# How uvicorn serves, with one worker or several: one access-log line per request from
# gateway/access_log.py (written by a thread), not uvicorn's own; no Server header naming it.
HTTP_OPTIONS = {"proxy_headers": True, "access_log": False, "server_header": False}


def _serve_alone(settings: Settings, ssh_socket: socket.socket | None) -> int:
    app = create_app(settings)
    app.state.ssh_socket = ssh_socket
    config = uvicorn.Config(app, host=settings.host, port=settings.port, **HTTP_OPTIONS)
    sockets = _bind(config, settings)
    writer = access_log.start(_log_handler())
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        access_log.stop(writer)
    return 0


def _serve_workers(settings: Settings, ssh_socket: socket.socket | None) -> int:
    # The workers read their settings as this process did, with the command line's on top.
    for name in ("host", "port", "data_dir"):
        os.environ[f"KGPU_{name.upper()}"] = str(getattr(settings, name))
    config = uvicorn.Config(
        f"{__name__}:worker_app", factory=True, host=settings.host, port=settings.port, workers=settings.workers,
        **HTTP_OPTIONS,
    )
    sockets = _bind(config, settings)
    with _parent_duties(settings, ssh_socket):
        log.info("serving on %s:%s with %d worker processes", settings.host, settings.port, settings.workers)
        Multiprocess(config, sockets=sockets).run()
    return 0


def _bind(config: uvicorn.Config, settings: Settings) -> list[socket.socket]:
    sockets = [config.bind_socket()]
    pod_address = pod_host_address(settings)
    if pod_address and settings.host in ("127.0.0.1", "localhost"):
        # Docker pods on a bridge cannot reach 127.0.0.1: serve them on the bridge's host address too.
        log.info("also listening on %s:%s for pods", pod_address, settings.port)
        sockets.append(uvicorn.Config(config.app, host=pod_address, port=settings.port).bind_socket())
    return sockets


def _log_handler() -> logging.Handler:
    written = logging.StreamHandler()
    written.setFormatter(logging.Formatter(LOG_FORMAT))
    return written


@contextmanager
def _parent_duties(settings: Settings, ssh_socket: socket.socket | None) -> Iterator[None]:
    """What the parent runs for all its workers: the schema brought up to date before any starts,
    the embedded store, the SSH bastion (with a view of the rentals of its own, its logins counted
    for the workers' scrapes of /metrics)."""
    url = settings.resolved_database_url
    db.migrate(url)
    store = start_embedded(settings, pod_host_address(settings)) if settings.uses_embedded_store else None
    engine = rentals = bastion = None
    snapshots = traffic.Snapshots(settings.metrics_dir)
    snapshots.start()
    try:
        if ssh_socket is not None:
            from gateway.rentals import Rentals
            from gateway.ssh.bastion import Bastion

            engine = db.make_engine(url)
            # The bastion enters pods and never starts one: its backend needs no store address.
            rentals = Rentals(settings, db.make_sessionmaker(engine), open_pod_backend(settings), load_inventory(settings))
            bastion = Bastion(settings, rentals)
            bastion.start(settings.host, settings.ssh_port, ssh_socket)
        yield
    finally:
        if bastion is not None:
            bastion.stop()
        if rentals is not None:
            rentals.close()
        if engine is not None:
            engine.dispose()
        snapshots.stop()
        if store is not None:
            store.stop()


def worker_app():
    """The application of one worker process (uvicorn's factory, called in the new process)."""
    from drive.store.embedded import die_with_parent

    die_with_parent()  # a SIGKILLed parent leaves no worker behind
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the line above
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    writer = access_log.start(_log_handler())
    atexit.register(access_log.stop, writer)
    return create_app(Settings(), worker=True)
