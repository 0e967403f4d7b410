"""A session channel as a process in the pod: a command (``ssh host CMD``, scp, rsync), a shell
with or without a terminal, or the ``sftp`` subsystem (the pod's own sftp-server).

The backend gives a host command whose stdio is the pod process's (``PodBackend.enter``); its
stdio here are plain pipes, or a pty's slave (made the process's controlling terminal, so Ctrl-C
reaches the pod's foreground job; its size and every resize are set on the master).
The channel ends once the process has exited *and* its output has all been sent, as with
sshd; a channel closed first (the client went) hangs the process up.

Its stdio are pumped here rather than by asyncssh's ``redirect``, which here lost some of a large
stdin now and then (3 MiB piped to ``cat | wc -c`` counted 3,076,096 bytes in one try of three),
and which hands the event loop file objects: under uvloop a descriptor so handed is closed twice
(gateway/ssh/fd_stream.py). So the pty's size and its resizes are set here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import struct
import termios
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import asyncssh

from gateway.pods import PodBackend, PodCommand, PodStream, end_host_command
from gateway.ssh.fd_stream import FdStream

BUFSIZE = 256 << 10  # asyncssh reads pipes 8 KiB at a time by default: 30-56 MiB/s instead of 250+
TERMINAL_ENV = ("TERM", "LANG", "LC_ALL", "LC_CTYPE", "COLORTERM")
HANG_UP_GRACE_S = 5.0  # a session's srun (PodBackend.stream) after its connection closed, before it is killed


class PodProcess(asyncssh.SSHServerProcess):
    """asyncssh's server process, taking the ``sftp`` subsystem (run in the pod, not served from
    the bastion's own files)."""

    def __init__(self, handler, channel_limit):
        super().__init__(handler, None, 0, False)
        self._channel_limit = channel_limit

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp"

    def session_started(self) -> None:
        if self._chan.get_subsystem() != "sftp":
            return super().session_started()
        # asyncssh serves ``sftp`` from the bastion's own files; here it is a process in the pod.
        stdin = asyncssh.SSHReader(self, self._chan)
        stdout = asyncssh.SSHWriter(self, self._chan)
        stderr = asyncssh.SSHWriter(self, self._chan, asyncssh.EXTENDED_DATA_STDERR)
        self._conn.create_task(self._session_factory(stdin, stdout, stderr), stdin.logger)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self._channel_limit()


def session_args(process: asyncssh.SSHServerProcess) -> list[str]:
    """SESSION_SCRIPT's arguments (gateway/pods/__init__.py) for what the client asked."""
    if process.subsystem == "sftp":
        return ["sftp"]
    if process.command is not None:
        return ["-c", process.command]
    return []


def wants_terminal(process: asyncssh.SSHServerProcess) -> bool:
    """A pty was asked for a shell or a command (an ``sftp`` subsystem never gets one)."""
    return process.term_type is not None and process.subsystem is None


def session_env(process: asyncssh.SSHServerProcess) -> dict[str, str]:
    """The terminal's type and the client's locale, as sshd passes them; nothing else it sends."""
    env = {}
    if process.term_type:
        env["TERM"] = process.term_type
    for name, value in (process.env or {}).items():
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        value = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if name in TERMINAL_ENV and "\0" not in value and len(value) < 256:
            env[name] = value
    return env


def open_session(backend: PodBackend, ref: str, process: asyncssh.SSHServerProcess) -> PodCommand | PodStream:
    """What runs the session in the pod: without a terminal, on the backend's own connection
    where it has one (``PodBackend.stream``: slurm), else ``enter``'s host command."""
    args, tty, env = session_args(process), wants_terminal(process), session_env(process)
    return (not tty and backend.stream(ref, args, env)) or backend.enter(ref, args, tty, env)


async def run_in_pod(process: PodProcess, command: PodCommand | PodStream) -> None:
    """Run ``command`` with the channel as its stdio, then report its exit to the client."""
    if isinstance(command, PodStream):
        return await _run_stream(process, command)
    tty = wants_terminal(process)
    ours: list[int] = []  # our ends of its stdio
    theirs: list[int] = []
    if tty:
        master, slave = os.openpty()
        _set_size(master, *process.term_size)
        ours.append(master)
        theirs.append(slave)
        child_io = {"stdin": slave, "stdout": slave, "stderr": slave}
    else:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        ours += [stdin_w, stdout_r, stderr_r]
        theirs += [stdin_r, stdout_w, stderr_w]
        child_io = {"stdin": stdin_r, "stdout": stdout_w, "stderr": stderr_w}
    for fd in ours:
        os.set_inheritable(fd, False)
    try:
        child = await asyncio.create_subprocess_exec(
            *command.argv, **child_io, env=command.env, cwd=command.cwd,
            # A terminal's session is made in the pod (setsid --ctty); pipes get one here, so
            # the whole host-side group can be hung up.
            start_new_session=not tty,
        )
    except OSError as exc:
        for fd in ours + theirs:
            os.close(fd)
        process.stderr.write(f"kgpu: could not enter the pod: {exc}\r\n".encode())
        process.exit(255)
        return
    for fd in theirs:
        os.close(fd)
    streams = [FdStream(fd) for fd in ours]
    if tty:
        to_pod = streams[0]
        outputs = [asyncio.ensure_future(_pump_output(streams[0], process.stdout))]
    else:
        to_pod, from_pod, errors = streams
        outputs = _outputs(process, from_pod, errors, command.own_stderr)
    await _serve(process, child, to_pod, outputs, streams, tty)


