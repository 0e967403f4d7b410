"""The run protocol over an exec channel: how a backend that can only run a command in a pod
(``docker exec``, ``srun … docker exec``, tomorrow Kubernetes' exec subresource) starts, waits
for, reads and signals runs. Every step is one small POSIX-sh script run in the pod against the
run's folder (``/tmp/kgpu/runs/{run_id}/``, written by runner.sh); a long-poll is one script
that waits inside the pod. A backend inherits ``ExecRuns`` and gives it ``_exec``; one whose
runner is started by a host command that lasts as long as the run (``runc exec``, ``srun …
docker exec``) starts it with :meth:`ExecRuns.start_held_runner`.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

from gateway.pods import (
    READ_CHUNK,
    RUNS_DIR,
    SIGNAL_SCRIPT,
    WAIT_SCRIPT,
    PodError,
    RunState,
    run_float,
    run_int,
    safe_run_id,
    wait_ticks,
)
from gateway.pods.bounded import CALL_TIMEOUT_S, MAX_ANSWER

RUNNER_START_S = 30  # what a runner may take to write its pid file

# Prints the run's small files as key=value lines, whether the runner is alive, then
# for stdout and stderr "name size start length" and exactly `length` raw bytes from
# offset `start` (the files only grow, so bytes below the size read first are stable).
# A run may replace its files with symlinks (to a file its own user may not read, the
# gateway's exec being the pod's root) or FIFOs (a read would wait forever): anything but a
# regular file reads as empty, a symlinked run as missing.
STATE_SCRIPT = r"""
d="$1"; n="$2"
[ -d "$d" ] && [ ! -L "$d" ] || { echo missing; exit 0; }
echo found
# Whether the runner lives, first: it writes the exit code and then ends, so one seen gone has
# left its exit code for the reads below.
r=; [ -f "$d/runner_pid" ] && [ ! -L "$d/runner_pid" ] && r=$(cat "$d/runner_pid" 2>/dev/null)
if [ -n "$r" ] && kill -0 "$r" 2>/dev/null; then alive=1; else alive=0; fi
for f in pid runner_pid started_at completed_at exit_code; do
  v=; [ -f "$d/$f" ] && [ ! -L "$d/$f" ] && v=$(head -n 1 "$d/$f" 2>/dev/null)
  echo "$f=$v"
done
echo alive=$alive
t=0; [ -f "$d/timed_out" ] && [ ! -L "$d/timed_out" ] && t=1
echo timed_out=$t
for s in stdout stderr; do
  size=0; [ -f "$d/$s" ] && [ ! -L "$d/$s" ] && size=$(( $(wc -c 2>/dev/null < "$d/$s" || echo 0) + 0 ))
  if [ "$n" = follow ]; then  # args 3-5: the offsets asked and the most bytes a stream
    if [ "$s" = stdout ]; then start="$3"; else start="$4"; fi
    start=$((start < size ? start : size)); len=$((size - start)); len=$((len < $5 ? len : $5))
  else  # the last n bytes
    start=$((size > n ? size - n : 0)); len=$((size - start))
  fi
  echo "$s $size $start $len"
  [ "$len" -gt 0 ] && tail -c +$((start + 1)) "$d/$s" | head -c "$len"
done
exit 0
"""

# Put before STATE_SCRIPT with args RUN_DIR follow OUT_OFFSET ERR_OFFSET MAX TICKS: waits in the
# pod until the run has output past the offsets, or has ended, or TICKS twentieths of a second.
FOLLOW_WAIT_SCRIPT = r"""
left="$6"
while [ "$left" -gt 0 ] && [ -d "$1" ] && [ ! -e "$1/exit_code" ]; do
  runner=; [ -f "$1/runner_pid" ] && read -r runner < "$1/runner_pid" 2>/dev/null
  [ -n "$runner" ] && ! kill -0 "$runner" 2>/dev/null && break
  [ -f "$1/stdout" ] && [ "$(wc -c < "$1/stdout" 2>/dev/null || echo 0)" -gt "$3" ] && break
  [ -f "$1/stderr" ] && [ "$(wc -c < "$1/stderr" 2>/dev/null || echo 0)" -gt "$4" ] && break
  sleep 0.05; left=$((left - 1))
