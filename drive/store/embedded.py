"""The embedded object store: ``rclone serve s3`` over a local directory.

With no S3 configured, ``kgpu serve`` runs this child process on a loopback
port. Its keys and its port are chosen once and kept in the data directory
(``embedded-s3.json``), so data, credentials and presigned URLs survive a
restart. A supervisor thread restarts the child within about a second if it
dies; while it is down, every store call raises ``StoreUnavailable`` at once
(drive routes answer 503 with Retry-After) instead of reaching a dead port.
The child is tied to the thread that started it with PR_SET_PDEATHSIG, so even
a SIGKILLed server leaves no store behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from drive.rclone import rclone_binary
from drive.store import StoreUnavailable
from drive.store.s3 import S3ObjectStore

log = logging.getLogger("kgpu")

RESTART_BACKOFF_S = (0.5, 10.0)  # first and longest wait between restarts of a store that keeps dying
STABLE_AFTER_S = 10.0  # a store up this long that dies is restarted at once, the back-off reset


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """SIGTERM to this process when the thread that started it ends (its process killed, even)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _store_child() -> None:
    """In ``rclone serve s3`` before it runs: it dies with its parent, and what it writes (the
    drives' files, its folders) is its owner's alone: umask 077 makes them 0600 and 0700."""
    os.umask(0o077)
    die_with_parent()


def port_is_free(host: str, port: int) -> bool:
    """Whether ``rclone serve s3`` could listen on ``host:port`` now (it, too, sets SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def choose_port(host: str) -> int:
    """A free port to keep for good: below the kernel's ephemeral range where there is room, so the
    system does not hand it to an outgoing connection while the store is down."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low > 11_000:
        for _ in range(50):
            port = random.randrange(10_000, low)
            if port_is_free(host, port):
                return port
    return free_port(host)


