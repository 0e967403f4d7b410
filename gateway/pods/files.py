"""Pod files: reading, writing and listing a pod's files over the exec channel SSH sessions use
(``PodBackend.enter``), streamed: the gateway holds no whole file, in memory or on disk.

A pod is hostile, so the path is checked *inside the pod, at the moment of the open*: FILE_SCRIPT
(perl: every Debian and Ubuntu image has perl-base, and CONNECT_SCRIPT already relies on it)
walks from ``/`` one folder at a time, ``lstat`` then ``chdir`` then ``stat(".")``, refusing a
symbolic link and any folder whose identity changed between the look and the step (a folder
swapped for a symlink while a run races the walk); the last name is opened with O_NOFOLLOW and
O_NONBLOCK (a FIFO never holds it) and must be a regular file (no device, FIFO or socket).
On the gateway's side the path is first held to the allowed folders (:func:`pod_path`), every
read and write of the channel has an idle deadline, and every answer a cap.

The protocol: the gateway sends a request (8 hex digits of length, then ``OP HEXPATH ARGS``), the
pod answers lines (``ok``, ``ready``, ``done``, or ``err KIND MESSAGE``) and, for a read, the
bytes asked for. ``put`` writes a temporary name in the same folder and renames it over the final
name only once every byte arrived; ``putat`` aligns the file to its start (shorter: ``err
range SIZE``; longer: truncated) and writes there, keeping what arrived if the body is cut; it
holds the file's lock meanwhile, so a resume waits for the cut transfer's process to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import subprocess
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.pods import PodBackend, PodError, end_host_command

ROOTS = ("workspace", "tmp", "files")  # a relative path is under /workspace
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_LISTING = 10_000  # entries a listing answers at most (then "truncated")
CHUNK = 1 << 20
SOCKET_BUFFER = 1 << 20  # asked for both ways' socket buffers (the kernel doubles it): kernel memory, not the gateway's
_LINE_LIMIT = 4 * MAX_NAME_BYTES + 256  # one answer line at most (a listing's carries a hex name)
_CLOSE_GRACE_S = 5.0  # after its stdin's end, how long the pod's process may take to tidy up

# Entering a pod (srun, a slurm rendezvous of up to 20 s) and reaping its process block: they run on
# threads of their own, not the event loop's default pool (6 threads on 2 cores), so that a tenant's
# slow or stalled pods never hold the threads another tenant's transfers need. The bytes themselves
# wait on the event loop, holding no thread at all.
_BLOCKING_CALLS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="kgpu-podfiles")


async def _blocking(function, *args):
    return await asyncio.get_running_loop().run_in_executor(_BLOCKING_CALLS, functools.partial(function, *args))

# kinds of refusal the pod (or pod_path) answers; gateway/pod_files.py says what each means to a caller
BAD_PATH = "badpath"
KINDS = {
    BAD_PATH, "notfound", "symlink", "special", "notdir", "isdir", "denied", "readonly", "nospace", "range",
    "short", "io",
}

FILE_SCRIPT = r"""
use strict; use Fcntl qw(O_RDONLY O_WRONLY O_CREAT O_EXCL O_NOFOLLOW O_NONBLOCK LOCK_EX); use POSIX ();
binmode STDIN; binmode STDOUT; $SIG{PIPE} = "IGNORE";
my $idle = $ARGV[0]; my $tmp;
$SIG{ALRM} = sub { unlink $tmp if defined $tmp; exit 3 };
sub put { my $b = shift; while (length $b) { alarm $idle; my $w = syswrite(STDOUT, $b);
  if (!$w) { unlink $tmp if defined $tmp; exit 4 } substr($b, 0, $w) = "" } }
