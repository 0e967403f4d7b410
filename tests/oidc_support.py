"""A real OpenID Connect provider for the sign-in tests: tests/oidc/provider.mjs (the npm package
oidc-provider) on a free port, started as a child process and stopped by its PID; and a scripted
login through its development login page for the tests that need no browser."""

from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import requests
from joserfc.jwk import RSAKey

from drive.store.embedded import free_port
from tests.conftest import require_system_part

OIDC_DIR = Path(__file__).resolve().parent / "oidc"
CLIENT_SECRET = "test-client-secret-not-a-real-one"


def signing_keys() -> dict:
    """One signing key set, so two providers may sign alike (an ID token from the wrong issuer
    then fails on its issuer alone, not on its signature)."""
    key = RSAKey.generate_key(2048, parameters={"kid": "kgpu-test", "use": "sig", "alg": "RS256"}, private=True)
    return {"keys": [key.as_dict(private=True)]}


@dataclass
class Client:
    client_id: str
    redirect_uris: list[str]
    client_secret: str = CLIENT_SECRET


class OidcProvider:
    def __init__(self, clients: list[Client], keys: dict):
        self.port = free_port("127.0.0.1")
        self.issuer = f"http://127.0.0.1:{self.port}"
        self._clients = clients
        self._keys = keys
        self._process: subprocess.Popen | None = None

    def start(self) -> "OidcProvider":
        require_system_part(
            (OIDC_DIR / "node_modules" / "oidc-provider").is_dir(),
            "the test OIDC provider (tests/browser/setup.sh: npm ci in tests/oidc)",
        )
        env = {
            **os.environ,
            "OIDC_PORT": str(self.port),
            "OIDC_CLIENTS": json.dumps([c.__dict__ for c in self._clients]),
            "OIDC_JWKS": json.dumps(self._keys),
        }
        self._process = subprocess.Popen(
            ["node", str(OIDC_DIR / "provider.mjs")], env=env, cwd=OIDC_DIR,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self._process.stdout.readline()  # blocks until it serves, or ends on its death
        if not line.startswith("listening"):
            self.stop()
            raise RuntimeError(f"the OIDC provider did not start: {line!r}")
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process.stdout.close()


@contextmanager
def signin_server(tmp: Path, target, keys: dict, **settings):
    """The app (tests.conftest.LiveServer) with sign-in through a provider of its own; yields
    (server, provider). The provider also knows a second client, ``other-app``."""
    from tests.conftest import LiveServer, make_settings

    kgpu_client, other_client = Client("kgpu", []), Client("other-app", [])
    provider = OidcProvider([kgpu_client, other_client], keys)
    server = LiveServer(make_settings(
        tmp, target, oidc_issuer=provider.issuer, oidc_client_id="kgpu", oidc_client_secret=CLIENT_SECRET, **settings
    ))
    kgpu_client.redirect_uris.append(f"{server.base}/view/callback")
    other_client.redirect_uris.append(f"{server.base}/other/callback")
    provider.start()
    try:
        server.start()
        try:
            yield server, provider
        finally:
            server.stop()
    finally:
        provider.stop()


LOGIN_FORM = re.compile(r'action="([^"]+)" method="post">\s*<input type="hidden" name="prompt" value="login"')


def login_at_provider(session: requests.Session, url: str, email: str, stop_prefix: str) -> str:
    """Follow the sign-in from ``url`` through the provider's login page as ``email``; return the
    first URL that starts with ``stop_prefix`` (the callback, with its code and state), unvisited."""
    for _ in range(20):
        if url.startswith(stop_prefix):
            return url
        reply = session.get(url, allow_redirects=False)
        if reply.is_redirect:
            url = urljoin(url, reply.headers["Location"])
            continue
        form = LOGIN_FORM.search(reply.text)
        assert form, f"no login form at {url}: {reply.status_code} {reply.text[:300]}"
        posted = session.post(
            urljoin(url, form.group(1)), data={"prompt": "login", "login": email, "password": "any"},
            allow_redirects=False,
        )
        assert posted.is_redirect, posted.text[:300]
        url = urljoin(url, posted.headers["Location"])
    raise AssertionError("the sign-in went round in circles")