def _read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(path: Path, state: dict) -> None:
    """Replace the state file in one step, never readable by others (it holds the store's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(state))
    os.chmod(partial, 0o600)
    os.replace(partial, path)


@dataclass(frozen=True)
class EmbeddedCredentials:
    access_key: str
    secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> "EmbeddedCredentials":
        state = _read_state(path)
        if "access_key" in state:
            return cls(state["access_key"], state["secret_key"])
        creds = cls("kgpu" + secrets.token_hex(8), secrets.token_hex(20))
        _write_state(path, {**state, "access_key": creds.access_key, "secret_key": creds.secret_key})
        return creds


class ExitWatch:
    """Whether a process still runs, read without a system call: every presigned URL asks (a
    syscall there cost the download's 302 about 5 µs of its ~60). A thread waits on the process's
    pidfd and clears :attr:`alive` as it exits, before anyone can reap it; the watch owns the pidfd."""

    def __init__(self, pidfd: int):
        self.alive = True
        self._pidfd = pidfd
        self._closed = threading.Event()
        threading.Thread(target=self._wait, name="embedded-s3-exit-watch", daemon=True).start()

    def _wait(self) -> None:
        exited = select.poll()
        exited.register(self._pidfd, select.POLLIN)
        try:
            while not self._closed.is_set() and not exited.poll(200):
                pass
        finally:
            self.alive = False
            os.close(self._pidfd)

    def close(self) -> None:
        """Stop watching (the fd is closed by the thread, within 0.2 s)."""
        self.alive = False
        self._closed.set()

    @classmethod
    def of(cls, pid: int) -> "ExitWatch | None":
        """A watch of ``pid``; None when it is gone already."""
        try:
            return cls(os.pidfd_open(pid))
        except OSError:
            return None


class EmbeddedS3Server:
    """``port`` 0: the port kept in ``embedded-s3.json`` (chosen on the first start); any other
    port is used as given and not kept."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(data_dir) / "objects"
        self.state_path = Path(data_dir) / "embedded-s3.json"
        self.credentials = EmbeddedCredentials.load_or_create(self.state_path)
        self.host = host
        self.explicit_port = port
        self.port = port or self._kept_port()
        self.log_path = Path(data_dir) / "embedded-s3.log"
        self.restarts = 0
        self._process: subprocess.Popen | None = None
        self._exit: ExitWatch | None = None
        self._serving = False
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def _kept_port(self) -> int:
        state = _read_state(self.state_path)
        port = state.get("port")
        if not isinstance(port, int) or not 0 < port < 65536:
            port = choose_port(self.host)
            _write_state(self.state_path, {**state, "port": port})
        return port

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def serving(self) -> bool:
        """Started, answering, and not exited since (its exit is seen at once, not at the
        supervisor's next look)."""
        exit = self._exit
        return self._serving and exit is not None and exit.alive

    def start(self, timeout: float = 15.0) -> str:
        if not self.explicit_port and not self._wait_port_free(3.0):
            taken = self.port
            self.port = choose_port(self.host)
            _write_state(self.state_path, {**_read_state(self.state_path), "port": self.port})
            log.warning(
                "embedded object store: port %d (kept in %s) is taken by another program; listening on %d "
                "instead and keeping that port from now on. Presigned URLs and rclone remotes that name "
                "port %d no longer reach the store; set KGPU_EMBEDDED_S3_PORT to pin a port.",
                taken, self.state_path, self.port, taken,
            )
        return self._start_process(timeout)

    def _wait_port_free(self, seconds: float) -> bool:
        """Whether the port is free, waiting a little for a previous store (of a server killed a
        moment ago) to let it go."""
        deadline = time.monotonic() + seconds
        while not port_is_free(self.host, self.port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _start_process(self, timeout: float = 15.0) -> str:
        self._serving = False
        # Other users of the host read nothing of the store (gateway/data_dir.py): its root is
        # 0700 (an older server's 0755 closed too), its files 0600 (umask 077, _store_child).
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_mode & 0o077:
            self.root.chmod(0o700)
        creds = self.credentials
        command = [
            rclone_binary(),
            "serve",
            "s3",
            "--config",
            os.devnull,
            "--addr",
            f"{self.host}:{self.port}",
            "--log-level",
            "NOTICE",
            str(self.root),
        ]
        log_file = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        # The keys travel in rclone's environment (RCLONE_AUTH_KEY is its --auth-key), never on its
        # command line, which every process on the host can read. rclone reads a list flag from the
        # environment as CSV: the pair is quoted to stay one entry.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RCLONE_AUTH_KEY": f'"{creds.access_key},{creds.secret_key}"'}
        self._process = process = subprocess.Popen(
            command, stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, preexec_fn=_store_child, env=env
        )
        log_file.close()
        if self._exit is not None:
            self._exit.close()
        self._exit = ExitWatch.of(process.pid)  # not reaped before this: only this process waits for it
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited early on {self.host}:{self.port}; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint_url + "/", timeout=1)
            except urllib.error.HTTPError:
                pass  # any HTTP answer (403 without auth) means it is serving
            except OSError:
                time.sleep(0.05)
                continue
            self._serving = True
            # The worker processes of `kgpu serve --workers N` follow the store by its pid (AttachedS3Server).
            _write_state(self.state_path, {**_read_state(self.state_path), "pid": process.pid})
            return self.endpoint_url
        self._kill(process)
        raise RuntimeError(f"rclone serve s3 did not start within {timeout}s")

    def supervise(self) -> None:
        """Restart the store whenever it dies, on the same port, until :meth:`stop`. The thread
        starts each new store itself and lives until then (PR_SET_PDEATHSIG follows the thread)."""
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._watch, name="embedded-s3-supervisor", daemon=True)
            self._supervisor.start()

    def _watch(self) -> None:
        backoff = RESTART_BACKOFF_S[0]
        started = time.monotonic()
        while not self._stopping.wait(0.2):
            process = self._process
            if process is not None and process.poll() is None:
                continue
            self._serving = False
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_S[0]
            else:  # it keeps dying: wait longer each time
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, RESTART_BACKOFF_S[1])
            why = f"exited with status {process.returncode}" if process is not None else "is not running"
            if not port_is_free(self.host, self.port):
                log.error(
                    "embedded object store %s and cannot restart: port %d is taken by another program; "
                    "drive routes answer 503 until it is free (next try in %.1fs)", why, self.port, backoff,
                )
                started = time.monotonic()
                continue
            log.warning("embedded object store (rclone serve s3) %s; restarting it on port %d", why, self.port)
            try:
                self._start_process()
            except Exception as exc:
                log.error("embedded object store did not restart (%s); next try in %.1fs", exc, backoff)
            else:
                self.restarts += 1
                log.warning("embedded object store restarted at %s (restart %d)", self.endpoint_url, self.restarts)
            started = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=20)
        self._serving = False
        process, self._process = self._process, None
        if process is not None:
            self._kill(process)
        if self._exit is not None:
            self._exit.close()

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class AttachedS3Server:
    """The embedded store as a worker process of ``kgpu serve --workers N`` sees it: the server's
    parent process starts and supervises the one ``rclone serve s3`` (:class:`EmbeddedS3Server`), which
    writes the pid of each store it starts, once it answers, into ``embedded-s3.json``. A worker
    watches that process by its pidfd (:class:`ExitWatch`): its exit is seen at once, as in the parent, and
    the next store is followed within :data:`FOLLOW_INTERVAL_S` of its start."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(data_dir) / "objects"
        self.state_path = Path(data_dir) / "embedded-s3.json"
        self.credentials = EmbeddedCredentials.load_or_create(self.state_path)
        self.host = host
        self.port = port or _read_state(self.state_path)["port"]
        self._exit: ExitWatch | None = None
        self._stopping = threading.Event()
        self._follower: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def serving(self) -> bool:
        """The store's process has not exited (its :class:`ExitWatch`)."""
        exit = self._exit
        return exit is not None and exit.alive

    def follow(self) -> None:
        """Attach to the store now, and to each one the parent starts after it, until :meth:`stop`."""
        self._attach()
        if self._follower is None:
            self._follower = threading.Thread(target=self._follow, name="embedded-s3-follower", daemon=True)
            self._follower.start()

    def _follow(self) -> None:
        while not self._stopping.wait(FOLLOW_INTERVAL_S):
            if not self.serving:
                self._attach()

    def _attach(self) -> None:
        pid = _read_state(self.state_path).get("pid")
        if not isinstance(pid, int):
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already: the parent writes the next one's pid when it answers
            return
        try:  # the pid is pinned by the pidfd from here on: make sure it is this data directory's store
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            command = []
        if command[1:3] != [b"serve", b"s3"] or os.fsencode(self.root) not in command:
            os.close(pidfd)
            return
        old, self._exit = self._exit, ExitWatch(pidfd)
        if old is not None:
            old.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._follower is not None:
            self._follower.join(timeout=5)
        watch, self._exit = self._exit, None
        if watch is not None:
            watch.close()


