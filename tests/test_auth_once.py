"""Each request is authenticated once: the layer that authenticates first (the WebDAV dispatcher,
which checks locks before a PUT, POST or DELETE reaches its route; the download fast path)
hands its outcome to the route's dependency instead of the route looking the token up again."""

from __future__ import annotations

import pytest
import requests


@pytest.fixture
def authentications(stack, monkeypatch) -> list[str]:
    """What the server under test did to authenticate: "hit" for a principal found in its cache,
    "lookup" for a look-up in the database (a failing one too)."""
    authenticator = stack.server.app.state.authenticator
    real_cached, real_lookup = authenticator.cached, authenticator.lookup
    done: list[str] = []

    def cached(token):
        principal = real_cached(token)
        if principal is not None:
            done.append("hit")
        return principal

    def lookup(token):
        done.append("lookup")
        return real_lookup(token)

    monkeypatch.setattr(authenticator, "cached", cached)
    monkeypatch.setattr(authenticator, "lookup", lookup)
    return done


def once(stack, authentications, send, *, cold: bool):
    """``send()``'s answer, checking it was authenticated exactly once (``cold``: with an empty cache)."""
    if cold:
        stack.server.app.state.authenticator.invalidate()
    authentications.clear()
    reply = send()
    assert len(authentications) == 1, (reply.request.method, reply.request.url, reply.status_code, authentications)
    if cold:
        assert authentications == ["lookup"]
    return reply


@pytest.mark.parametrize("cold", [True, False], ids=["cache-miss", "cache-hit"])
def test_every_drive_request_is_authenticated_once(stack, user, authentications, cold):
    files = f"{stack.base}/v1/files"
    auth = user.auth
    basic = ("anyone", user.token)

    def call(method, url, **kwargs):
        return once(stack, authentications, lambda: requests.request(method, url, **kwargs), cold=cold)

    assert call("PUT", f"{files}/once/a.txt", data=b"a", headers=auth).status_code == 201  # lock check, then route
    assert call("PUT", f"{files}/once/a.txt", data=b"b", auth=basic).status_code == 200
    assert call("POST", f"{files}/once/b.txt", data=b"b", headers=auth).status_code in (200, 201)
    assert call("PROPFIND", f"{files}/once/", headers={**auth, "Depth": "1"}).status_code == 207
    assert call("PROPFIND", f"{stack.base}/v1/dav/once/", auth=basic, headers={"Depth": "1"}).status_code == 207
    assert call("GET", f"{files}/once/a.txt", headers=auth, allow_redirects=False).status_code == 302
    assert call("GET", f"{files}/once/a.txt", auth=basic, allow_redirects=False).status_code == 302
    assert call("GET", f"{files}/once/%2e%2e/x", headers=auth, allow_redirects=False).status_code == 400
    assert call("DELETE", f"{files}/once/b.txt", headers=auth).status_code == 204
    assert call("DELETE", f"{files}/once/", headers=auth).status_code == 204


def test_a_refused_token_is_looked_up_once(stack, authentications):
    unknown = {"Authorization": "Bearer kgpu_" + "0" * 48}
    for method in ("PUT", "DELETE", "PROPFIND", "GET"):
        reply = once(
            stack, authentications, lambda: requests.request(method, f"{stack.base}/v1/files/x.txt", headers=unknown), cold=True
        )
        assert reply.status_code == 401 and reply.json()["error_code"] == "unauthorized"
