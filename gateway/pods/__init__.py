"""The pod-backend interface: where a rental's container (or process sandbox) lives.

Every backend keeps a run's state *in the pod*, under ``/tmp/kgpu/runs/{run_id}/``
(SPEC decision 7): ``pid``, ``stdout``, ``stderr``, ``started_at``,
``completed_at`` and ``exit_code``, written by the same POSIX-sh runner
(``runner.sh``) on every backend. The gateway keeps nothing about runs, so a
restarted gateway finds them where they were.

Backends: ``local`` (processes on this host, gateway/pods/local.py),
``docker`` (gateway/pods/docker.py) and ``slurm`` (a Slurm job per pod,
gateway/pods/slurm.py). ``tests/test_pod_conformance.py`` runs the
same tests on each.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gateway.inventory import GpuClass

RUNNER = (Path(__file__).parent / "runner.sh").read_text()
RUNS_DIR = "/tmp/kgpu/runs"
READ_CHUNK = 1 << 20  # read_output and follow_run answer at most this many bytes of a stream
# The in-pod token lives in the pod only, in this file (written once at the pod's start); the
# gateway keeps its hash. Every run reads it into KGPU_API_TOKEN, unless its own env names one.
TOKEN_PATH = "/run/kgpu/token"
TOKEN_LAUNCH = 'KGPU_API_TOKEN=${KGPU_API_TOKEN-$(cat "$1" 2>/dev/null)}; export KGPU_API_TOKEN; shift; exec "$@"'


# A run's environment where the host command cannot set it in the pod without naming its values
# on a command line (srun … docker exec, runc exec): ``encode_env`` of it ("NAME:BASE64 ..."), in
# ``KGPU_RUN_ENV`` (ENV_LAUNCH) or as stdin's first line (STDIN_ENV_LAUNCH), exported one by one
# in the pod (any value, newlines included) before ``exec "$@"``. POSIX sh and base64.
_ENV_EXPORT = 'for kv in $KGPU_RUN_ENV; do v=$(printf %s "${kv#*:}" | base64 -d; echo .); export "${kv%%:*}=${v%.}"; done; unset KGPU_RUN_ENV;'
ENV_LAUNCH = _ENV_EXPORT + ' exec "$@"'
STDIN_ENV_LAUNCH = "IFS= read -r KGPU_RUN_ENV; " + _ENV_EXPORT + ' exec "$@" </dev/null'
# The same, for a run given stdin (RunInput.stdin): what follows the first line is the run's.
STDIN_ENV_THEN_INPUT = "IFS= read -r KGPU_RUN_ENV; " + _ENV_EXPORT + ' exec "$@"'


def encode_env(env: dict[str, str]) -> str:
    return " ".join(f"{name}:{base64.b64encode(value.encode()).decode()}" for name, value in env.items())


def with_token(token_path: str, argv: list[str]) -> list[str]:
    """``argv`` in a pod with the in-pod token read into KGPU_API_TOKEN first."""
    return ["sh", "-c", TOKEN_LAUNCH, "kgpu-token", token_path, *argv]


@dataclass(frozen=True)
class RunInput:
    """What a run gets besides its argv and env: bytes for its stdin (None: /dev/null), which the
    backend feeds to the runner's own stdin (it keeps them as RUN_DIR/stdin), and a time limit
    the runner enforces in the pod (0: none): TERM to the run's process group, KILL after
    ``grace_s``, and RUN_DIR/timed_out written."""

    stdin: bytes | None = None
    timeout_s: int = 0
    grace_s: float = 5


NO_INPUT = RunInput()


def run_command(run_dir: str, argv: list[str], token_path: str = TOKEN_PATH, given: RunInput = NO_INPUT) -> list[str]:
    """What a backend executes in a pod for a run: the token read in, then the runner."""
    limits = [str(int(given.stdin is not None)), str(int(given.timeout_s)), str(max(1, math.ceil(given.grace_s)))]
    return with_token(token_path, ["sh", "-c", RUNNER, "kgpu-run", run_dir, *limits, *argv])

# A login into the pod (an SSH session): the token read in as for a run, then, in /workspace,
# the image's bash (else sh) as a login shell, or running ``-c CMD`` as sshd runs a user's shell,
# or the image's own sftp-server for the ``sftp`` subsystem.
SESSION_SCRIPT = r"""
cd /workspace 2>/dev/null || cd "${HOME:-/}" 2>/dev/null || cd /
shell=$(command -v bash 2>/dev/null || echo /bin/sh); SHELL=$shell; export SHELL
case "$1" in
  -c) exec "$shell" -c "$2" ;;
  sftp)
    for s in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server /usr/lib/sftp-server /usr/libexec/sftp-server; do
      [ -x "$s" ] && exec "$s"
    done
    echo "kgpu: this pod's image has no sftp-server (Debian, Ubuntu: apt-get install openssh-sftp-server); scp -O and rsync work without it" >&2
    exit 127 ;;
  *) exec "$shell" -l ;;