sub answer { my $l = shift; $l =~ s/[\r\n]/ /g; put("$l\n") }
sub kind { my $e = 0 + $!;
  return "notfound" if $e == POSIX::ENOENT; return "symlink" if $e == POSIX::ELOOP;
  return "notdir" if $e == POSIX::ENOTDIR; return "isdir" if $e == POSIX::EISDIR;
  return "denied" if $e == POSIX::EACCES || $e == POSIX::EPERM; return "readonly" if $e == POSIX::EROFS;
  return "nospace" if $e == POSIX::ENOSPC || $e == POSIX::EDQUOT; return "io" }
sub fail { my ($k, $m) = @_; unlink $tmp if defined $tmp; undef $tmp; answer("err $k $m"); exit 1 }
sub readn { my $n = shift; my $buf = "";
  while (length($buf) < $n) { alarm $idle; my $r = sysread(STDIN, $buf, $n - length($buf), length($buf));
    return undef unless $r } return $buf }
sub request { my $len = readn(8); fail("io", "no request came (its stdin ended)") unless defined $len;
  fail("io", "a garbled request") unless $len =~ /^[0-9a-f]{8}$/;
  my $r = readn(hex $len); fail("io", "a request cut short") unless defined $r; return split / /, $r }
sub enter_dirs { my ($make, @dirs) = @_;
  chdir "/" or fail(kind(), "/: $!");
  for my $d (@dirs) {
    my @l = lstat $d;
    if (!@l) {
      fail(kind(), "$d: $!") unless $make && $! == POSIX::ENOENT;
      mkdir $d or $! == POSIX::EEXIST or fail(kind(), "cannot make the folder $d: $!");
      @l = lstat $d or fail(kind(), "$d: $!");
    }
    fail("symlink", "$d is a symbolic link") if -l _;
    fail("notdir", "$d is not a folder") unless -d _;
    chdir $d or fail(kind(), "$d: $!");
    my @here = stat ".";
    fail("symlink", "$d changed while it was entered") unless @here && $here[0] == $l[0] && $here[1] == $l[1];
  } }
sub existing { my $name = shift; my @l = lstat $name;
  if (!@l) { fail(kind(), "$name: $!") unless $! == POSIX::ENOENT; return () }
  fail("symlink", "$name is a symbolic link") if -l _; fail("isdir", "$name is a folder") if -d _;
  fail("special", "$name is not a regular file") unless -f _; return @l }
sub receive { my ($fh, $len) = @_; my $got = 0;
  while ($got < $len) {
    alarm $idle; my $want = $len - $got; $want = 1048576 if $want > 1048576;
    my $n = sysread(STDIN, my $buf, $want);
    if (!$n) { close $fh; unlink $tmp if defined $tmp; undef $tmp; answer("err short $got"); exit 1 }
    while (length $buf) { my $w = syswrite($fh, $buf); fail(kind(), "writing: $!") unless $w;
      substr($buf, 0, $w) = ""; $got += $w } } }
