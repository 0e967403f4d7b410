"""The slurm backend's direct channel (gateway/pods/slurm_channel.py): its one-time listener and
secret on this host, without Slurm (NODE_SCRIPT run by bash here, as srun runs it on a node).
Through a real cluster: tests/test_slurm.py (a pod that races the listener and replays the secret)."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
import uuid

import pytest

from gateway.pods import slurm_channel
from gateway.pods.slurm_channel import MAX_TRIES, NODE_SCRIPT, Rendezvous, open_direct

LOCAL_NODE = {"PATH": "/usr/bin:/bin", "SLURM_SRUN_COMM_HOST": "127.0.0.1"}  # what slurmstepd sets


def say(port: int, words: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(words)
    return sock


def join_in_thread(rendezvous: Rendezvous, join_s: float = 5) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(rendezvous.join(lambda: True, join_s)))
    thread.start()
    return thread, result


def joined(thread: threading.Thread, result: list, ours: socket.socket) -> socket.socket:
    """The gateway's end of the join, checked to carry bytes from ``ours``."""
    thread.join(10)
    conn, why = result[0]
    assert conn is not None, why
    ours.sendall(b"ping")
    assert conn.recv(4) == b"ping"
    return conn


def echoed(stream, payload: bytes, wait_s: float) -> None:
    """``payload`` sent into a step that runs ``cat`` comes back whole, and the step exits 0."""
    stream.data.sendall(payload)
    stream.data.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := stream.data.recv(1 << 20):
        got += chunk
    assert got == payload
    assert stream.process.wait(wait_s) == 0


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_secret_joins_and_the_listener_closes_at_once():
    rendezvous = Rendezvous()
    thread, result = join_in_thread(rendezvous)
    ours = say(rendezvous.port, rendezvous.secret + b"\n")
    joined(thread, result, ours).close()
    ours.close()
    assert refused(rendezvous.port)  # the secret cannot be said again


def test_guesses_get_nothing_and_do_not_stop_the_join():
    rendezvous = Rendezvous()
    guesses = [say(rendezvous.port, b"0" * len(rendezvous.secret) + b"\n"), say(rendezvous.port, b"hello\n"),
               say(rendezvous.port, rendezvous.secret[:-1] + b"\n")]
    thread, result = join_in_thread(rendezvous)
    for sock in guesses:  # each was dropped without a byte
        sock.settimeout(5)
        assert sock.recv(10) == b""
    real = say(rendezvous.port, rendezvous.secret + b"\n")
    conn = joined(thread, result, real)
    for sock in (conn, real, *guesses):
        sock.close()


def test_a_silent_connection_is_dropped_after_its_hello_time():
    rendezvous = Rendezvous()
    silent = socket.create_connection(("127.0.0.1", rendezvous.port), timeout=5)
    thread, result = join_in_thread(rendezvous)
    time.sleep(slurm_channel.HELLO_S + 0.5)
    real = say(rendezvous.port, rendezvous.secret + b"\n")
    conn = joined(thread, result, real)
    assert silent.recv(1) == b""
    for sock in (silent, real, conn):
        sock.close()


def test_too_many_wrong_tries_end_the_rendezvous():
    rendezvous = Rendezvous()
    guesses = [say(rendezvous.port, b"nope\n" + b" " * len(rendezvous.secret)) for _ in range(MAX_TRIES)]
    conn, why = rendezvous.join(lambda: True, 10)
    assert conn is None and "without the secret" in why
    assert refused(rendezvous.port)
    for sock in guesses:
        sock.close()


@pytest.mark.parametrize("alive, join_s, reason", [
    (True, 0.5, "nobody joined within 0.5 s"),  # a listener nobody joins is closed at its deadline
    (False, 600, "the step exited before it joined"),  # a step gone ends the wait, long before it
])
def test_a_rendezvous_without_a_join_ends_and_closes_its_listener(alive, join_s, reason):
    rendezvous = Rendezvous()
    assert rendezvous.join(lambda: alive, join_s) == (None, reason)
    assert refused(rendezvous.port)


def test_the_node_script_carries_the_process_stdio_and_keeps_the_secret_off_its_command_line(monkeypatch):
    made: list[Rendezvous] = []

    class Recorded(Rendezvous):
        def __init__(self, address: str = ""):
            super().__init__(address)
            made.append(self)

    monkeypatch.setattr(slurm_channel, "Rendezvous", Recorded)
    seen: list[list[str]] = []

    def step(address: str, port: int) -> list[str]:
        seen.append(["bash", "-c", NODE_SCRIPT, "kgpu", address, str(port), "sh", "-c", "cat; echo end >&2"])
        return seen[-1]

    stream = open_direct(step, LOCAL_NODE, "test")
    assert stream is not None
    try:
        echoed(stream, b"x" * (4 << 20), 10)
        stream.stderr.settimeout(5)
        assert stream.stderr.recv(100) == b"end\n"
    finally:
        stream.data.close()
        stream.stderr.close()
    secret = made[0].secret.decode()
    assert len(secret) == 64 and not any(secret in arg for arg in seen[0])
    assert secret not in "".join(LOCAL_NODE.values())


