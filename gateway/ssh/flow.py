"""A fix to asyncssh's receive window (2.24), applied once when the bastion loads.

An asyncssh channel counts received data against its window as it arrives, queues it while its
session has paused reading, and on the next delivery grants the client a whole new window, though
the queued data is still unread. A client that sends faster than the pod reads (an upload) thus
gets a new window per pause: the queue grew to 188 MiB of a 256 MiB ``cat > /dev/null`` upload
(measured). Here a window is granted only for what was delivered: the data still queued counts
as outstanding.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from asyncssh.channel import SSHChannel
    from asyncssh.constants import MSG_CHANNEL_WINDOW_ADJUST
    from asyncssh.packet import UInt32

_deliver = SSHChannel._deliver_data


def _deliver_data(self, data, datatype) -> None:
    queued = sum(len(item[0]) for item in self._recv_buf)  # received, not yet delivered
    if self._recv_window + queued < self._init_recv_window / 2:
        adjust = self._init_recv_window - self._recv_window - queued
        self.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(adjust))
        self._recv_window += adjust
    # asyncssh's own delivery, with its window check kept from firing (the window is ours)
    window, self._recv_window = self._recv_window, self._init_recv_window
    try:
        _deliver(self, data, datatype)
    finally:
        self._recv_window = window


def install() -> None:
    if SSHChannel._deliver_data is not _deliver_data:
        SSHChannel._deliver_data = _deliver_data
