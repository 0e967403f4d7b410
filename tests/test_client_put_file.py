"""client/api.py ``Api.put_file`` (``kgpu cp FILE gpu-…:PATH``) against servers played by hand, over
http and https: it asks first (``Expect: 100-continue``), so a refusal comes back before any of the
body is sent, even from a server that hangs up once it has answered; a ``100 Continue`` gets the
body, and so does a server that never answers the question, after a short wait. The real server's
side (uvicorn sends its 100 only once a route reads the body) is tests/test_client.py's."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

from client import api as client_api
from client.api import Api, ApiError
from client.config import Login
from tests.tcp_relay import relay
from tests.test_store_tls import _certificates

SIZE = 8 << 20  # well past what the sockets' buffers take without the server reading


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> tuple[str, str]:
    return _certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(params=["http", "https"])
def scheme(request, certificates, monkeypatch) -> str:
    if request.param == "https":
        monkeypatch.setenv("SSL_CERT_FILE", certificates[0])  # what the client's default TLS context trusts
    return request.param


class OneConnection:
    """A server for one connection: it reads the request's head, then plays ``serve(connection,
    head)``, whose result is :attr:`result` once :meth:`join` returns."""

    def __init__(self, scheme: str, certificates: tuple[str, str], serve: Callable[[socket.socket, str], object]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.tls = None
        if scheme == "https":
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(certificates[1])
        self.base = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.serve, self.result, self.failure = serve, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            connection, _ = self.listener.accept()
            if self.tls is not None:
                connection = self.tls.wrap_socket(connection, server_side=True)
            connection.settimeout(30)
            with connection:
                self.result = self.serve(connection, _head(connection))
        except BaseException as exc:  # the test reads it in join()
            self.failure = exc
        finally:
            self.listener.close()

    def join(self):
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server never finished"
        if self.failure is not None:
            raise self.failure
        return self.result


def _head(connection: socket.socket) -> str:
    """The request's head, read a byte at a time so that none of its body is taken with it."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = connection.recv(1)
        assert byte, f"the connection closed inside the head: {head!r}"
        head += byte
    return head.decode("latin-1")


def _body(connection: socket.socket, length: int) -> bytes:
    got = bytearray()
    while len(got) < length and (chunk := connection.recv(min(1 << 20, length - len(got)))):
        got += chunk
    return bytes(got)


def _answer(status: str, body: dict, *headers: str) -> bytes:
    raw = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(raw)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def _local_file(tmp_path) -> tuple[object, str]:
    local = tmp_path / "model.pt"
    local.write_bytes(os.urandom(SIZE))
    return local, hashlib.sha256(local.read_bytes()).hexdigest()


def test_a_refusal_comes_back_before_the_body_and_none_of_it_is_sent(scheme, certificates, tmp_path):
    """503 at once, then the server reads on until the client hangs up: it gets the head alone,
    and the client the same ApiError (Retry-After included) as client/retry.py waits out."""

    def refuse(connection: socket.socket, head: str) -> tuple[str, int]:
        connection.sendall(_answer("503 Service Unavailable", {"error_code": "pod_unavailable", "message": "busy"},
                                   "Retry-After: 2"))
        received = 0
        while chunk := connection.recv(1 << 20):
            received += len(chunk)
        return head, received

    server = OneConnection(scheme, certificates, refuse)
    local, _ = _local_file(tmp_path)
    with pytest.raises(ApiError) as refused:
        Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/model.pt", local)
    head, received = server.join()
    assert received == 0
    assert (refused.value.status, refused.value.error_code, refused.value.retry_after) == (503, "pod_unavailable", 2)
    assert "expect: 100-continue" in head.lower() and f"content-length: {SIZE}" in head.lower()


def test_a_server_that_hangs_up_once_it_has_refused_is_heard(scheme, certificates, tmp_path):
    """429 at once and the connection closed, the body unread (a reset, were any of it sent):
    the client sees the 429 and its Retry-After, not 'no answer'."""

    def refuse_and_hang_up(connection: socket.socket, head: str) -> None:
        connection.sendall(_answer("429 Too Many Requests", {"error_code": "too_many_transfers", "message": "8 going"},
                                   "Retry-After: 3", "Connection: close"))

    server = OneConnection(scheme, certificates, refuse_and_hang_up)
    local, _ = _local_file(tmp_path)
    with pytest.raises(ApiError) as refused:
        Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/model.pt", local)
    server.join()
    assert (refused.value.status, refused.value.error_code, refused.value.retry_after) == (429, "too_many_transfers", 3)


