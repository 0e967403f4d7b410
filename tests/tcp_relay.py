"""TCP forwarding for tests that stand between a client and a server: to cut connections, to count
what crosses, or to play a proxy."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def relay(source: socket.socket, sink: socket.socket, seen: Callable[[bytes], None] | None = None) -> None:
    """What ``source`` sends, on to ``sink`` (``seen`` told of each block first) until either end
    closes; then both are shut down, so the other direction ends too."""
    try:
        while data := source.recv(1 << 16):
            if seen is not None:
                seen(data)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Forwarder:
    """Every connection made to :attr:`port` (127.0.0.1) forwarded to ``upstream_port``, a thread
    for each direction; :meth:`forward` is where a subclass looks at or keeps a connection."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.forward(client, socket.create_connection(("127.0.0.1", self.upstream_port)))

    def forward(self, client: socket.socket, upstream: socket.socket,
                up: Callable[[bytes], None] | None = None, down: Callable[[bytes], None] | None = None) -> None:
        """Relay ``client`` to ``upstream`` (``up`` told of what goes up) and back (``down``)."""
        threading.Thread(target=relay, args=(client, upstream, up), daemon=True).start()
        threading.Thread(target=relay, args=(upstream, client, down), daemon=True).start()

    def close(self) -> None:
        self.listener.close()
