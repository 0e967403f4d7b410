"""The bastion: an asyncssh server on ``KGPU_SSH_PORT`` that carries each login into its pod.

It runs on an event loop of its own, in a thread of ``kgpu serve``; the database and the pod
backends are blocking, so it asks them from its own worker threads. Every channel asks again
whether its rental may still be entered, and a watcher ends, within a second, every connection
whose rental has ended or whose key was changed (by any gateway: it asks the database).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asyncssh

from gateway.log_line import Sparse, one_line
from gateway.pods import PodError
from gateway.rentals import Rentals
from gateway.settings import Settings
from gateway.ssh import flow
from gateway.ssh.access import Access, Ambiguous, Target
from gateway.ssh.forward import PodForward, open_forward
from gateway.ssh.keys import fingerprint_of, known_hosts_line, load_host_key
from gateway.ssh.pod_session import PodProcess, open_session, run_in_pod
from gateway.traffic import TRAFFIC

log = logging.getLogger("kgpu.ssh")
flow.install()  # asyncssh's receive window, fixed (gateway/ssh/flow.py)
# asyncssh logs every channel's command at INFO: a login's commands and data are never logged.
logging.getLogger("asyncssh").setLevel(logging.WARNING)

WATCH_INTERVAL_S = 1.0
ACTIVITY_INTERVAL_S = 30.0
CONNECT_TIMEOUT_S = 10.0
LOGIN_TIMEOUT_S = 30
# AES only: OpenSSH clients pick chacha20-poly1305 first where it is offered, which asyncssh
# carries at 140-160 MiB/s down against 260+ with aes128-ctr (scp of 512 MiB, measured here).
ENCRYPTION_ALGS = ["aes128-ctr", "aes256-ctr", "aes192-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
# Connections one address may hold open before they log in (each may wait LOGIN_TIMEOUT_S).
UNAUTHENTICATED_PER_ADDRESS = 32


class SshPortInUse(RuntimeError):
    pass


def listen_socket(host: str, port: int) -> socket.socket:
    """The bastion's listening socket (port 0: any free one, for tests), or SshPortInUse."""
    try:
        return socket.create_server((host, port), backlog=128)
    except OSError as exc:
        raise SshPortInUse(
            f"the SSH port {host}:{port} is not free ({exc.strerror}): set KGPU_SSH_PORT to another port, "
            "or to 0 to run without SSH"
        ) from None


def door(settings: Settings, port: int, host_key) -> dict:
    """Where clients connect, for ``ssh_access``: the configured host, else the public URL's. Worker
    processes that do not run the bastion (`kgpu serve --workers N`) tell it alike."""
    host = settings.ssh_host or urlsplit(settings.public_base_url).hostname
    if not host:
        host = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    return {"ssh_host": host, "ssh_port": port, "host_key_fingerprint": fingerprint_of(host_key)}


def published(door: dict, host_key) -> dict:
    """The door as the API shows it, with the ``known_hosts`` line of the host key."""
    return {**door, "known_hosts": known_hosts_line(door["ssh_host"], door["ssh_port"], host_key)}