def _take_the_body(go_ahead: bytes):
    def serve(connection: socket.socket, head: str) -> tuple[str, str]:
        connection.sendall(go_ahead)
        body = _body(connection, SIZE)
        connection.sendall(_answer("201 Created", {"path": "model.pt", "size": len(body)}))
        return head, hashlib.sha256(body).hexdigest()

    return serve


def test_100_continue_gets_the_body(scheme, certificates, tmp_path, monkeypatch):
    """The go-ahead is heard: with no fallback wait to speak of, the body still goes at once."""
    monkeypatch.setattr(client_api, "CONTINUE_WAIT_S", 60.0)
    server = OneConnection(scheme, certificates, _take_the_body(b"HTTP/1.1 100 Continue\r\n\r\n"))
    local, sha256 = _local_file(tmp_path)
    written = Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/model.pt", local)
    head, received = server.join()
    assert written == {"path": "model.pt", "size": SIZE}
    assert received == sha256 and "expect: 100-continue" in head.lower()


def test_a_server_that_never_answers_the_question_gets_the_body_after_a_short_wait(scheme, certificates, tmp_path,
                                                                                 monkeypatch):
    """A proxy that neither answers ``Expect`` nor passes it on: after CONTINUE_WAIT_S the body goes anyway."""
    monkeypatch.setattr(client_api, "CONTINUE_WAIT_S", 0.3)
    server = OneConnection(scheme, certificates, _take_the_body(b""))
    local, sha256 = _local_file(tmp_path)
    written = Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/model.pt", local)
    head, received = server.join()
    assert written == {"path": "model.pt", "size": SIZE}
    assert received == sha256 and "expect: 100-continue" in head.lower()



def test_an_empty_file_is_sent_without_asking(scheme, certificates, tmp_path, monkeypatch):
    """RFC 9110: no ``Expect`` without content, so no wait for a go-ahead that need not come."""
    monkeypatch.setattr(client_api, "CONTINUE_WAIT_S", 60.0)

    def take(connection: socket.socket, head: str) -> str:
        connection.sendall(_answer("201 Created", {"path": "empty", "size": 0}))
        return head

    server = OneConnection(scheme, certificates, take)
    (tmp_path / "empty").write_bytes(b"")
    written = Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/empty", tmp_path / "empty")
    head = server.join()
    assert written == {"path": "empty", "size": 0}
    assert "content-length: 0" in head.lower() and "expect" not in head.lower()

class Proxy:
    """An HTTP proxy for one request: a tunnel to CONNECT's host (https), or a request in absolute
    form sent on in origin form (http); it keeps the request line and the proxy login it was given."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://someone:p%40ss@127.0.0.1:{self.listener.getsockname()[1]}"
        self.request_line = self.login = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        self.listener.close()
        line, _, rest = _head(client).partition("\r\n")
        self.request_line = line
        self.login = next((h.split(":", 1)[1].strip() for h in rest.split("\r\n")
                           if h.lower().startswith("proxy-authorization:")), None)
        method, where, version = line.split(" ")
        if method == "CONNECT":
            host, port = where.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            parts = urlsplit(where)
            upstream = socket.create_connection((parts.hostname, parts.port))
            upstream.sendall(f"{method} {parts.path} {version}\r\n{rest}".encode("latin-1"))
        threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
        relay(upstream, client)


def test_through_the_environments_proxy(scheme, certificates, tmp_path, monkeypatch):
    """``https_proxy``/``http_proxy`` (with a login) are honoured as urllib honours them, and the
    question and its go-ahead pass through: https through a CONNECT tunnel, TLS checked end to end."""
    monkeypatch.setattr(client_api, "CONTINUE_WAIT_S", 60.0)
    server = OneConnection(scheme, certificates, _take_the_body(b"HTTP/1.1 100 Continue\r\n\r\n"))
    proxy = Proxy()
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(f"{scheme}_proxy", proxy.url)
    local, sha256 = _local_file(tmp_path)
    written = Api(Login(server.base, "t"), timeout=30).put_file("/v1/gpus/gpu-1/files/model.pt", local)
    head, received = server.join()
    assert written == {"path": "model.pt", "size": SIZE} and received == sha256
    where = server.base.split("://")[1]
    assert proxy.request_line.rsplit(" ", 1)[0] == (
        f"CONNECT {where}" if scheme == "https" else f"PUT {server.base}/v1/gpus/gpu-1/files/model.pt")
    assert proxy.login == "Basic c29tZW9uZTpwQHNz"  # someone:p@ss
