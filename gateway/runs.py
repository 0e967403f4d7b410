"""Runs: commands executed inside a rental's pod. Their state lives in the pod (SPEC decision 7)."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from gateway.pods import RunState


def new_run_id(gpu_id: str) -> str:
    """``run-{rental}-{random}``: the rental is readable from the id, so no table is needed."""
    return f"run-{gpu_id.removeprefix('gpu-')}-{secrets.token_hex(4)}"


_RUN_ID = re.compile(r"^run-([0-9a-f]{1,40})-[0-9a-f]{1,40}$")


def is_run_id(run_id: str) -> bool:
    """The shape :func:`new_run_id` makes; anything else names no run (and never reaches a pod)."""
    return bool(_RUN_ID.match(run_id))


def rental_of(run_id: str) -> str | None:
    match = _RUN_ID.match(run_id)
    return f"gpu-{match.group(1)}" if match else None


def phase(state: RunState) -> str:
    if not state.finished:
        return "Running"
    return "Succeeded" if state.exit_code == 0 else "Failed"


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")


def run_summary(gpu_id: str, state: RunState) -> dict:
    end = state.completed_at
    elapsed = None
    if state.started_at is not None and (end is not None or not state.finished):
        # A run killed with its wrapper has no completion time: its elapsed time is unknown.
        elapsed = round((end or datetime.now(timezone.utc).timestamp()) - state.started_at, 3)
    return {
        "run_id": state.run_id,
        "gpu_id": gpu_id,
        "phase": phase(state),
        "exit_code": state.exit_code if state.exit_code is not None else (137 if state.finished else None),
        "started_at": _iso(state.started_at),
        "completed_at": _iso(end),
        "elapsed_seconds": elapsed,
        "pid": state.pid,
    }


def run_reply(gpu_id: str, state: RunState) -> dict:
    return {
        **run_summary(gpu_id, state),
        "stdout": state.stdout.decode("utf-8", errors="replace"),
        "stderr": state.stderr.decode("utf-8", errors="replace"),
        "truncated": {"stdout": state.stdout_truncated, "stderr": state.stderr_truncated},
    }