esac
"""


def login_command(args: list[str], token_path: str = TOKEN_PATH) -> list[str]:
    """What a backend executes in a pod for an SSH session: ``[]`` (a login shell),
    ``["-c", CMD]`` or ``["sftp"]`` (SESSION_SCRIPT), with the in-pod token in its environment."""
    return with_token(token_path, ["sh", "-c", SESSION_SCRIPT, "kgpu-session", *args])


# A TCP connection from inside the pod over stdio, where the gateway cannot enter the pod's
# network itself (a Slurm node): ``perl -e CONNECT_SCRIPT HOST PORT`` says "ok" or "fail WHY" on
# its first line, then carries bytes both ways. Perl: every Debian and Ubuntu image has perl-base.
CONNECT_SCRIPT = r"""
use strict; use IO::Socket::INET; use IO::Select;
my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => $ARGV[1], Proto => "tcp", Timeout => 10);
$| = 1;
if (!$s) { print "fail $!\n"; exit 1; }
print "ok\n";
binmode STDIN; binmode STDOUT;
my $sel = IO::Select->new(\*STDIN, $s);
sub put { my ($h, $buf) = @_; while (length $buf) { my $w = syswrite($h, $buf); exit 0 unless $w; substr($buf, 0, $w) = ""; } }
while ($sel->count) {
  for my $h ($sel->can_read) {
    my $n = sysread($h, my $buf, 262144);
    if (!$n) {
      $sel->remove($h);
      if ($h == $s) { exit 0 } else { shutdown($s, 1) }
      next;
    }
    put($h == $s ? \*STDOUT : $s, $buf);
  }
}
"""


# The CPU time of every process in the pod, for the reaper's load probe: the lines of
# /proc/PID/stat, read inside the pod where the gateway cannot read the pod's /proc itself.
CPU_SCRIPT = "cat /proc/[0-9]*/stat 2>/dev/null; exit 0"


def cpu_ticks(stat_lines: bytes | str) -> int:
    """Clock ticks spent by the processes of ``/proc/PID/stat`` lines, with their reaped
    children's (utime, stime, cutime, cstime): what a pod has computed so far."""
    text = stat_lines.decode(errors="replace") if isinstance(stat_lines, bytes) else stat_lines
    total = 0
    for line in text.splitlines():
        fields = line.rsplit(")", 1)[-1].split()
        try:
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        except (IndexError, ValueError):
            continue
    return total


@dataclass(frozen=True)
class PodCommand:
    """A command on the gateway's host whose stdin, stdout and stderr are a process's in the pod
    (``nsenter``, ``docker exec``, ``srun … docker exec``). With a terminal, it makes its stdin
    (a pty's slave) its controlling terminal itself."""

    argv: list[str]
    env: dict[str, str]
    cwd: str | None = None
    # A whole line the host command itself adds to stderr (srun's report of the exit code), which
    # is not the pod process's and is left out of what the client sees.
    own_stderr: "re.Pattern[bytes] | None" = None


@dataclass
class PodStream:
    """A process in a pod whose stdin and stdout are one connection of their own (``data``)
    rather than a host command's stdio: ``PodBackend.stream``. ``process`` is the host command
    that runs it (in a session of its own: kill its group to stop it), ``stderr`` what it says."""

    process: "subprocess.Popen"
    data: socket.socket
    stderr: socket.socket
    own_stderr: "re.Pattern[bytes] | None" = None  # as PodCommand's


def end_host_command(process: subprocess.Popen, grace_s: float) -> None:
    """Wait up to ``grace_s`` for a host command started in a session of its own (its stdio
    closed: the pod's process sees its end), then kill its whole session; reap it either way."""
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # not reaped yet: the group is still its own
        process.wait()


