"""gateway/ssh/flow.py: the bastion grants a client window only for data its pod has taken."""

from __future__ import annotations

from gateway.ssh import flow

flow.install()
from asyncssh.channel import SSHChannel  # noqa: E402


class Session:
    def __init__(self):
        self.got = []

    def data_received(self, data, datatype):
        self.got.append(data)


def channel(window: int, left: int, queued: list[bytes]) -> tuple[SSHChannel, list[int], Session]:
    chan = object.__new__(SSHChannel)
    grants: list[int] = []
    chan._init_recv_window, chan._recv_window = window, left
    chan._recv_buf = [(data, None) for data in queued]
    chan._encoding, chan._session = None, Session()
    chan.send_packet = lambda kind, payload: grants.append(int.from_bytes(payload, "big"))
    return chan, grants, chan._session


def test_data_still_queued_is_not_granted_again():
    # A 1000-byte window, all of it sent: 900 bytes wait in the queue while 100 are delivered.
    chan, grants, session = channel(1000, 0, [b"q" * 900])
    chan._deliver_data(b"d" * 100, None)
    assert session.got == [b"d" * 100]
    assert grants == []  # asyncssh alone granted 1000 here: the queued 900 bytes a second time
    # once less than half a window waits, the client gets back what was delivered, no more
    chan._recv_buf = [(b"q" * 400, None)]
    chan._deliver_data(b"d" * 500, None)
    assert grants == [600] and chan._recv_window + 400 == 1000


def test_a_drained_queue_grants_the_whole_window():
    chan, grants, _ = channel(1000, 0, [])
    chan._deliver_data(b"d" * 10, None)
    assert grants == [1000] and chan._recv_window == 1000


def test_no_grant_while_half_the_window_is_left():
    chan, grants, _ = channel(1000, 600, [])
    chan._deliver_data(b"d", None)
    assert grants == [] and chan._recv_window == 600
