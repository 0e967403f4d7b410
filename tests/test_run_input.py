"""POST /v1/runs with stdin and a time limit (issue 22, item 3; seed 001's exec): stdin as text or
base64 (at most 1 MiB), timeout_seconds 1-300 (TERM, then KILL; output kept, timed_out: true).
The backends' side is in tests/test_pod_conformance.py, on local, docker and slurm."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import requests

from tests.test_rentals import run

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
MiB = 1 << 20


def test_stdin_as_text_and_as_base64(stack, user, gpu):
    out = run(stack.base, user.token, gpu, ["sh", "-c", "cat; echo; echo end"], stdin="héllo\nwörld")
    assert (out["exit_code"], out["stdout"], out["timed_out"]) == (0, "héllo\nwörld\nend\n", False)
    data = os.urandom(MiB)  # binary, exactly the most
    out = run(stack.base, user.token, gpu, ["sha256sum"], stdin_base64=base64.b64encode(data).decode(), wait_seconds=30)
    assert out["stdout"].split()[0] == hashlib.sha256(data).hexdigest()
    out = run(stack.base, user.token, gpu, ["sh", "-c", "cat | wc -c"])
    assert out["stdout"].strip() == "0"  # no stdin: an empty one


def test_a_run_past_its_time_limit_answers_when_ended_with_its_output(stack, user, gpu):
    """No wait_seconds: the answer comes once the runner has ended it (not after wait_seconds' 10 s)."""
    out = run(stack.base, user.token, gpu, ["sh", "-c", "echo before; sleep 60; echo after"], timeout_seconds=1)
    assert (out["phase"], out["exit_code"], out["timed_out"], out["stdout"]) == ("Failed", 143, True, "before\n")
    again = requests.get(f"{stack.base}/v1/runs/{out['run_id']}", headers=user.auth).json()
    assert again["timed_out"] is True
    listed = requests.get(f"{stack.base}/v1/runs?gpu_id={gpu}", headers=user.auth).json()["runs"]
    assert [r["timed_out"] for r in listed if r["run_id"] == out["run_id"]] == [True]


def test_a_run_within_its_time_limit_answers_at_its_end(stack, user, gpu):
    out = run(stack.base, user.token, gpu, ["sh", "-c", "read line; echo got $line"], stdin="it\n", timeout_seconds=300)
    assert (out["phase"], out["exit_code"], out["timed_out"], out["stdout"]) == ("Succeeded", 0, False, "got it\n")


@pytest.mark.parametrize(
    "extra",
    [
        {"stdin": "a", "stdin_base64": "YQ=="},
        {"stdin_base64": "not base64!"},
        {"stdin_base64": "YQ="},
        {"stdin_base64": base64.b64encode(b"x" * (MiB + 1)).decode()},
        {"stdin": "x" * (MiB + 1)},
        {"stdin": "é" * (MiB // 2 + 1)},  # under 1 Mi characters, over 1 MiB of UTF-8
        {"stdin": 7},
        {"timeout_seconds": 0},
        {"timeout_seconds": 301},
        {"timeout_seconds": "5"},
        {"timeout_seconds": 1.5},
        {"timeout_seconds": True},
    ],
)
def test_bad_stdin_or_time_limits_are_a_422_and_start_nothing(stack, user, gpu, extra):
    before = requests.get(f"{stack.base}/v1/runs?gpu_id={gpu}", headers=user.auth).json()["runs"]
    reply = requests.post(
        f"{stack.base}/v1/runs", json={"gpu_id": gpu, "command": ["true"], **extra}, headers=user.auth
    )
    assert reply.status_code == 422, reply.text
    assert set(reply.json()) == {"error_code", "message", "trace_id"}
    assert requests.get(f"{stack.base}/v1/runs?gpu_id={gpu}", headers=user.auth).json()["runs"] == before
