"""``ssh -L`` and ``-D``: a connection the client asks for, opened from inside the pod's network
(``PodBackend.connect``), its bytes carried both ways with flow control on each side."""

from __future__ import annotations

import asyncio
import socket
import warnings
from typing import Callable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asyncssh


class _PodSide(asyncio.Protocol):
    """The socket into the pod."""

    def __init__(self, forward: "PodForward"):
        self.forward = forward
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.forward.carried()
        if self.forward.chan is None:
            self.early.append(data)
        else:
            self.forward.chan.write(data)

    def eof_received(self) -> bool:
        if self.forward.chan is None:
            self.early_eof = True
        else:
            self.forward.chan.write_eof()
        return True  # half-closed: the client may still send

    def connection_lost(self, exc) -> None:
        if self.forward.chan is not None:
            self.forward.chan.close()

    def pause_writing(self) -> None:  # the pod reads slower than the client sends
        if self.forward.chan is not None:
            self.forward.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.forward.chan is not None:
            self.forward.chan.resume_reading()


class PodForward(asyncssh.SSHTCPSession):
    """The channel's side."""

    def __init__(self, carried: Callable[[], None], released: Callable[[], None]):
        self.chan = None
        self.carried = carried
        self.released = released
        self.pod: _PodSide | None = None

    def connection_made(self, chan) -> None:
        self.chan = chan
        for data in self.pod.early:
            chan.write(data)
        if self.pod.early_eof:
            chan.write_eof()

    def data_received(self, data: bytes, datatype) -> None:
        self.carried()
        self.pod.transport.write(data)

    def eof_received(self) -> bool:
        if self.pod.transport.can_write_eof():
            self.pod.transport.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        self.pod.transport.close()
        self.released()

    def pause_writing(self) -> None:  # the client reads slower than the pod sends
        self.pod.transport.pause_reading()

    def resume_writing(self) -> None:
        self.pod.transport.resume_reading()


async def open_forward(sock: socket.socket, forward: PodForward) -> PodForward:
    """``forward`` joined to ``sock`` (already connected in the pod)."""
    sock.setblocking(False)
    _, pod_side = await asyncio.get_running_loop().connect_accepted_socket(lambda: _PodSide(forward), sock)
    forward.pod = pod_side
    return forward