FOLLOW_INTERVAL_S = 0.2


class EmbeddedStore(S3ObjectStore):
    """The S3 store over a supervised :class:`EmbeddedS3Server`: while the server is down, every
    call and every presigned URL fails at once with ``StoreUnavailable`` (503 with Retry-After)
    rather than a redirect to, or a connection with, whatever holds its port then."""

    # rclone serve s3 lists the MD5 of an object's file as its ETag, however the object was made
    # (it reads the file to compute it, on each HEAD and listing).
    multipart_etag_is_md5 = True

    def __init__(self, server: EmbeddedS3Server | AttachedS3Server, *args, **kwargs):
        self.server = server
        super().__init__(*args, **kwargs)

    def _down(self) -> StoreUnavailable:
        return StoreUnavailable("object store restarting; try again in a few seconds")

    @property
    def serving(self) -> bool:
        return self.server.serving

    @property
    def _client(self):
        if not self.server.serving:
            raise self._down()
        return self.__dict__["_client"]

    @_client.setter
    def _client(self, client) -> None:
        self.__dict__["_client"] = client

    def presign_get(self, key: str, expires_in: int, content_type: str | None = None) -> str:
        if not self.server.serving:
            raise self._down()
        return super().presign_get(key, expires_in, content_type)

    def presign_put(
        self, key: str, expires_in: int, content_length: int | None = None, content_md5: str | None = None
    ) -> str:
        if not self.server.serving:
            raise self._down()
        return super().presign_put(key, expires_in, content_length, content_md5)

    def presign_part(
        self, key: str, upload_id: str, number: int, expires_in: int, content_length: int, content_md5: str | None = None
    ) -> str:
        if not self.server.serving:
            raise self._down()
        return super().presign_part(key, upload_id, number, expires_in, content_length, content_md5)
