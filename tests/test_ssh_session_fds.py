"""gateway/ssh/pod_session.py, on asyncio's loop and on uvloop: many sessions at once (commands
and shells, with a terminal and without) lose no byte and close no descriptor but their own,
while other threads of the process open and close descriptors (as the gateway's worker threads do).

The sessions are the bastion's own code (PodProcess, run_in_pod) behind an in-process asyncssh
server; the "pod" is a host shell, so no backend is needed."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import warnings

import pytest

uvloop = pytest.importorskip("uvloop")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asyncssh

from gateway.pods import PodCommand
from gateway.ssh.pod_session import PodProcess, run_in_pod

SESSIONS = 240
AT_ONCE = 24


class Sentinels:
    """Threads opening pipes and closing them while the sessions run: each pipe is checked to be
    still the same pipe (its inode) before it is closed, and those kept open are checked at the end."""

    def __init__(self, threads: int = 3):
        self.stop = threading.Event()
        self.lost: list[str] = []
        self.kept: list[tuple[int, int]] = []
        self._threads = [threading.Thread(target=self._churn, daemon=True) for _ in range(threads)]

    def _churn(self) -> None:
        mine: list[tuple[int, int]] = []
        while not self.stop.is_set():
            read_end, write_end = os.pipe()
            mine += [(read_end, os.fstat(read_end).st_ino), (write_end, os.fstat(write_end).st_ino)]
            if len(mine) > 64:
                for fd, inode in mine[:2]:
                    if self._same(fd, inode):
                        os.close(fd)
                del mine[:2]
        self.kept += mine

    def _same(self, fd: int, inode: int) -> bool:
        try:
            if os.fstat(fd).st_ino == inode:
                return True
            self.lost.append(f"descriptor {fd} is another file now")
        except OSError as exc:
            self.lost.append(f"descriptor {fd} was closed by someone else ({exc.strerror})")
        return False

    def __enter__(self) -> "Sentinels":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()
        for fd, inode in self.kept:
            if self._same(fd, inode):
                os.close(fd)


class Door(asyncssh.SSHServer):
    """Lets anyone in; every session runs its command (a shell when none) on this host."""

    def begin_auth(self, username: str) -> bool:
        return False

    def session_requested(self):
        return PodProcess(self._session, lambda: None)

    async def _session(self, process: PodProcess) -> None:
        argv = ["sh", "-c", process.command] if process.command else ["sh"]
        await run_in_pod(process, PodCommand(argv=argv, env={"PATH": os.environ["PATH"], "LC_ALL": "C"}))


def _payload(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (1 + 512 * (i % 5))  # 32 B to 80 KiB


async def _one(conn: asyncssh.SSHClientConnection, i: int) -> None:
    data = _payload(i)
    kind = i % 4
    if kind == 0:  # a command: stdin through to stdout, and its stderr
        result = await conn.run("cat; echo done >&2", input=data, encoding=None)
        assert (result.stdout, result.stderr, result.exit_status) == (data, b"done\n", 0), i
    elif kind == 1:  # a shell without a terminal, its script on stdin
        script = f"head -c {len(data)} /dev/zero | tr '\\0' y; echo $((6 * 7)) >&2; exit 3\n"
        result = await conn.run(input=script.encode(), encoding=None)
        assert (result.stdout, result.stderr, result.exit_status) == (b"y" * len(data), b"42\n", 3), i
    elif kind == 2:  # a command on a terminal
        result = await conn.run(f"head -c {len(data)} /dev/zero | tr '\\0' x", term_type="xterm", encoding=None)
        assert result.stdout == b"x" * len(data) and result.exit_status == 0, (i, len(result.stdout))
    else:  # a shell on a terminal: what it prints, not what it echoes
        result = await conn.run(term_type="xterm", input=b"echo $((6 * 7))ok; exit 5\n", encoding=None)
        assert b"42ok" in result.stdout and result.exit_status == 5, (i, result.stdout)


async def _sessions(host_key) -> None:
    server = await asyncssh.listen("127.0.0.1", 0, server_factory=Door, server_host_keys=[host_key],
                                   encoding=None, line_editor=False, allow_scp=False)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, username="t", known_hosts=None, client_keys=None,
                                    agent_path=None, preferred_auth="none") as conn:
            gate = asyncio.Semaphore(AT_ONCE)

            async def bounded(i: int) -> None:
                async with gate:
                    await asyncio.wait_for(_one(conn, i), 120)

            await asyncio.gather(*(bounded(i) for i in range(SESSIONS)))
    finally:
        server.close()
        await server.wait_closed()


# The bastion's own loop is asyncio's; uvloop is what `kgpu serve` runs the application on.
@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_many_sessions_lose_nothing_and_close_only_their_own_descriptors(run):
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    with Sentinels() as sentinels:
        run(_sessions(host_key))
    assert sentinels.lost == []


def test_sessions_on_a_direct_channel_hold_no_thread_while_they_run():
    """A session whose host command came from ``PodBackend.stream`` (slurm's direct channel) is
    awaited on the event loop: sixteen of them running (more than the loop's default pool has
    threads here) leave that pool free for a call, answered before any of them has ended."""
    import subprocess

    from gateway.ssh.pod_session import _Held

    async def main() -> None:
        held = [_Held(subprocess.Popen(["sleep", "5"])) for _ in range(16)]
        waits = [asyncio.ensure_future(h.wait()) for h in held]
        await asyncio.sleep(0.5)
        assert await asyncio.to_thread(lambda: "ran") == "ran"
        assert not any(w.done() for w in waits)
        assert await asyncio.gather(*waits) == [0] * 16

    asyncio.run(main())