def test_a_failed_rendezvous_kills_the_step_and_says_so(caplog):
    caplog.set_level(logging.WARNING, logger=slurm_channel.__name__)
    node = {**LOCAL_NODE, "SLURM_SRUN_COMM_HOST": "127.0.0.1"}

    def nowhere(address: str, port: int) -> list[str]:  # connects to a port where nobody listens
        with socket.create_server(("127.0.0.1", 0)) as other:
            closed = other.getsockname()[1]
        return ["bash", "-c", NODE_SCRIPT, "kgpu", address, str(closed), "cat"]

    assert open_direct(nowhere, node, "slurm pod 1/x") is None
    assert "slurm pod 1/x: the direct channel failed" in caplog.text
    assert "cannot connect" in caplog.text and "using srun's stdio" in caplog.text


def test_a_step_that_never_connects_is_killed_at_the_deadline():
    marker = f"kgpu-channel-test-{uuid.uuid4().hex}"
    never = ["sh", "-c", f"sleep 60; : {marker}"]
    assert open_direct(lambda address, port: never, LOCAL_NODE, "test", join_s=0.5) is None
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).stdout == b""


@pytest.mark.parametrize("missing", ["SLURM_SRUN_COMM_HOST"])
def test_without_the_srun_address_the_step_says_why(missing, caplog):
    caplog.set_level(logging.WARNING, logger=slurm_channel.__name__)
    env = {k: v for k, v in LOCAL_NODE.items() if k != missing}

    def step(address: str, port: int) -> list[str]:
        return ["bash", "-c", NODE_SCRIPT, "kgpu", address, str(port), "cat"]

    assert open_direct(step, env, "t") is None
    assert "SLURM_SRUN_COMM_HOST is not set" in caplog.text


def test_the_listener_binds_only_the_nodes_address_and_the_transfer_still_flows(monkeypatch):
    """Nodes that reach this host at 127.0.0.2 (10.77.0.1 on the test cluster): while a transfer's
    listener is open, its port on another address of this host (127.0.0.1) refuses, and the step,
    told that address (not SLURM_SRUN_COMM_HOST), joins."""
    seen: list = []

    class Knocked(Rendezvous):
        def __init__(self, address: str = ""):
            super().__init__(address)
            seen.append((self.listener.getsockname(), refused(self.port)))

    monkeypatch.setattr(slurm_channel, "Rendezvous", Knocked)
    node = {"PATH": "/usr/bin:/bin"}
    stream = open_direct(lambda address, port: ["bash", "-c", NODE_SCRIPT, "kgpu", address, str(port), "cat"],
                         node, "test", "127.0.0.2")
    assert stream is not None
    try:
        echoed(stream, b"z" * (1 << 20), 10)
    finally:
        stream.data.close()
        stream.stderr.close()
    [((address, port), elsewhere_refused)] = seen
    assert (address, elsewhere_refused) == ("127.0.0.2", True)


def test_an_address_this_host_does_not_have_falls_back_to_srun_without_a_step(caplog):
    caplog.set_level(logging.WARNING, logger=slurm_channel.__name__)
    started: list = []
    assert open_direct(lambda address, port: started.append(port) or ["true"], LOCAL_NODE, "t", "192.0.2.1") is None
    assert started == [] and "no direct channel (cannot listen on '192.0.2.1'" in caplog.text


def test_without_the_nodes_address_the_listener_binds_every_address_and_the_backend_says_so(caplog):
    from gateway.pods.slurm import SlurmPodBackend

    caplog.set_level(logging.WARNING, logger="gateway.pods.slurm")
    SlurmPodBackend(gateway_address="10.77.0.1")
    SlurmPodBackend(direct_channel=False)
    assert "KGPU_SLURM_GATEWAY_ADDRESS is not set" not in caplog.text
    SlurmPodBackend()
    assert caplog.text.count("KGPU_SLURM_GATEWAY_ADDRESS is not set: the direct channel's one-time listeners bind") == 1
    rendezvous = Rendezvous()
    assert rendezvous.listener.getsockname()[0] == "0.0.0.0"
    rendezvous.close()
