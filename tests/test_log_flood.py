"""What a tenant, or anyone who can reach the port, makes the gateway log: at most one short line
for each thing they do, never a traceback, never a line break of theirs. Over HTTP on the local
backend, as a hostile tenant would: run files that name impossible times, a URL tens of KiB long,
a pod whose last writes to /files could not be uploaded. Below them, the rules they rest on."""

from __future__ import annotations

import io
import logging

import pytest
import requests

from gateway import access_log
from gateway.log_line import Sparse, one_line
from gateway.pods import run_float
from gateway.pods.mounts import FLUSH_LOG_CHARS, flush_report_logged
from tests.test_pod_files import in_pod

live = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
FORGED = "\nERROR kgpu forged line\r\x1b[2J"


def _no_traceback(server_log) -> None:
    text = server_log.text
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in server_log.records), text[-3000:]


@live
def test_run_files_naming_impossible_times_are_answered_not_a_traceback(stack, user, gpu, server_log):
    """A run's files are in the pod's /tmp, the tenant's to write: a time no datetime holds is
    garbled (null), as any other garbled time is; before, every listing was a 500 and a traceback."""
    runs = []
    for moment in ("nan", "inf", "1e20"):
        started = requests.post(f"{stack.base}/v1/runs", json={"gpu_id": gpu, "command": ["true"], "wait_seconds": 30},
                                headers=user.auth)
        assert started.status_code == 200 and started.json()["exit_code"] == 0, started.text
        run_id = started.json()["run_id"]
        in_pod(stack, user, gpu, f"cd /tmp/kgpu/runs/{run_id} && echo {moment} > started_at && echo {moment} > completed_at")
        runs.append(run_id)
    listed = requests.get(f"{stack.base}/v1/runs", params={"gpu_id": gpu}, headers=user.auth)
    assert listed.status_code == 200, listed.text
    for run_id in runs:
        one = requests.get(f"{stack.base}/v1/runs/{run_id}", headers=user.auth)
        assert one.status_code == 200, one.text
        assert (one.json()["started_at"], one.json()["completed_at"], one.json()["exit_code"]) == (None, None, 0)
    assert {run["run_id"] for run in listed.json()["runs"]} >= set(runs)
    _no_traceback(server_log)


@live
def test_a_url_tens_of_kib_long_is_one_short_access_line(stack, user):
    """Anyone, signed in or not, can send a URL as long as uvicorn takes (tens of KiB): its line
    keeps the path's start and end, escaped, on one line under 1 KiB."""
    written = io.StringIO()
    writer = access_log.start(logging.StreamHandler(written))
    try:
        long_names = [
            "/v1/files/" + "%0AERROR%20forged" * 3000,  # refused (no token): 401
            "/v1/files/start-" + "a" * 50_000 + "-end",
        ]
        answers = [requests.get(f"{stack.base}{path}", headers=headers, allow_redirects=False)
                   for path, headers in zip(long_names, ({}, user.auth))]
    finally:
        access_log.stop(writer)
    assert [a.status_code for a in answers][0] == 401
    lines = written.getvalue().splitlines()
    assert len(lines) == len(long_names) and written.getvalue().count("\n") == len(long_names), lines
    for line, path in zip(lines, long_names):
        assert len(line) < 1024, len(line)
        logged = line.split(" path=", 1)[1].split(" status=", 1)[0]
        assert logged.startswith(path[:100]) and logged.endswith(path[-100:]) and "..." in logged, logged


@live
def test_a_pods_unflushed_report_is_one_short_warning(stack, user, gpu, server_log, monkeypatch):
    """kgpu-flush's report quotes rclone on the tenant's files, names with newlines included: the
    warning about it is one line of at most FLUSH_LOG_CHARS of it; the rental keeps it whole."""
    backend = stack.server.app.state.rentals.backend
    destroy = backend.destroy
    report = ("kgpu-flush: /files: refused by the drive: big" + FORGED + ".bin ") * 80

    def destroy_leaving_writes(ref):
        destroy(ref)
        return report

    monkeypatch.setattr(backend, "destroy", destroy_leaving_writes)
    ended = requests.delete(f"{stack.base}/v1/gpus/{gpu}", headers=user.auth)
    assert ended.status_code == 200 and ended.json()["flush_error"] == report, ended.text
    about_it = [r for r in server_log.records if "not every write to /files" in r.getMessage()]
    assert len(about_it) == 1, server_log.text[-3000:]
    line = about_it[0].getMessage()
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and len(line) < 1024, line
    assert gpu in line and line.endswith(flush_report_logged(report))
    _no_traceback(server_log)


def test_run_float_keeps_only_the_times_a_datetime_holds():
    assert run_float("1700000000.25") == 1700000000.25
    assert run_float("1700000000.%N") == 1700000000.0  # a date without %N: its seconds kept
    assert run_float("253402300799") == 253402300799.0  # 9999-12-31 23:59:59 UTC
    for garbled in ("nan", "inf", "-inf", "1e20", "-1", "253402300800", "soon", "", None):
        assert run_float(garbled) is None, garbled


def test_one_line_stays_short_when_escaping_lengthens_it():
    """Each control or non-ASCII character escapes to up to 10 characters: the limit holds after."""
    for text in ("\x00" * 5000, "\U0001f600" * 5000, FORGED * 500):
        said = one_line(text, 200)
        assert said.isascii() and said.isprintable() and len(said) <= 203, (len(said), said[:80])
    assert one_line("/tmp/plain.bin") == "/tmp/plain.bin"
    assert len(flush_report_logged("x" * 4000)) <= FLUSH_LOG_CHARS + 3


def test_sparse_lets_one_line_a_key_through_each_period_and_counts_the_rest(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("gateway.log_line.time.monotonic", lambda: now[0])
    sparse = Sparse(seconds=60, keys=3)
    assert sparse.due("10.0.0.1") == 0  # the first: logged
    assert [sparse.due("10.0.0.1") for _ in range(5)] == [None] * 5  # held back
    assert sparse.due("10.0.0.2") == 0  # another key has its own line
    now[0] += 61
    assert sparse.due("10.0.0.1") == 5  # a minute on: logged, saying how many were held back
    assert sparse.due("10.0.0.1") is None
    # at most 3 keys: a new one makes room by forgetting the quiet ones (.2, logged a minute ago),
    # and waits while every one remembered is recent
    assert sparse.due("10.0.0.3") == 0
    assert sparse.due("10.0.0.4") == 0
    assert sparse.due("10.0.0.5") is None
    now[0] += 61
    assert sparse.due("10.0.0.5") == 0
    assert len(sparse._last) == 1