def _outputs(process: PodProcess, from_pod: FdStream, errors: FdStream, own: "re.Pattern[bytes] | None") -> list:
    return [
        asyncio.ensure_future(_pump_output(from_pod, process.stdout)),
        asyncio.ensure_future(_pump_output(errors, process.stderr, own)),
    ]


async def _run_stream(process: PodProcess, stream: PodStream) -> None:
    """A session whose stdin and stdout are one connection: the end of its stdin is a half-close."""
    to_pod, from_pod = _HalfClosing(stream.data), FdStream(os.dup(stream.data.fileno()))
    errors = FdStream(stream.stderr.detach())
    outputs = _outputs(process, from_pod, errors, stream.own_stderr)
    try:
        await _serve(process, _Held(stream.process), to_pod, outputs, [to_pod, from_pod, errors], False)
    finally:
        stream.data.close()
        asyncio.get_running_loop().run_in_executor(None, end_host_command, stream.process, HANG_UP_GRACE_S)


class _HalfClosing(FdStream):
    """The sending side of a connection (a descriptor of its own): its close is the connection's
    half-close, so the pod sees its stdin end while its stdout still comes."""

    def __init__(self, connection: socket.socket):
        super().__init__(os.dup(connection.fileno()))
        self._connection = connection

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                self._connection.shutdown(socket.SHUT_WR)
        super().close()


class _Held:
    """A host command started without asyncio (``PodBackend.stream``'s), awaited as asyncio's: its
    exit is polled on the event loop, so a long session holds no thread of the loop's default pool
    (a few threads, which a tenant's open sessions would otherwise all hold from everyone else)."""

    POLL_S = 0.1

    def __init__(self, popen):
        self._popen = popen
        self.pid = popen.pid

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            await asyncio.sleep(self.POLL_S)
        return code


async def _serve(process: PodProcess, child, to_pod: FdStream, outputs: list[asyncio.Future],
                 streams: list[FdStream], tty: bool) -> None:
    """Pump the client's stdin into ``to_pod`` until the child has exited and its ``outputs`` have
    all been passed on, or the client has gone first (then hang it up); report its exit."""
    pump = asyncio.ensure_future(_pump_stdin(process, to_pod, to_pod.fd if tty else None))
    finished = asyncio.ensure_future(_finished(child, process, outputs))
    closed = asyncio.ensure_future(process.channel.wait_closed())
    try:
        await asyncio.wait({finished, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not finished.done():  # the client went first: hang up what it left running
            _hang_up(child, tty)
            finished.cancel()
        for task in (closed, pump, *outputs):
            task.cancel()
        await asyncio.gather(pump, *outputs, return_exceptions=True)
        for stream in streams:
            stream.close()
    if finished.done() and not finished.cancelled():
        code = finished.result()
        if code is not None and code < 0:
            with contextlib.suppress(Exception):
                process.exit_with_signal(signal.Signals(-code).name[3:])
                return
        process.exit(code if code is not None else 255)


async def _pump_stdin(process: PodProcess, target: FdStream, pty_master: int | None) -> None:
    """The client's stdin into the pod until its end (then the pipe's end: the pod sees EOF);
    on a terminal, its size changes too."""
    try:
        while True:
            try:
                data = await process.stdin.read(BUFSIZE)
            except asyncssh.TerminalSizeChanged as change:
                if pty_master is not None:
                    _set_size(pty_master, change.width, change.height, change.pixwidth, change.pixheight)
                continue
            except (asyncssh.BreakReceived, asyncssh.SignalReceived):
                continue
            if not data:
                break
            await target.write(data)
        if pty_master is not None:
            await asyncio.Future()  # a terminal stays open: its end is the shell's exit, not the client's EOF
        target.close()
    except (ConnectionError, OSError):
        pass  # the pod's side closed its stdin


def _set_size(fd: int, width: int, height: int, pixwidth: int = 0, pixheight: int = 0) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


async def _finished(child: asyncio.subprocess.Process, process: PodProcess, outputs: list[asyncio.Future]) -> int:
    code = await child.wait()
    for output in outputs:  # everything it wrote has been passed on
        await output
    with contextlib.suppress(OSError, asyncssh.Error):
        process.stdout.write_eof()
    return code


async def _pump_output(source: FdStream, target: asyncssh.SSHWriter, own: "re.Pattern[bytes] | None" = None) -> None:
    """One of the command's outputs to the client until its end. With ``own``, the whole lines it
    matches (the host command's, not the pod's) are left out; a line is held back only while it
    could still become one."""
    held = b""
    try:
        while chunk := await source.read(BUFSIZE):
            out = chunk
            if own is not None:
                lines = (held + chunk).split(b"\n")
                held = lines.pop()
                out = b"".join(line + b"\n" for line in lines if not own.fullmatch(line + b"\n"))
                if held and not b"srun: error: ".startswith(held[:13]):
                    out, held = out + held, b""  # not one of the host command's lines: pass it on now
            if out:
                target.write(out)
                await target.drain()
        if held:
            target.write(held)
    except (ConnectionError, asyncssh.Error):
        pass  # the client went


def _hang_up(child: asyncio.subprocess.Process, tty: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if tty:
            child.send_signal(signal.SIGHUP)
        else:
            os.killpg(child.pid, signal.SIGHUP)
