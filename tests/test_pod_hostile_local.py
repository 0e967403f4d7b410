"""A hostile tenant in a local pod: what the local backend's own sandbox promises (its own uid,
its own network with the API base only). The backend-generic attacks are in tests/test_pod_hostile.py."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gateway.pods import PodError
from gateway.pods.disk import IMAGE
from tests.test_pod_hostile import STOP_EVERYTHING, sh, start_pod
from tests.test_pod_hostile import host_service  # noqa: F401 - a fixture

pytestmark = pytest.mark.parametrize("pod_backend", ["local"], indirect=True)


class _Api(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"api-reached")

    def log_message(self, *args):
        pass


def test_a_local_pod_reaches_its_api_base_and_nothing_else(pod_backend, host_service):
    """The local backend's pods have their own network: the API base (and the store) through the
    relay, no other port of the host's loopback."""
    api = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    ref = start_pod(pod_backend, {"KGPU_API_BASE": f"http://127.0.0.1:{api.server_address[1]}"})
    try:
        code, out, _ = sh(pod_backend, ref, f"""
            curl -s --max-time 5 "$KGPU_API_BASE/v1/me"; echo
            curl -s --max-time 3 telnet://127.0.0.1:{host_service} </dev/null; echo done""")
        assert out.startswith("api-reached"), out
        assert "HOST-SERVICE" not in out
    finally:
        pod_backend.destroy(ref)
        api.shutdown()


def test_a_local_pod_runs_under_its_own_uid_and_its_token_stays_in_it(pod_backend):
    token = "kgpu_" + secrets.token_hex(24)
    first = start_pod(pod_backend, {"KGPU_API_TOKEN": token})
    second = start_pod(pod_backend)
    try:
        one = sh(pod_backend, first, "id -u; printf %s \"$KGPU_API_TOKEN\"")[1].split("\n", 1)
        two = sh(pod_backend, second, "id -u")[1].strip()
        assert one[1] == token  # the run has its pod's token
        uids = {int(one[0]), int(two)}
        assert len(uids) == 2 and os.geteuid() not in uids and 0 not in uids
        # The gateway's own files hold no copy of it (the database keeps a hash).
        for path in pod_backend.root.rglob("*"):
            inside_pod = {"workspace", "tmp"} & set(path.relative_to(pod_backend.root).parts)
            pods_own_disk = path.name == IMAGE  # /workspace and /tmp's backing file: the pod's own bytes
            if path.is_file() and not path.is_symlink() and path.name != "token" and not inside_pod and not pods_own_disk:
                assert token not in path.read_text(errors="replace"), path
    finally:
        pod_backend.destroy(first)
        pod_backend.destroy(second)


def test_a_stopped_pods_sandbox_goes_with_its_return(pod_backend):
    """Issue 19 (8): a pod that stops every process of its uid (the gateway's root nsenter into it
    among them) no longer pins the pod's namespace once it is returned."""
    ref = start_pod(pod_backend)
    pod_backend.start_run(ref, "run-stopper", ["sh", "-c", STOP_EVERYTHING], {})
    holder = pod_backend._record(pod_backend.root / ref).get("holder_pid")
    time.sleep(2)
    pod_backend.call_timeout_s = 2
    with contextlib.suppress(PodError):
        pod_backend.signal_run(ref, "run-stopper", "TERM")
    pod_backend.destroy(ref)
    assert holder
    deadline = time.monotonic() + 15
    while Path(f"/proc/{holder}").exists():
        assert time.monotonic() < deadline, f"the pod's sandbox (pid {holder}) is still there after its return"
        time.sleep(0.2)
