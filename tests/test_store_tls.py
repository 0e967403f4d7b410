"""drive/store/s3.py over https: the streamed PUTs (http.client) trust the CA bundle boto3's calls
trust (AWS_CA_BUNDLE), so a store behind a private CA takes both (docs/configuration.md)."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading

import pytest

from drive.store import StoreUnavailable
from drive.store.s3 import S3ObjectStore


def _certificates(folder) -> tuple[str, str]:
    """A private CA (its PEM path) and a key+certificate it signed for 127.0.0.1 (one PEM path)."""
    ca_key, ca, key, csr, cert = (str(folder / name) for name in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", "/CN=kgpu test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", str(folder / "san.ext"))
    (folder / "server.pem").write_text((folder / "s.key").read_text() + (folder / "s.pem").read_text())
    return ca, str(folder / "server.pem")


class _Store(http.server.BaseHTTPRequestHandler):
    """Takes any PUT whole and answers 200 with an ETag, as a store does."""

    def do_PUT(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("ETag", '"' + "0" * 32 + '"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def https_store(tmp_path):
    ca, server_pem = _certificates(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(server_pem)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ca, f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _put(endpoint: str) -> str:
    store = S3ObjectStore(endpoint, "k", "s", "b")
    put = store.open_put("a/b.bin", 5, "application/octet-stream")
    put.send([b"hello"])
    return put.finish()


def test_a_streamed_put_trusts_the_ca_bundle_boto3_is_given(https_store, monkeypatch):
    ca, endpoint = https_store
    monkeypatch.setenv("AWS_CA_BUNDLE", ca)
    assert _put(endpoint) == '"' + "0" * 32 + '"'


def test_a_streamed_put_to_a_store_no_bundle_vouches_for_is_refused(https_store, monkeypatch):
    _, endpoint = https_store
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    with pytest.raises(StoreUnavailable):
        _put(endpoint)