done
"""

READ_SCRIPT = r"""
f="$1"; off="$2"; max="$3"
[ -f "$f" ] && [ ! -L "$f" ] && [ ! -L "${f%/*}" ] || exit 0
tail -c +$((off + 1)) "$f" | head -c "$max"
"""

WAIT_PID_SCRIPT = r"""
d="$1"; i=0
while [ ! -e "$d/pid" ]; do
  [ "$i" -ge 100 ] && { echo wait; exit 0; }
  sleep 0.01; i=$((i + 1))
done
echo ok
"""

LIST_SCRIPT = r"""
for d in "$1"/*/; do [ -d "$d" ] && [ ! -L "${d%/}" ] && basename "$d"; done
exit 0
"""


def state_limit(tail_bytes: int) -> int:
    """The most a run-state answer holds: its two streams' bytes asked, and its small files."""
    return 2 * tail_bytes + (64 << 10)


def parse_state(ref: str, run_id: str, out: bytes, tail_bytes: int) -> RunState | None:
    """STATE_SCRIPT's answer as a RunState (None: no such run)."""
    head, _, rest = out.partition(b"\n")
    if head != b"found":
        return None
    fields: dict[str, str] = {}
    for _ in range(7):
        line, _, rest = rest.partition(b"\n")
        key, _, value = line.decode(errors="replace").partition("=")
        fields[key] = value.strip()
    streams: dict[str, tuple[bytes, bool]] = {}
    for _ in range(2):
        line, _, rest = rest.partition(b"\n")
        parts = line.decode(errors="replace").split()
        if len(parts) != 4:
            raise PodError(f"unexpected run-state answer from {ref}: {out[:200]!r}")
        stream, size, length = parts[0], int(parts[1]), int(parts[3])  # parts[2]: where it starts
        streams[stream] = (rest[:length], size > tail_bytes)
        rest = rest[length:]
    stdout, stdout_cut = streams["stdout"]
    stderr, stderr_cut = streams["stderr"]
    return RunState(
        run_id=run_id,
        pid=run_int(fields.get("pid")),
        started_at=run_float(fields.get("started_at")),
        completed_at=run_float(fields.get("completed_at")),
        exit_code=run_int(fields.get("exit_code")),
        alive=fields.get("alive") == "1",
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=stdout_cut,
        stderr_truncated=stderr_cut,
        timed_out=fields.get("timed_out") == "1",
    )


class ExecRuns:
    """The run half of PodBackend for a backend that reaches a pod by exec only."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], subprocess.Popen] = {}  # (ref, run id) -> its runner's host command
        self._held_lock = threading.Lock()

    def start_held_runner(
        self, ref: str, run_id: str, command: list[str], env: dict[str, str], stdin: bytes | None, *,
        name: str, keep_stderr: bool = False,
    ) -> None:
        """Start the runner of ``run_id`` by ``command``, a host command that lasts as long as the
        run, held by a thread of ours that writes ``stdin`` into it (None: no stdin) and waits for
        it, so it is reaped (left alone, it would be left for the host's init to reap); return
        once the runner has written its pid file. Its stdout is /dev/null, and its stderr too
        unless ``keep_stderr`` (only for a command whose stderr is its own, never the run's: a
        host file or pipe of ours the run could write to), when what it said explains an exit
        before the run started. ``name`` names it in errors. Held until it exits, or
        :meth:`kill_held`."""
        try:
            step = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if keep_stderr else subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            raise PodError(f"could not start {name} in {ref}: {exc}") from exc
        key, said = (ref, run_id), []
        with self._held_lock:
            self._held[key] = step

        def hold() -> None:
            said.append(step.communicate(stdin)[1] or b"")
            with self._held_lock:
                if self._held.get(key) is step:
                    del self._held[key]

        threading.Thread(target=hold, daemon=True).start()

        def ended() -> str | None:
            if step.poll() is None:
                return None
            if keep_stderr:
                time.sleep(0.1)  # the holder thread has read what it said
            detail = b"".join(said).decode(errors="replace").strip()[-300:]
            return f"{name} exited with {step.returncode} before the run started" + (f": {detail}" if detail else "")

        self.await_runner(ref, f"{RUNS_DIR}/{safe_run_id(run_id)}", ended)

    def kill_held(self, ref: str) -> None:
        """Kill the host commands that hold the runs of ``ref`` (its pod is gone)."""
        with self._held_lock:
            for key in [key for key in self._held if key[0] == ref]:
                self._held.pop(key).kill()

    def _exec(self, ref: str, script: str, *args: str, timeout: float | None = None, limit: int = MAX_ANSWER) -> bytes:
        """``sh -c script kgpu args...`` in the pod: its stdout, within ``timeout`` seconds and
        ``limit`` bytes (past them the call is killed and PodError raised)."""
        raise NotImplementedError

    def await_runner(self, ref: str, run_dir: str, ended: Callable[[], str | None]) -> None:
        """Return once the runner started in ``run_dir`` has written its pid file. ``ended()``
        says why the command that started it has exited (None while it runs): a runner gone
        before its pid file is an error, unless its command ran and ended in a moment."""
        deadline = time.monotonic() + RUNNER_START_S
        while True:
            if self._exec(ref, WAIT_PID_SCRIPT, run_dir).strip() == b"ok":  # waits in the pod ~1 s
                return
            why = ended()
            if why is not None:
                if self._exec(ref, WAIT_PID_SCRIPT, run_dir).strip() == b"ok":
                    return
                raise PodError(why)
            if time.monotonic() > deadline:
                raise PodError(f"the runner did not start within {RUNNER_START_S} s")

    def run_state(self, ref: str, run_id: str, tail_bytes: int) -> RunState | None:
        tail = max(0, int(tail_bytes))
        out = self._exec(ref, STATE_SCRIPT, f"{RUNS_DIR}/{safe_run_id(run_id)}", str(tail), limit=state_limit(tail))
        return parse_state(ref, run_id, out, tail)

    def wait_run(self, ref: str, run_id: str, seconds: float, tail_bytes: int) -> RunState | None:
        """One exec: waits in the pod for the run to end (or ``seconds``), then reads its state."""
        tail = max(0, int(tail_bytes))
        run_dir = f"{RUNS_DIR}/{safe_run_id(run_id)}"
        out = self._exec(
            ref, WAIT_SCRIPT + STATE_SCRIPT, run_dir, str(tail), str(wait_ticks(seconds)),
            timeout=seconds + CALL_TIMEOUT_S, limit=state_limit(tail),
        )
        return parse_state(ref, run_id, out, tail)

    def follow_run(self, ref: str, run_id: str, offsets: dict[str, int], seconds: float) -> RunState | None:
        """One exec: waits in the pod for output past ``offsets`` or the run's end (or
        ``seconds``), then answers its state with the new bytes as stdout and stderr."""
        run_dir = f"{RUNS_DIR}/{safe_run_id(run_id)}"
        args = [str(max(0, int(offsets.get(name, 0)))) for name in ("stdout", "stderr")]
        out = self._exec(
            ref, FOLLOW_WAIT_SCRIPT + STATE_SCRIPT, run_dir, "follow", *args, str(READ_CHUNK), str(wait_ticks(seconds)),
            timeout=seconds + CALL_TIMEOUT_S, limit=state_limit(READ_CHUNK),
        )
        return parse_state(ref, run_id, out, READ_CHUNK)

    def run_ids(self, ref: str) -> list[str]:
        out = self._exec(ref, LIST_SCRIPT, RUNS_DIR)
        return sorted(line for line in out.decode(errors="replace").splitlines() if line)

    def read_output(self, ref: str, run_id: str, stream: str, offset: int) -> bytes:
        if stream not in ("stdout", "stderr"):
            raise PodError(f"no stream {stream!r}")
        path = f"{RUNS_DIR}/{safe_run_id(run_id)}/{stream}"
        return self._exec(ref, READ_SCRIPT, path, str(max(0, int(offset))), str(READ_CHUNK), limit=READ_CHUNK)

    def signal_run(self, ref: str, run_id: str, signal_name: str) -> None:
        if signal_name not in ("TERM", "KILL"):
            raise PodError(f"unsupported signal {signal_name!r}")
        self._exec(ref, SIGNAL_SCRIPT, f"{RUNS_DIR}/{safe_run_id(run_id)}", signal_name)
