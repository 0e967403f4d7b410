"""SPEC decision 9: the envelope, X-Request-ID, and no traceback ever."""

from __future__ import annotations

import pytest
import requests

from drive.store.embedded import free_port
from tests.conftest import ADMIN_TOKEN, LiveServer, S3Target, make_settings


def assert_envelope(reply: requests.Response, status: int, code: str) -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error_code", "message", "trace_id"}
    assert body["error_code"] == code
    assert body["trace_id"] == reply.headers["X-Request-ID"]
    assert "Traceback" not in reply.text
    return body


def test_request_id_is_echoed_or_made(stack):
    echoed = requests.get(f"{stack.base}/healthz", headers={"X-Request-ID": "my-trace-42"})
    assert echoed.headers["X-Request-ID"] == "my-trace-42"
    made = requests.get(f"{stack.base}/healthz", headers={"X-Request-ID": "bad id with spaces"})
    assert made.headers["X-Request-ID"] != "bad id with spaces" and len(made.headers["X-Request-ID"]) == 32
    failed = requests.get(f"{stack.base}/v1/me", headers={"X-Request-ID": "trace-on-error"})
    assert_envelope(failed, 401, "unauthorized")["trace_id"] == "trace-on-error"


def test_unknown_route_and_method(stack, user):
    assert_envelope(requests.get(f"{stack.base}/v1/nothing-here", headers=user.auth), 404, "not_found")
    assert_envelope(requests.patch(f"{stack.base}/v1/files/a.txt", headers=user.auth), 405, "method_not_allowed")


def test_405_names_every_method_of_the_path(stack, user):
    """Allow lists what every route on the path answers, not only the first route's methods."""
    for method, path, allowed in (
        ("PATCH", "/v1/gpus", "GET, POST"),
        ("PUT", "/v1/gpus/gpu-0123", "GET, PATCH, DELETE"),
        ("POST", "/v1/runs/run-x", "GET, DELETE"),
    ):
        reply = requests.request(method, f"{stack.base}{path}", headers=user.auth)
        assert_envelope(reply, 405, "method_not_allowed")
        assert reply.headers["Allow"] == allowed, (method, path, reply.headers["Allow"])
        assert reply.json()["message"] == f"{method} is not allowed here; allowed: {allowed}"
    drive = "GET, HEAD, PUT, POST, DELETE, OPTIONS, PROPFIND, PROPPATCH, MKCOL, COPY, MOVE, LOCK, UNLOCK"
    for path in ("/v1/files/a.txt", "/v1/files/", "/v1/dav/a.txt", "/v1/files/shared/x/a.txt"):
        reply = requests.request("PATCH", f"{stack.base}{path}", headers=user.auth)
        assert_envelope(reply, 405, "method_not_allowed")
        assert reply.headers["Allow"] == drive, (path, reply.headers["Allow"])


def test_bad_content_length_is_400(stack, user):
    from tests.clients import raw_request

    head = (
        f"PUT /v1/files/x.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
        "Content-Length: -5\r\nConnection: close\r\n\r\n"
    ).encode()
    assert raw_request(stack.base, head).startswith(b"HTTP/1.1 400")


def test_openapi_and_docs(stack):
    spec = requests.get(f"{stack.base}/openapi.json").json()
    assert "/v1/files/{path}" in spec["paths"] and "/v1/admin/users" in spec["paths"]
    assert requests.get(f"{stack.base}/docs").status_code == 200


@pytest.fixture(scope="module")
def storeless(tmp_path_factory):
    """A server whose object store is a closed port."""
    dead = S3Target("dead", f"http://127.0.0.1:{free_port()}", "nobody", "nothing", False)
    server = LiveServer(make_settings(tmp_path_factory.mktemp("storeless"), dead))
    boom = lambda: 1 / 0  # noqa: E731
    server.app.add_api_route("/v1/test-boom", boom)
    server.start()
    yield server
    server.stop()


def test_store_unreachable_is_503(storeless):
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    token = requests.post(f"{storeless.base}/v1/admin/users", json={"email": "s@lab.example"}, headers=admin).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert_envelope(requests.get(f"{storeless.base}/v1/files", headers=auth), 503, "store_unavailable")
    assert_envelope(requests.get(f"{storeless.base}/v1/files/d/", headers=auth), 503, "store_unavailable")
    assert_envelope(requests.put(f"{storeless.base}/v1/files/a.txt", data=b"abc", headers=auth), 503, "store_unavailable")
    assert_envelope(requests.delete(f"{storeless.base}/v1/files/a.txt", headers=auth), 503, "store_unavailable")
    assert requests.head(f"{storeless.base}/v1/files/a.txt", headers=auth).status_code == 503
    health = requests.get(f"{storeless.base}/healthz")
    assert health.status_code == 503 and health.json()["checks"]["object_store"] == "unavailable"


def test_unhandled_error_is_a_500_envelope(storeless):
    assert_envelope(requests.get(f"{storeless.base}/v1/test-boom"), 500, "internal_error")