# Run inside a pod (``sh -c SCRIPT kgpu ARGS...``), so a signal reaches only the pod's own
# processes whatever a run wrote into its run directory. dash's kill takes no "--":
# `kill -SIG -PGID` is the form dash, bash and busybox all take.
# SIGNAL_SCRIPT RUN_DIR SIG: SIG to the run's process group.
SIGNAL_SCRIPT = r"""
d="$1"; sig="$2"
[ -f "$d/runner_pid" ] || exit 0  # a FIFO planted there would hold the read forever
r=$(cat "$d/runner_pid" 2>/dev/null) || exit 0
[ -n "$r" ] && kill -0 "$r" 2>/dev/null && kill "-$sig" "-$r" 2>/dev/null
exit 0
"""
# TERM_ALL_SCRIPT GRACE RUNS_DIR: TERM every run's process group, then wait up to GRACE
# seconds for the runners to go.
TERM_ALL_SCRIPT = r"""
grace="$1"; pids=
for f in "$2"/*/runner_pid; do
  [ -f "$f" ] || continue
  r=$(cat "$f" 2>/dev/null)
  [ -n "$r" ] && kill -0 "$r" 2>/dev/null && kill -TERM "-$r" 2>/dev/null && pids="$pids $r"
done
i=0
while [ -n "$pids" ] && [ "$i" -lt $((grace * 10)) ]; do
  left=
  for r in $pids; do kill -0 "$r" 2>/dev/null && left="$left $r"; done
  pids=$left
  [ -n "$pids" ] && sleep 0.1
  i=$((i + 1))
done
exit 0
"""

# The first lines of a script run inside a pod as ``sh -c SCRIPT kgpu RUN_DIR TAIL TICKS``: they
# return once the run has ended (its exit code written, or its runner gone) or after TICKS
# twentieths of a second, so a long-poll is one call into the pod, not a call every 50 ms.
# ``read`` and ``kill -0`` are shell builtins: each tick forks only ``sleep``.
WAIT_TICKS_PER_SECOND = 20
WAIT_SCRIPT = r"""
left="$3"
while [ "$left" -gt 0 ] && [ -d "$1" ] && [ ! -e "$1/exit_code" ]; do
  runner=; [ -f "$1/runner_pid" ] && read -r runner < "$1/runner_pid" 2>/dev/null
  [ -n "$runner" ] && ! kill -0 "$runner" 2>/dev/null && break
  sleep 0.05; left=$((left - 1))
done
"""


def wait_ticks(seconds: float) -> int:
    return max(0, math.ceil(seconds * WAIT_TICKS_PER_SECOND))


class PodError(Exception):
    """A backend could not do what was asked (the message says why)."""


def safe_run_id(run_id: str) -> str:
    """A run id that names one folder under RUNS_DIR (the gateway makes them; this is the guard)."""
    if not run_id or "/" in run_id or run_id in (".", "..") or "\0" in run_id:
        raise PodError(f"bad run id {run_id!r}")
    return run_id


class PodStartError(PodError):
    """The pod could not be started (image missing, no resources...)."""


@dataclass(frozen=True)
class PodSpec:
    rental_id: str
    image: str
    gpu_indices: list[int]
    cpu: float
    memory_bytes: int
    ephemeral_storage_gib: int
    env: dict[str, str] = field(default_factory=dict)
    # Where the gateway placed it (a Slurm node name; "" where the backend has one host) and for
    # how long (a workload engine's time limit; 0: none).
    node: str = ""
    duration_hours: float = 0


@dataclass(frozen=True)
class PodStatus:
    phase: str  # Pending | Running | Failed | Gone
    ready: bool
    reason: str | None = None
    # What the in-pod bootstrap reported about /shared and /files (None: no bootstrap).
    mounts: dict | None = None


@dataclass(frozen=True)
class RunState:
    run_id: str
    pid: int | None
    started_at: float | None
    completed_at: float | None
    exit_code: int | None
    alive: bool
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool = False  # the runner ended it at its time limit (RunInput.timeout_s)

    @property
    def finished(self) -> bool:
        return self.exit_code is not None or (self.pid is not None and not self.alive)


def run_int(value: str | None) -> int | None:
    """A run file's integer (pid, exit code); None when absent or garbled."""
    try:
        return int(value) if value else None
    except ValueError:
        return None


# The times a run file may name: from 1970 until the last second of year 9999, the most a datetime
# holds. The pod writes them, and the pod is its tenant's: nan, inf or 1e20 is garbled, not a 500.
_RUN_TIMES = (0.0, 253402300799.0)


def run_float(value: str | None) -> float | None:
    """A run file's time; None when absent or garbled (out of _RUN_TIMES included; a ``date``
    without %N prints "1700000000.%N" or "1700000000.N": its seconds are kept)."""
    if not value:
        return None
    try:
        moment = float(value)
    except ValueError:
        head = value.split(".", 1)[0]
        moment = float(head) if head.isdigit() else None
    return moment if moment is not None and _RUN_TIMES[0] <= moment <= _RUN_TIMES[1] else None