class Bastion:
    def __init__(self, settings: Settings, rentals: Rentals):
        self.settings = settings
        self.access = Access(rentals)
        self.backend = rentals.backend
        self.host_key = load_host_key(settings.ssh_host_key.get_secret_value(), settings.data_dir)
        self.host_key_fingerprint = fingerprint_of(self.host_key)
        self.workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kgpu-ssh")
        self.logins: set[Login] = set()
        self._failures: dict[str, collections.deque] = {}
        self.waiting: collections.Counter = collections.Counter()  # address: connections not yet logged in
        self.over_cap_lines = Sparse()  # one line a minute per address past the cap above
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self.port = 0
        self.activity_interval_s = ACTIVITY_INTERVAL_S

    # --- life ---------------------------------------------------------------------------

    def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` (`kgpu serve` binds it before anything starts), else on a socket
        listening on ``host:port``; SshPortInUse when that port is taken."""
        sock = sock or listen_socket(host, port)
        host, self.port = sock.getsockname()[:2]
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(sock, ready, failure), name="kgpu-ssh", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        log.info("SSH bastion on %s:%s, host key %s", host, self.port, self.host_key_fingerprint)

    def _run(self, sock: socket.socket, ready: threading.Event, failure: list) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._serve(sock, ready))
        except BaseException as exc:  # noqa: BLE001 - reported to start(), or logged
            failure.append(exc)
            ready.set()
            log.exception("the SSH bastion stopped")
        finally:
            self.loop.close()

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncssh.listen(
            sock=sock, server_factory=lambda: Login(self), server_host_keys=[self.host_key],
            encoding=None, line_editor=False, agent_forwarding=False, x11_forwarding=False, allow_scp=False,
            login_timeout=LOGIN_TIMEOUT_S, keepalive_interval=30, keepalive_count_max=4,
            encryption_algs=ENCRYPTION_ALGS,
        )
        ready.set()
        watcher = asyncio.ensure_future(self._watch())
        try:
            await self._stopping.wait()
        finally:
            watcher.cancel()
            server.close()
            for login in list(self.logins):
                login.conn.close()
            await server.wait_closed()

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.workers.shutdown(wait=False, cancel_futures=True)

    # --- what clients are told --------------------------------------------------------------

    def door(self) -> dict:
        return door(self.settings, self.port, self.host_key)

    # --- helpers for logins ------------------------------------------------------------------

    async def blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.workers, function, *args)

    def refused_address(self, address: str) -> bool:
        window = self._failures.get(address)
        cutoff = time.monotonic() - 60
        while window and window[0] < cutoff:
            window.popleft()
        return bool(window) and len(window) >= self.settings.ssh_auth_failures_per_minute

    def failed(self, address: str) -> None:
        if len(self._failures) > 100_000:  # many addresses: forget the quiet ones
            self._failures = {a: w for a, w in self._failures.items() if w and w[-1] > time.monotonic() - 60}
        self._failures.setdefault(address, collections.deque()).append(time.monotonic())

    def logins_of(self, user_id: int) -> int:
        return sum(1 for login in self.logins if login.user_id == user_id)

    async def _watch(self) -> None:
        """End the connections whose rental may no longer be entered; report SSH activity."""
        reported = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                entered = [login for login in self.logins if login.target is not None]
                closed = await self.blocking(self.access.closed_of, [login.target for login in entered])
                for login in entered:
                    if login.target.rental_id in closed:
                        log.info("ssh: closing a connection to %s (ended, or its key changed)", login.target.rental_id)
                        login.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "kgpu: the rental has ended or its SSH key changed")
                if time.monotonic() - reported >= self.activity_interval_s:
                    active = {login.target.rental_id for login in entered if login.active_since(reported)}
                    reported = time.monotonic()
                    await self.blocking(self.access.active, active)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive a database hiccup
                log.exception("ssh watcher tick failed")


class Login(asyncssh.SSHServer):
    """One SSH connection: who logged in, where to, and its channels."""

    def __init__(self, bastion: Bastion):
        self.bastion = bastion
        self.conn = None
        self.address = "?"
        self.choice: Target | Ambiguous | None = None
        self.waiting = False  # counted in bastion.waiting until it logs in or goes
        self.channels = 0
        self.sessions_open = 0
        self.last_bytes = 0.0

    @property
    def target(self) -> Target | None:
        return self.choice if isinstance(self.choice, Target) else None

    @property
    def user_id(self) -> int | None:
        return self.choice.user_id if self.choice is not None else None

    def active_since(self, moment: float) -> bool:
        return self.sessions_open > 0 or self.last_bytes > moment

    # --- authentication -------------------------------------------------------------------

    def connection_made(self, conn) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?",)
        self.address = str(peer[0])
        self.waiting = True
        self.bastion.waiting[self.address] += 1
        if self.bastion.waiting[self.address] > UNAUTHENTICATED_PER_ADDRESS:
            held = self.bastion.over_cap_lines.due(self.address)
            if held is not None:
                log.warning("ssh: %s holds %d connections that have not logged in; closing the newest%s",
                            self.address, self.bastion.waiting[self.address] - 1,
                            f" ({held} more closed since this line last came)" if held else "")
            conn.abort()

    def _logged_in_or_gone(self) -> None:
        if self.waiting:
            self.waiting = False
            self.bastion.waiting[self.address] -= 1
            if self.bastion.waiting[self.address] <= 0:
                del self.bastion.waiting[self.address]

    def connection_lost(self, exc) -> None:
        self._logged_in_or_gone()
        self.bastion.logins.discard(self)

    def begin_auth(self, username: str) -> bool:
        if self.bastion.refused_address(self.address):
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                                 "kgpu: too many failed logins from your address; try again in a minute")
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key) -> bool:
        fingerprint = fingerprint_of(key)
        choice = await self.bastion.blocking(self.bastion.access.choose, username, fingerprint)
        if choice is None:
            self.bastion.failed(self.address)
            TRAFFIC.ssh_login(accepted=False)
            return False
        self.choice = choice
        return True

    def auth_completed(self) -> None:
        self._logged_in_or_gone()
        cap = self.bastion.settings.ssh_max_connections_per_user
        if self.bastion.logins_of(self.user_id) >= cap:
            self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS,
                                 f"kgpu: you have {cap} SSH connections open, the most one user may; close one")
            return
        self.bastion.logins.add(self)
        TRAFFIC.ssh_login(accepted=True)
        where = self.target.rental_id if self.target else f"(ambiguous: {', '.join(self.choice.rental_ids)})"
        fingerprint = self.target.fingerprint if self.target else "-"
        log.info("ssh login: user %s into %s, key %s, from %s", self.user_id, where, fingerprint, self.address)

    # --- channels ---------------------------------------------------------------------------

    def _take_channel(self) -> None:
        cap = self.bastion.settings.ssh_max_channels_per_connection
        if self.channels >= cap:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE,
                                            f"kgpu: {cap} channels are open on this connection, the most allowed")
        self.channels += 1

    def _release_channel(self) -> None:
        self.channels = max(0, self.channels - 1)

    def _carried(self) -> None:
        self.last_bytes = time.monotonic()

    def session_requested(self):
        self._take_channel()
        return PodProcess(self._session, self._release_channel)

    async def _session(self, process: PodProcess) -> None:
        if isinstance(self.choice, Ambiguous):
            return _refuse(process, self.choice.message)
        target = self.target
        refusal = await self.bastion.blocking(self.bastion.access.still_open, target)
        if refusal:
            return _refuse(process, refusal)
        try:
            command = await self.bastion.blocking(open_session, self.bastion.backend, target.pod_ref, process)
        except PodError as exc:
            return _refuse(process, f"kgpu: cannot enter the pod of {target.rental_id}: {exc}", 255)
        self.sessions_open += 1
        try:
            await run_in_pod(process, command)
        finally:
            self.sessions_open -= 1

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        if isinstance(self.choice, Ambiguous):
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, self.choice.message)
        self._take_channel()
        return self._forward(dest_host, dest_port)

    async def _forward(self, host: str, port: int) -> PodForward:
        target = self.target
        try:
            refusal = await self.bastion.blocking(self.bastion.access.still_open, target)
            if refusal:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, refusal)
            sock = await self.bastion.blocking(self.bastion.backend.connect, target.pod_ref, host, port, CONNECT_TIMEOUT_S)
        except PodError as exc:
            self._release_channel()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, str(exc)) from None
        except (OSError, UnicodeError) as exc:  # UnicodeError: a name IDNA cannot encode (a label over 63 characters)
            self._release_channel()
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"kgpu: {host}:{port} in the pod: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        except BaseException:
            self._release_channel()
            raise
        log.info("ssh forward: user %s in %s to %s:%s", self.user_id, target.rental_id, one_line(host), port)
        self._carried()
        return await open_forward(sock, PodForward(self._carried, self._release_channel))

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False  # -R: a listener the pod's side opens on the bastion; refused


def _refuse(process: PodProcess, message: str, code: int = 1) -> None:
    process.stderr.write((message + "\r\n").encode())
    process.exit(code)
