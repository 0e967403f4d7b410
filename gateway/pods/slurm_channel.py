"""A direct byte channel to a process in a Slurm pod, beside srun's stdio forwarding.

srun carries a step's stdin and stdout in messages of 1 KiB (Slurm's ``MAX_MSG_LEN``), which caps a
transfer at 5-15 MiB/s whatever its options (docs/slurm.md). So a transfer (a pod file, an SSH
session without a terminal) opens a TCP connection of its own from the node to the gateway:

1. The gateway listens on a port of its own, on the address the nodes reach it at
   (KGPU_SLURM_GATEWAY_ADDRESS; without one, on every address, as srun does for its own I/O), and
   starts the step ``bash -c NODE_SCRIPT kgpu ADDRESS PORT docker exec …`` with srun's stdio as before.
2. It writes a one-time secret, the first and only line of the step's stdin: never on a command
   line, in an environment or in a log.
3. On the node, outside the pod's container, the script reads it, connects to ADDRESS (the one the
   listener binds; empty: ``$SLURM_SRUN_COMM_HOST``, the address of the gateway's srun, as
   slurmstepd reaches it) at PORT, says the secret, and runs ``docker exec -i`` with that
   connection as its stdin and stdout. The container gets docker's pipes, never the socket; srun's
   stderr still carries what the step says.
4. The gateway takes the first connection that says the secret and closes the listener. A
   connection that says anything else, or nothing within ``HELLO_S``, is dropped; after
   ``MAX_TRIES`` of them, or ``JOIN_S`` without a join, or once the step has exited, the
   rendezvous has failed: the step is killed and the caller falls back to srun's stdio (logged).

With KGPU_SLURM_GATEWAY_ADDRESS set, the listener is on that address only: not on this host's
loopback nor on its public interfaces. A pod can reach the gateway's address (its API is there), so
it could reach the listener too; it never learns the secret (it has no view of the step's stdin nor
of the node's processes), a guess gets nothing, and the secret dies with the listener once used.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from gateway.pods import PodStream

log = logging.getLogger(__name__)

JOIN_S = 20.0  # the step's start (srun, slurmstepd, bash) and its connection back
HELLO_S = 1.0  # what one connection may take to say the secret
MAX_TRIES = 8  # connections that may try a secret on one listener
SECRET_BYTES = 32

# On the node, before entering the pod: $1 the gateway's address (empty: srun's, as slurmstepd
# reaches it), $2 its port, the rest the command to run with the connection as its stdin and stdout.
# bash for /dev/tcp; its `read` takes one byte at a time from a pipe, so nothing past the secret's
# line is consumed.
NODE_SCRIPT = r"""
IFS= read -r secret || { echo "kgpu channel: no secret on stdin" >&2; exit 97; }
host="${1:-${SLURM_SRUN_COMM_HOST:-}}"
[ -n "$host" ] || { echo "kgpu channel: no gateway address given and SLURM_SRUN_COMM_HOST is not set" >&2; exit 98; }
exec 3<>"/dev/tcp/$host/$2" || { echo "kgpu channel: cannot connect to $host:$2" >&2; exit 98; }
printf '%s\n' "$secret" >&3
secret=
shift 2
exec "$@" <&3 >&3 3<&-
"""


class Rendezvous:
    """A one-time listener and its secret: :meth:`join` answers the first connection that says it.
    ``address``: the only one it listens on, where the nodes reach this host; empty: every address."""

    def __init__(self, address: str = "") -> None:
        self.secret = secrets.token_hex(SECRET_BYTES).encode()
        self.address = address
        self.listener = socket.create_server((address, 0), family=socket.AF_INET, backlog=MAX_TRIES)
        self.port = self.listener.getsockname()[1]

    def join(self, alive: Callable[[], bool], join_s: float = JOIN_S) -> tuple[socket.socket | None, str]:
        """The connection that said the secret, or None and why not; the listener is closed either way."""
        deadline = time.monotonic() + join_s
        tries = 0
        try:
            while tries < MAX_TRIES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, f"nobody joined within {join_s:g} s"
                self.listener.settimeout(min(left, 0.2))
                try:
                    conn, _ = self.listener.accept()
                except (TimeoutError, socket.timeout):
                    if not alive():
                        return None, "the step exited before it joined"
                    continue
                tries += 1
                if self._said_secret(conn, min(HELLO_S, max(0.05, deadline - time.monotonic()))):
                    conn.settimeout(None)
                    return conn, ""
                conn.close()
            return None, f"{MAX_TRIES} connections without the secret"
        finally:
            self.close()

    def _said_secret(self, conn: socket.socket, within: float) -> bool:
        want = len(self.secret) + 1
        heard = b""
        conn.settimeout(within)
        ends = time.monotonic() + within
        try:
            while len(heard) < want and time.monotonic() < ends:
                chunk = conn.recv(want - len(heard))
                if not chunk:
                    break
                heard += chunk
        except OSError:
            return False
        return hmac.compare_digest(heard, self.secret + b"\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()


def open_direct(
    step: Callable[[str, int], list[str]], env: dict[str, str], what: str, address: str = "",
    join_s: float = JOIN_S,
) -> PodStream | None:
    """Listen on ``address`` (see Rendezvous), start ``step(address, port)`` (an srun of NODE_SCRIPT,
    told where to connect) in a session of its own, hand it the secret and wait for its connection.
    None when the rendezvous failed (the step killed, the reason logged): the caller then uses
    srun's stdio."""
    try:
        rendezvous = Rendezvous(address)
    except OSError as exc:  # the address is not (or no longer) this host's
        log.warning("%s: no direct channel (cannot listen on %r: %s); using srun's stdio", what, address, exc)
        return None
    ours, theirs = socket.socketpair()
    try:
        process = subprocess.Popen(
            step(rendezvous.address, rendezvous.port), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=theirs, start_new_session=True,
        )
    except OSError as exc:
        rendezvous.close()
        ours.close()
        log.warning("%s: no direct channel (could not start srun: %s); using srun's stdio", what, exc)
        return None
    finally:
        theirs.close()
    try:
        process.stdin.write(rendezvous.secret + b"\n")
        process.stdin.close()
    except OSError:
        pass  # the step is gone already: join says so
    conn, why = rendezvous.join(lambda: process.poll() is None, join_s)
    if conn is not None:
        return PodStream(process, conn, ours)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    said = b""
    ours.settimeout(0.2)
    with contextlib.suppress(OSError):
        while len(said) < 4096 and (chunk := ours.recv(4096)):
            said += chunk
    ours.close()
    detail = "; ".join(said.decode(errors="replace").strip()[-300:].splitlines())
    log.warning("%s: the direct channel failed (%s%s); using srun's stdio", what, why, f": {detail}" if detail else "")
    return None


__all__ = ["NODE_SCRIPT", "Rendezvous", "open_direct"]