@runtime_checkable
class PodBackend(Protocol):
    name: str
    # Which pods this backend can see: a local pods folder, a docker daemon. Gateway replicas
    # that share a database act only on the rentals whose pods their own backend runs.
    instance: str

    def start(self, spec: PodSpec) -> str:
        """Create the pod and return the backend's reference to it."""

    def status(self, ref: str) -> PodStatus: ...

    def destroy(self, ref: str) -> str | None:
        """Stop the runs (SIGTERM, then a grace period), upload what the pod's read-write mounts
        still hold (kgpu-flush), and remove the pod. Returns None when nothing written to the
        drive was lost, else what could not be uploaded."""

    def adopt(self) -> dict[str, str]:
        """Pods this backend still runs, by rental id (for a restarted gateway)."""

    def start_run(
        self, ref: str, run_id: str, argv: list[str], env: dict[str, str], given: RunInput = NO_INPUT
    ) -> None: ...

    def run_state(self, ref: str, run_id: str, tail_bytes: int) -> RunState | None: ...

    def run_ids(self, ref: str) -> list[str]: ...

    def read_output(self, ref: str, run_id: str, stream: str, offset: int) -> bytes:
        """Bytes of ``stdout`` or ``stderr`` from ``offset`` on (for live streaming)."""

    def signal_run(self, ref: str, run_id: str, signal_name: str) -> None:
        """Send TERM or KILL to the run's process group."""

    def storage_bytes(self, ref: str) -> int | None:
        """Bytes the pod has written to its ephemeral disk (None: unknown). The reaper
        returns a rental that goes over its ``ephemeral_storage_gib``."""

    def enter(self, ref: str, args: list[str], tty: bool, env: dict[str, str]) -> PodCommand:
        """The host command for ``login_command(args)`` in the pod as the pod's user, with
        ``env`` added (an SSH session: gateway/ssh/pod_session.py). ``tty``: its stdin is a
        terminal, which becomes the process's controlling terminal."""

    def connect(self, ref: str, host: str, port: int, timeout: float) -> "socket.socket":
        """A TCP connection to ``host:port`` opened from inside the pod's network (an SSH
        forward: ``127.0.0.1`` is the pod's own loopback, never the host's). Raises OSError
        when the pod refuses it, PodError when this backend cannot reach the pod's network."""

    def stream(self, ref: str, args: list[str], env: dict[str, str]) -> "PodStream | None":
        """``login_command(args)`` in the pod without a terminal, with ``env`` added (a pod file,
        an SSH session), its stdin and stdout on a connection of their own, where the backend has
        one faster than ``enter``'s host command (slurm: gateway/pods/slurm_channel.py); None:
        use ``enter``."""

    def cpu_seconds(self, ref: str) -> float | None:
        """CPU seconds the pod's processes have used so far (None: unknown); the reaper's load
        probe counts a pod using a tenth of a CPU between two ticks as active."""

    def gpus_busy(self, ref: str, gpus: list[int]) -> bool:
        """Whether one of the pod's GPUs (its rental's ``gpus`` indices on its node) is more
        than 5 % busy, as the node's own nvidia-smi says; False where there is none."""

    def wait_run(self, ref: str, run_id: str, seconds: float, tail_bytes: int) -> RunState | None:
        """The run's state once it has ended, or after ``seconds`` (a long-poll; None: no such run)."""

    def follow_run(self, ref: str, run_id: str, offsets: dict[str, int], seconds: float) -> RunState | None:
        """The run's state as soon as it has output past ``offsets`` (``{"stdout": n, "stderr":
        m}``) or has ended, or after ``seconds``; its ``stdout`` and ``stderr`` hold the new bytes
        (at most 1 MiB each: ask again from the new offsets)."""

    # Why this backend cannot start pods on this host (None: it can); a rental is refused with it.
    refusal: str | None
    # Whether the processes the gateway starts in a pod are its own children (nsenter, runc),
    # killed at their deadline; else a daemon starts them (docker exec, srun), and a pod that
    # stops every process it sees can wedge that daemon's work on the pod (docs/pod-isolation.md).
    enters_directly: bool

    def inventory(self) -> "list[GpuClass] | None":
        """The nodes, GPUs and readiness a workload engine reports (Slurm's sinfo), which replace
        the configured inventory; None where the backend has none of its own."""
