"""A local pod's only way out: TCP relays from the pod's network namespace to the endpoints it
is told about (the API base and the object store), and nothing else.

A local pod has its own network namespace (bubblewrap ``--unshare-net``: a loopback device and
no route), so it cannot reach the host's loopback services (a database with trust auth, the
store's admin side, anything else listening on 127.0.0.1). For each allowed ``host:port`` this
process listens on that same address *inside* the pod's namespace (adding the address to the
pod's loopback when it is not 127.0.0.1) and connects to it *on the host*, so the URLs a pod is
given (``KGPU_API_BASE``, presigned URLs) work unchanged.

It is started by the local backend as root, one per pod, in its own session (it outlives a
restarted gateway, as the pod does)::

    python -m gateway.pods.relay HOLDER_PID HOLDER_START UID HOST:PORT [HOST:PORT...]

and, once its listening sockets exist, drops to ``UID`` (the pod's) with no capabilities. It
exits when the pod's sandbox (``HOLDER_PID``, started at ``HOLDER_START``) is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import encodings.idna  # noqa: F401 - imported while it can be: the pod's uid may not read the stdlib's folder
import fcntl
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time

from gateway.pods.sandbox import process_start

CLONE_NEWNET = 0x40000000
F_SETPIPE_SZ = 1031


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")


def listen_in_namespace(netns_path: str, endpoints: list[tuple[str, int]]) -> list[socket.socket]:
    """Listening sockets for ``endpoints`` inside the network namespace at ``netns_path``.
    Only this thread enters it (setns affects the calling thread), and it comes back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    listeners = []
    try:
        _setns(target)
        try:
            for host, port in endpoints:
                if not ipaddress.ip_address(host).is_loopback:
                    # The pod's loopback takes the address, so the URL it was given works as is.
                    subprocess.run(["ip", "addr", "add", f"{host}/32", "dev", "lo"], capture_output=True)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                listener = socket.socket(family, socket.SOCK_STREAM)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((host, port))
                listener.listen(128)
                listeners.append(listener)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return listeners


def connect_in_namespace(netns_fd: int, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` from inside the network namespace ``netns_fd`` (an SSH
    forward into a pod). The socket is made in there, which ties it to that namespace for good,
    by this thread alone, which comes back at once; the connect happens after."""
    address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(netns_fd)
        try:
            sock = socket.socket(address[0], socket.SOCK_STREAM)
        finally:
            _setns(own)
    finally:
        os.close(own)
    try:
        sock.settimeout(timeout)
        sock.connect(address[4])
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Bytes from ``source`` to ``target`` until the end, through a pipe with splice(2): the
    kernel moves them, this process never copies them."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, F_SETPIPE_SZ, 1 << 20)
    try:
        while chunk := os.splice(source.fileno(), write_end, 1 << 20):
            while chunk:
                chunk -= os.splice(read_end, target.fileno(), chunk)
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)


def _connect(inside: socket.socket, host: str, port: int) -> None:
    with inside:
        try:
            outside = socket.create_connection((host, port), timeout=10)
        except OSError:
            return
        with outside:
            outside.settimeout(None)
            back = threading.Thread(target=_pump, args=(outside, inside), daemon=True)
            back.start()
            _pump(inside, outside)
            back.join()


def _accept(listener: socket.socket, host: str, port: int) -> None:
    while True:
        try:
            inside, _ = listener.accept()
        except OSError:
            continue
        threading.Thread(target=_connect, args=(inside, host, port), daemon=True).start()


def serve(listeners: list[socket.socket], endpoints: list[tuple[str, int]], holder: int, started: str) -> None:
    """A thread per listener and two per connection; returns when the pod's sandbox is gone."""
    for listener, (host, port) in zip(listeners, endpoints):
        threading.Thread(target=_accept, args=(listener, host, port), daemon=True).start()
    while process_start(holder) == started:
        time.sleep(1)


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str]) -> int:
    holder, started, uid, *targets = argv
    endpoints = [parse_endpoint(t) for t in targets]
    listeners = listen_in_namespace(f"/proc/{int(holder)}/ns/net", endpoints)
    drop_privileges(int(uid))
    print("listening", flush=True)  # the backend waits for this line before the pod is used
    serve(listeners, endpoints, int(holder), started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
