"""The pod-file channel's own sends and reads (gateway/pods/files.py:Channel), with plain host
processes standing in for the pod: every byte arrives in order whether a send went in at once or
waited for the process to read (the socket's buffer full), and a process that stops reading or
writing is a PodError after the idle deadline, not a wait without end."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from gateway.pods import PodCommand, PodError
from gateway.pods.files import SOCKET_BUFFER, Channel

MiB = 1 << 20


def spawned(script: str, idle_s: float = 10) -> Channel:
    return Channel._spawn(PodCommand(["sh", "-c", script], {"PATH": os.defpath}), idle_s)


def test_a_body_bigger_than_the_buffer_arrives_whole_and_in_order(tmp_path):
    """The process starts reading late, so the first sends fill the buffer and the rest wait on the
    event loop; chunks of several sizes, one of them larger than the buffer itself."""
    received = tmp_path / "received"
    blob = os.urandom(4 * SOCKET_BUFFER + 12345)
    sizes = [1, 65536, 3 * SOCKET_BUFFER, 777, MiB]

    async def main() -> None:
        channel = spawned(f"sleep 1; cat > {received}")
        try:
            at = 0
            for size in sizes * 10:
                if at >= len(blob):
                    break
                await channel.send(blob[at:at + size])
                at += size
            channel.end_input()
            await asyncio.to_thread(channel.process.wait, 30)
        finally:
            await channel.close()

    asyncio.run(main())
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(blob).digest()


def test_a_read_takes_every_byte_the_process_writes_in_order(tmp_path):
    sent = tmp_path / "sent"
    blob = os.urandom(3 * SOCKET_BUFFER + 999)
    sent.write_bytes(blob)

    async def main() -> bytes:
        channel = spawned(f"sleep 0.5; cat {sent}")
        try:
            parts = []
            while chunk := await channel.read(MiB):
                assert len(chunk) <= MiB
                parts.append(chunk)
            return b"".join(parts)
        finally:
            await channel.close()

    assert asyncio.run(main()) == blob


def test_a_process_that_never_reads_is_a_pod_error_after_the_idle_deadline():
    """(Were the wait without end, the process's exit after 60 s would make it "ended early".)"""

    async def main() -> None:
        channel = spawned("exec sleep 60", idle_s=1)
        try:
            with pytest.raises(PodError, match="took no bytes"):
                for _ in range(64):  # far more than the buffer takes
                    await channel.send(b"x" * MiB)
        finally:
            await channel.close()

    asyncio.run(main())


def test_a_process_that_never_writes_is_a_pod_error_after_the_idle_deadline():
    async def main() -> None:
        channel = spawned("exec sleep 60", idle_s=1)
        try:
            with pytest.raises(PodError, match="sent nothing"):
                await channel.read(MiB)
        finally:
            await channel.close()

    asyncio.run(main())


def test_a_process_gone_mid_body_is_a_pod_error():
    async def main() -> None:
        channel = spawned("head -c 1000 >/dev/null")
        try:
            with pytest.raises(PodError, match="ended early"):
                for _ in range(64):
                    await channel.send(b"x" * MiB)
        finally:
            await channel.close()

    asyncio.run(main())


def test_pods_that_take_no_bytes_hold_no_thread():
    """Sixteen pods that stop reading (more than the event loop's default pool has threads on this
    machine) wait on the event loop: a call on that pool still runs before any of them reaches its
    idle deadline. (Were each wait a blocked thread, the call would queue until they timed out.)"""

    async def main() -> None:
        channels = [spawned("exec sleep 60", idle_s=8) for _ in range(16)]

        async def stall(channel: Channel) -> None:
            with pytest.raises(PodError, match="took no bytes"):
                for _ in range(64):
                    await channel.send(b"x" * MiB)

        try:
            stalls = [asyncio.create_task(stall(channel)) for channel in channels]
            await asyncio.sleep(1)  # every buffer filled: each send now waits
            assert await asyncio.to_thread(lambda: "ran") == "ran"
            assert not any(task.done() for task in stalls)
            await asyncio.gather(*stalls)
        finally:
            await asyncio.gather(*(channel.close() for channel in channels))

    asyncio.run(main())
