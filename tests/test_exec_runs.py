"""gateway/pods/exec_runs.py ExecRuns.start_held_runner: a run's runner started by a host command
that lasts as long as the run (docker's ``runc exec``, slurm's ``srun … docker exec``) is fed its
stdin, held and reaped by the gateway, and one that ends before the runner starts says why. The
"pod" here is this host's sh, its runs folder under tmp_path (the docker and slurm cases run in
tests/test_pod_conformance.py)."""

from __future__ import annotations

import os
import time

import pytest

from gateway.pods import RUNS_DIR, PodError
from gateway.pods.bounded import MAX_ANSWER, run_bounded
from gateway.pods.exec_runs import ExecRuns


class HostRuns(ExecRuns):
    """ExecRuns over this host's sh, with RUNS_DIR mapped to ``root``."""

    def __init__(self, root):
        super().__init__()
        self.root = str(root)

    def _exec(self, ref, script, *args, timeout=None, limit=MAX_ANSWER):
        args = [arg.replace(RUNS_DIR, self.root) for arg in args]
        return run_bounded(["sh", "-c", script, "kgpu", *args], timeout=timeout or 10, limit=limit).stdout


def gone(pid: int) -> bool:
    """Ended and reaped: not even a zombie left."""
    return not os.path.exists(f"/proc/{pid}")


def test_a_held_runner_is_fed_its_stdin_then_killed_and_reaped(tmp_path):
    runs = HostRuns(tmp_path)
    run_dir = tmp_path / "r1"
    runner = f'mkdir -p {run_dir}; cat > {run_dir}/stdin; echo $$ > {run_dir}/pid; exec sleep 60'
    runs.start_held_runner("pod-a", "r1", ["sh", "-c", runner], {"PATH": os.defpath}, b"the run's input", name="runner")
    assert (run_dir / "stdin").read_bytes() == b"the run's input"
    pid = int((run_dir / "pid").read_text())
    assert not gone(pid)
    runs.kill_held("pod-b")  # another pod's: this run lives on
    assert not gone(pid)
    runs.kill_held("pod-a")
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(pid), "the held command was killed and reaped by its holder"


def test_a_held_command_that_ends_before_its_runner_says_why(tmp_path):
    runs = HostRuns(tmp_path)
    with pytest.raises(PodError, match=r"^the run's srun exited with 3 before the run started: no such container$"):
        runs.start_held_runner(
            "pod", "r2", ["sh", "-c", "echo no such container >&2; exit 3"], {"PATH": os.defpath}, None,
            name="the run's srun", keep_stderr=True,
        )
    # Without keep_stderr its words are not read (they could be the run's own): only the status.
    with pytest.raises(PodError, match=r"^runc exited with 4 before the run started$"):
        runs.start_held_runner(
            "pod", "r3", ["sh", "-c", "echo words of the run >&2; exit 4"], {"PATH": os.defpath}, b"", name="runc"
        )


def test_a_command_that_cannot_start_is_a_pod_error(tmp_path):
    with pytest.raises(PodError, match="could not start runc in pod"):
        HostRuns(tmp_path).start_held_runner("pod", "r4", [str(tmp_path / "no-such-binary")], {}, b"", name="runc")