my ($op, $hex, @args) = request();
my @parts = split m{/}, pack("H*", $hex);
if ($op eq "list") {
  enter_dirs(0, @parts);
  opendir(my $dh, ".") or fail(kind(), "cannot list: $!");
  answer("ok"); my ($count, $more) = (0, 0);
  while (defined(my $e = readdir $dh)) {
    next if $e eq "." || $e eq "..";
    if ($count >= $args[0]) { $more = 1; last }
    my @s = lstat $e or next;
    my $t = -l _ ? "symlink" : -d _ ? "folder" : -f _ ? "file" : "other";
    answer("$t $s[7] $s[9] " . unpack("H*", $e)); $count++;
  }
  answer("end $count $more"); exit 0;
}
my $name = pop @parts;
if ($op eq "get") {
  enter_dirs(0, @parts);
  my @l = existing($name) or fail("notfound", "no file $name");
  sysopen(my $fh, $name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK) or fail(kind(), "$name: $!");
  my @s = stat $fh;
  fail("special", "$name changed while it was opened") unless -f _ && $s[0] == $l[0] && $s[1] == $l[1];
  answer("ok $s[7] $s[9]");
  my ($send, $off, $len) = request();
  exit 0 unless $send eq "send" && $off =~ /^\d+$/ && $len =~ /^\d+$/;
  sysseek($fh, $off, 0) or exit 5;
  while ($len > 0) { my $n = sysread($fh, my $buf, $len < 1048576 ? $len : 1048576); exit 5 unless $n;
    put($buf); $len -= $n }
  exit 0;
}
if ($op eq "put") {
  my $len = $args[0];
  enter_dirs(1, @parts);
  my @old = existing($name); my $fh;
  for (1 .. 50) {
    $tmp = sprintf(".kgpu-upload-%08x-%08x", $$, int rand 4294967295);
    last if sysopen($fh, $tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0666);
    undef $tmp; fail(kind(), "cannot write in this folder: $!") unless $! == POSIX::EEXIST;
  }
  fail("io", "no temporary name free") unless defined $tmp;
  answer("ready " . (@old ? $old[7] : 0) . " " . (@old ? 1 : 0));
  receive($fh, $len);
  chmod $old[2] & 07777, $fh if @old;
  close $fh or fail(kind(), "writing: $!");
  existing($name);
  rename $tmp, $name or fail(kind(), "cannot replace $name: $!");
  undef $tmp; answer("done $len"); exit 0;
}
if ($op eq "putat") {
  my ($start, $len) = @args;
  enter_dirs(1, @parts);
  my @old = existing($name);
  fail("range", "0") if !@old && $start > 0;
  sysopen(my $fh, $name, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0666) or fail(kind(), "$name: $!");
  my @s = stat $fh; fail("special", "$name is not a regular file") unless -f _;
  alarm $idle; flock $fh, LOCK_EX or fail(kind(), "cannot lock: $!"); @s = stat $fh;
  fail("range", $s[7]) if $s[7] < $start;
  if ($s[7] > $start) { truncate $fh, $start or fail(kind(), "cannot truncate: $!") }
  sysseek($fh, $start, 0) or fail(kind(), "cannot seek: $!");
  answer("ready $s[7] " . (@old ? 1 : 0));
  receive($fh, $len);
  close $fh or fail(kind(), "writing: $!");
  answer("done " . ($start + $len)); exit 0;
}
fail("io", "unknown request");
"""
assert "'" not in FILE_SCRIPT  # it travels in single quotes

# Run by the pod's shell (SESSION_SCRIPT's ``-c``); perl's own start-up variables are the pod's to
# set for its runs, not for this.
_LAUNCH = "unset PERL5OPT PERL5LIB PERLLIB PERL5DB; exec perl -e '" + FILE_SCRIPT + "' "


class PodFileError(Exception):
    """The pod refused (or the path is not one a pod file may have): ``kind`` is one of KINDS;
    ``size`` is the file's present size for ``range`` (and bytes written for ``short``)."""

    def __init__(self, kind: str, message: str, size: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.size = size


@dataclass(frozen=True)
class PodPath:
    """An absolute path in a pod under one of ROOTS, without ``.``, ``..`` or empty names."""

    parts: tuple[str, ...]
    folder: bool  # it names a folder (a listing): it ended with "/"

    @property
    def text(self) -> str:
        return "/" + "/".join(self.parts) + ("/" if self.folder else "")

    @property
    def name(self) -> str:
        return self.parts[-1]


def pod_path(text: str, *, folder_ok: bool = True) -> PodPath:
    """``text`` (relative to /workspace, or absolute under /workspace, /tmp or /files) as a
    PodPath; PodFileError(BAD_PATH) for anything else: ``..``, NUL, a name past 255 bytes, a path
    past 4096, a folder outside the roots. Whether it leaves them through a symlink is the pod's
    walk's to find, at the moment of the open."""
    if "\0" in text:
        raise PodFileError(BAD_PATH, "a path may not hold a NUL byte")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise PodFileError(BAD_PATH, "the path is not valid UTF-8") from None
    if len(raw) > MAX_PATH_BYTES:
        raise PodFileError(BAD_PATH, f"the path is {len(raw)} bytes; at most {MAX_PATH_BYTES}")
    absolute = text if text.startswith("/") else "/workspace/" + text
    names = absolute.split("/")
    if ".." in names:
        raise PodFileError(BAD_PATH, "a path may not hold ..")
    parts = tuple(name for name in names if name not in ("", "."))
    for name in parts:
        if len(name.encode()) > MAX_NAME_BYTES:
            raise PodFileError(BAD_PATH, f"a name is {len(name.encode())} bytes; at most {MAX_NAME_BYTES}")
    if not parts or parts[0] not in ROOTS:
        raise PodFileError(BAD_PATH, f"{absolute} is outside /workspace, /tmp and /files")
    folder = absolute.endswith("/") or absolute.endswith("/.") or len(parts) == 1
    if folder and not folder_ok:
        raise PodFileError(BAD_PATH, f"{'/' + '/'.join(parts)}/ is a folder; a file's path does not end with /")
    return PodPath(parts, folder)


def _request(*words: str | int) -> bytes:
    body = " ".join(str(w) for w in words).encode()
    return b"%08x" % len(body) + body


def _hex(path: PodPath) -> str:
    return "/".join(path.parts).encode().hex()


class Channel:
    """One FILE_SCRIPT process in a pod, its stdio through ``backend.enter``'s host command (in a
    session of its own), or its stdin and stdout on one connection (``backend.stream``); every read and write waits at most ``idle_s``, every answer line is capped.

    Its stdio are non-blocking sockets (pairs, or the stream's connection), not event-loop
    transports: under uvloop, transports over a child's stdio now and then lost a request (the
    process read nothing, or another's bytes) when many were open at once. A send first writes
    what the socket's buffer takes, and a read first takes what the pod already wrote; only when
    the buffer is full, or empty, does the call wait, on the event loop (``sock_sendall``,
    ``sock_recv``) under the idle deadline, so a pod that stops reading or writing holds no
    thread. A pair's buffer holds SOCKET_BUFFER both ways, so while the other side keeps up a
    chunk costs one system call."""

    def __init__(self, process: subprocess.Popen, stdin: socket.socket, stdout: socket.socket,
                 stderr: socket.socket, idle_s: float):
        self.process = process
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.idle_s = idle_s
        self._buffer = b""
        for sock in (stdin, stdout, stderr):
            sock.setblocking(False)

    @classmethod
    async def open(cls, backend: PodBackend, ref: str, idle_s: float) -> "Channel":
        args = ["-c", _LAUNCH + str(max(1, round(idle_s)))]
        stream = await _blocking(backend.stream, ref, args, {})
        if stream is not None:  # one connection carries both ways (the stdin's end: a half-close)
            return cls(stream.process, stream.data, stream.data, stream.stderr, idle_s)
        command = await _blocking(backend.enter, ref, args, False, {})
        return await _blocking(cls._spawn, command, idle_s)

    @classmethod
    def _spawn(cls, command, idle_s: float) -> "Channel":
        pairs = [socket.socketpair() for _ in range(3)]
        for sending in (pairs[0][0], pairs[1][1]):  # into the pod's stdin; the pod's stdout
            with contextlib.suppress(OSError):  # the system may grant less (net.core.wmem_max)
                sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        try:
            process = subprocess.Popen(
                command.argv, stdin=pairs[0][1], stdout=pairs[1][1], stderr=pairs[2][1],
                env=command.env, cwd=command.cwd, start_new_session=True,
            )
        except OSError as exc:
            for ours, _ in pairs:
                ours.close()
            raise PodError(f"could not enter the pod: {exc}") from exc
        finally:
            for _, theirs in pairs:
                theirs.close()
        return cls(process, pairs[0][0], pairs[1][0], pairs[2][0], idle_s)

    async def send(self, data: bytes) -> None:
        try:
            try:
                sent = os.write(self.stdin.fileno(), data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                async with asyncio.timeout(self.idle_s):
                    await asyncio.get_running_loop().sock_sendall(self.stdin, memoryview(data)[sent:])
        except TimeoutError:
            raise PodError(f"the pod took no bytes for {self.idle_s:g} s") from None
        except OSError:
            raise PodError(f"the pod's file process ended early: {await self._last_words()}") from None

    def end_input(self) -> None:
        """The end of the pod's stdin (a cut body)."""
        with contextlib.suppress(OSError):
            self.stdin.shutdown(socket.SHUT_WR)

    async def _recv(self, n: int) -> bytes:
        try:
            async with asyncio.timeout(self.idle_s):
                return await asyncio.get_running_loop().sock_recv(self.stdout, n)
        except TimeoutError:
            raise PodError(f"the pod sent nothing for {self.idle_s:g} s") from None
        except OSError:
            return b""

    async def _readline(self) -> bytes:
        while b"\n" not in self._buffer and len(self._buffer) <= _LINE_LIMIT:
            chunk = await self._recv(1 << 16)
            if not chunk:
                break
            self._buffer += chunk
        line, found, rest = self._buffer.partition(b"\n")
        if not found:
            if len(self._buffer) > _LINE_LIMIT:
                raise PodError("the pod's answer was garbled (a line too long)")
            self._buffer = b""
            return line
        self._buffer = rest
        return line + b"\n"

    async def line(self) -> list[str]:
        """The pod's next answer line, split; an ``err`` line raised as PodFileError."""
        raw = await self._readline()
        if not raw.endswith(b"\n"):
            raise PodError(f"the pod's file process ended without answering: {await self._last_words()}")
        words = raw.decode(errors="replace").rstrip("\n").split(" ")
        if words[0] == "err":
            kind = words[1] if len(words) > 1 and words[1] in KINDS else "io"
            rest = " ".join(words[2:])
            size = int(rest) if kind in ("range", "short") and rest.isdigit() else None
            message = {"range": f"the file holds {size} bytes", "short": f"the body ended after {size} bytes"}.get(kind, rest)
            raise PodFileError(kind, message, size)
        return words

    async def _last_words(self) -> str:
        """What the process (or the host command entering the pod) said on stderr, and its exit."""
        def gather() -> str:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1)
            said = b""
            self.stderr.settimeout(0.2)
            with contextlib.suppress(OSError):
                while len(said) < 4096 and (chunk := self.stderr.recv(4096)):
                    said += chunk
            text = said.decode(errors="replace").strip()[-300:] or "nothing on stderr"
            return f"{text} (exit {self.process.returncode})"

        return await _blocking(gather)

    async def read(self, n: int) -> bytes:
        if self._buffer:
            chunk, self._buffer = self._buffer[:n], self._buffer[n:]
            return chunk
        try:
            return os.read(self.stdout.fileno(), n)
        except BlockingIOError:
            return await self._recv(n)
        except OSError:
            return b""

    async def close(self) -> None:
        """Its stdio closed (the pod sees its stdin end, and its next write fails: a cut upload's
        temporary file is removed there), a few seconds to finish, then the host command's whole
        session killed if it is still running, and reaped."""
        for sock in (self.stdin, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        await _blocking(self._end)

    def _end(self) -> None:
        end_host_command(self.process, _CLOSE_GRACE_S)


@dataclass
class Download:
    """An open file in a pod: its size and mtime (seconds) now; :meth:`chunks` streams a span."""

    channel: Channel
    size: int
    mtime: int

    async def chunks(self, start: int, length: int) -> AsyncIterator[bytes]:
        """``length`` bytes from ``start`` (fewer if the file shrank meanwhile), never more."""
        await self.channel.send(_request("send", start, length))
        left = length
        while left > 0:
            chunk = await self.channel.read(min(CHUNK, left))
            if not chunk:
                raise PodError(f"the pod's file ended {left} bytes early: {await self.channel._last_words()}")
            left -= len(chunk)
            yield chunk

    async def close(self) -> None:
        await self.channel.close()


async def open_file(backend: PodBackend, ref: str, path: PodPath, idle_s: float) -> Download:
    """The file at ``path`` opened in the pod (a regular file reached without a symlink)."""
    if path.folder:
        raise PodFileError("isdir", f"{path.text} is a folder")
    channel = await Channel.open(backend, ref, idle_s)
    try:
        await channel.send(_request("get", _hex(path)))
        words = await channel.line()
        if len(words) != 3 or words[0] != "ok" or not words[1].isdigit() or not words[2].lstrip("-").isdigit():
            raise PodError("the pod's answer was garbled")
        return Download(channel, int(words[1]), int(words[2]))
    except BaseException:
        await channel.close()
        raise


@contextlib.asynccontextmanager
async def reading(backend: PodBackend, ref: str, path: PodPath, idle_s: float) -> AsyncIterator[Download]:
    download = await open_file(backend, ref, path, idle_s)
    try:
        yield download
    finally:
        await download.close()


@dataclass(frozen=True)
class Written:
    size: int  # the file's size after the write
    created: bool


async def write_file(
    backend: PodBackend, ref: str, path: PodPath, body: AsyncIterable[bytes], length: int, idle_s: float,
    start: int | None = None,
) -> Written:
    """``length`` bytes of ``body`` into ``path``. Without ``start``: the whole file, renamed over
    the final name once complete (a cut body leaves the file as it was). With ``start``: written
    at ``start`` after the file is aligned to it (PodFileError ``range`` with its size when it is
    shorter), what arrived kept when the body is cut. Missing folders are made."""
    if path.folder:
        raise PodFileError("isdir", f"{path.text} is a folder")
    channel = await Channel.open(backend, ref, idle_s)
    try:
        if start is None:
            await channel.send(_request("put", _hex(path), length))
        else:
            await channel.send(_request("putat", _hex(path), start, length))
        words = await channel.line()
        if len(words) != 3 or words[0] != "ready":
            raise PodError("the pod's answer was garbled")
        created = words[2] == "0"
        sent = 0
        try:
            async for chunk in body:
                chunk = chunk[: length - sent]
                if chunk:
                    await channel.send(chunk)
                    sent += len(chunk)
                if sent >= length:
                    break
        except PodError:
            await channel.line()  # the pod's own reason, when it gave one (a full disk)
            raise
        if sent < length:  # the body was cut: the pod sees its stdin end early
            channel.end_input()
            await channel.line()
        words = await channel.line()
        if len(words) != 2 or words[0] != "done" or not words[1].isdigit():
            raise PodError("the pod's answer was garbled")
        return Written(int(words[1]), created)
    finally:
        await channel.close()


@dataclass(frozen=True)
class Entry:
    name: str
    type: str  # file | folder | symlink | other
    size: int
    mtime: int


async def list_folder(backend: PodBackend, ref: str, path: PodPath, idle_s: float) -> tuple[list[Entry], bool]:
    """The entries of the folder ``path`` (at most MAX_LISTING; True: there were more), by name."""
    channel = await Channel.open(backend, ref, idle_s)
    try:
        await channel.send(_request("list", _hex(path), MAX_LISTING))
        if (await channel.line()) != ["ok"]:
            raise PodError("the pod's answer was garbled")
        entries = []
        while True:
            words = await channel.line()
            if words[0] == "end" and len(words) == 3:
                entries.sort(key=lambda e: e.name)
                return entries, words[2] == "1"
            if len(entries) >= MAX_LISTING or len(words) != 4 or words[0] not in ("file", "folder", "symlink", "other"):
                raise PodError("the pod's listing was garbled")
            kind, size, mtime, name = words
            try:
                entries.append(Entry(bytes.fromhex(name).decode(errors="replace"), kind, int(size), int(mtime)))
            except ValueError:
                raise PodError("the pod's listing was garbled") from None
    finally:
        await channel.close()
