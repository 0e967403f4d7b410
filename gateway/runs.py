"""Runs: commands executed inside a rental's pod. Their state lives in the pod (SPEC decision 7)."""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from datetime import datetime, timezone
from enum import StrEnum

from gateway.domain_errors import Conflict, Gone, NotFound
from gateway.pods import NO_INPUT, RunInput, RunState
from gateway.principal import Principal
from gateway.rentals import Rentals
from gateway.rentals.phases import WITH_POD


MAX_STDIN_BYTES = 1 << 20  # what a run may be given on its stdin (seed 001's exec)
MAX_TIMEOUT_SECONDS = 300
ENDING_SLACK_SECONDS = 2  # a run ended at its time limit: how long its runner may take to record it


def text_stdin(text: str) -> bytes:
    """A run's stdin given as text: its UTF-8 bytes, at most MAX_STDIN_BYTES."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("stdin is not valid Unicode (a lone surrogate); send bytes as stdin_base64") from None
    return _bounded(data)


def base64_stdin(encoded: str) -> bytes:
    """A run's stdin given as base64: its bytes, at most MAX_STDIN_BYTES."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("stdin_base64 is not valid base64") from None
    return _bounded(data)


def _bounded(data: bytes) -> bytes:
    if len(data) > MAX_STDIN_BYTES:
        raise ValueError(f"stdin is {len(data)} bytes; at most {MAX_STDIN_BYTES}")
    return data


def new_run_id(rental_id: str) -> str:
    """``run-{rental}-{random}``: the rental is readable from the id, so no table is needed."""
    return f"run-{rental_id.removeprefix('gpu-')}-{secrets.token_hex(4)}"


_RUN_ID = re.compile(r"^run-([0-9a-f]{1,40})-[0-9a-f]{1,40}$")


def is_run_id(run_id: str) -> bool:
    """The shape :func:`new_run_id` makes; anything else names no run (and never reaches a pod)."""
    return bool(_RUN_ID.match(run_id))


def rental_of(run_id: str) -> str | None:
    match = _RUN_ID.match(run_id)
    return f"gpu-{match.group(1)}" if match else None


class RunPhase(StrEnum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # exit code 0
    FAILED = "Failed"  # any other end, a kill included


def phase(state: RunState) -> RunPhase:
    if not state.finished:
        return RunPhase.RUNNING
    return RunPhase.SUCCEEDED if state.exit_code == 0 else RunPhase.FAILED


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")


def run_summary(rental_id: str, state: RunState) -> dict:
    end = state.completed_at
    elapsed = None
    if state.started_at is not None and (end is not None or not state.finished):
        # A run killed with its wrapper has no completion time: its elapsed time is unknown.
        elapsed = round((end or datetime.now(timezone.utc).timestamp()) - state.started_at, 3)
    return {
        "run_id": state.run_id,
        "gpu_id": rental_id,
        "phase": phase(state),
        "exit_code": state.exit_code if state.exit_code is not None else (137 if state.finished else None),
        "started_at": _iso(state.started_at),
        "completed_at": _iso(end),
        "elapsed_seconds": elapsed,
        "pid": state.pid,
        "timed_out": state.timed_out,
    }


def run_reply(rental_id: str, state: RunState) -> dict:
    return {
        **run_summary(rental_id, state),
        "stdout": state.stdout.decode("utf-8", errors="replace"),
        "stderr": state.stderr.decode("utf-8", errors="replace"),
        "truncated": {"stdout": state.stdout_truncated, "stderr": state.stderr_truncated},
    }


class Runs:
    """The runs of a caller's rentals: where a run's pod is, and starting, reading, waiting on,
    following and signalling runs there. Blocking: each answer may be a docker exec or an srun."""

    def __init__(self, rentals: Rentals):
        self.rentals = rentals

    def pod(self, principal: Principal, rental_id: str, *, must_be_ready: bool = False) -> str:
        """The pod of the caller's rental ``rental_id``, which must be live (and ready, if asked)."""
        with self.rentals.sessions() as session:
            rental = self.rentals.get(session, principal, rental_id)
            if rental.phase not in WITH_POD or not rental.pod_ref:
                not_running = Gone if rental.ended_at else Conflict
                raise not_running("gpu_not_running", f"{rental_id} is {rental.phase}")
            if must_be_ready and not rental.ready:
                raise Conflict("gpu_not_ready", f"{rental_id} is not ready yet ({rental.pending_reason})")
            return rental.pod_ref

    def locate(self, principal: Principal, run_id: str, rental_id: str | None) -> tuple[str, str]:
        """(rental id, pod ref) of a run: the hint, else the rental written in the run id."""
        rental_id = rental_id or rental_of(run_id)
        if rental_id is None or not is_run_id(run_id):
            raise NotFound("run_not_found", f"no run {run_id}")
        return rental_id, self.pod(principal, rental_id)

    def start(
        self, principal: Principal, rental_id: str, command: list[str], env: dict[str, str], given: RunInput = NO_INPUT
    ) -> tuple[str, str]:
        """Start a run on the caller's ready rental (with ``given``: its stdin, its time limit);
        returns (pod ref, run id). A run is activity."""
        ref = self.pod(principal, rental_id, must_be_ready=True)
        run_id = new_run_id(rental_id)
        self._backend.start_run(ref, run_id, command, env, given)
        self.rentals.touch(rental_id)
        return ref, run_id

    def state(self, ref: str, run_id: str) -> RunState:
        """The run's state with the tails of its output."""
        return _found(run_id, self._backend.run_state(ref, run_id, self._tail_bytes))

    def peek(self, ref: str, run_id: str) -> RunState | None:
        """The run's state without its output (None: no such run)."""
        return self._backend.run_state(ref, run_id, 0)

    def wait(self, ref: str, run_id: str, seconds: float) -> RunState:
        """The run's state once it ends, or after ``seconds``: one wait inside the pod."""
        return _found(run_id, self._backend.wait_run(ref, run_id, seconds, self._tail_bytes))

    def follow(self, ref: str, run_id: str, offsets: dict[str, int], seconds: float) -> RunState | None:
        """Its output past ``offsets`` once there is some, or its end, or after ``seconds``."""
        return self._backend.follow_run(ref, run_id, offsets, seconds)

    def signal(self, ref: str, run_id: str, signal: str) -> None:
        self._backend.signal_run(ref, run_id, signal)

    def in_pod(self, rental_id: str, ref: str) -> list[dict]:
        """Summaries of every run in a rental's pod."""
        return [
            run_summary(rental_id, state)
            for run_id in self._backend.run_ids(ref)
            if (state := self._backend.run_state(ref, run_id, 0)) is not None
        ]

    def of(self, principal: Principal, rental_id: str | None = None) -> list[dict]:
        """Summaries of the runs on the caller's live rentals (only ``rental_id``'s when given), oldest first."""
        with self.rentals.sessions() as session:
            if rental_id:
                targets = [self.rentals.get(session, principal, rental_id)]
            else:
                targets = self.rentals.active_of(session, principal)
            live = [(r.id, r.pod_ref) for r in targets if r.pod_ref and r.phase in WITH_POD]
        found = [summary for rental_id, ref in live for summary in self.in_pod(rental_id, ref)]
        found.sort(key=lambda run: (run["started_at"] or "", run["run_id"]))
        return found

    @property
    def _backend(self):
        return self.rentals.backend

    @property
    def _tail_bytes(self) -> int:
        return self.rentals.settings.run_output_tail_bytes


def _found(run_id: str, state: RunState | None) -> RunState:
    if state is None:
        raise NotFound("run_not_found", f"no run {run_id}")
    return state
