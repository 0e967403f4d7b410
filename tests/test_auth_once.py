"""Each request is authenticated once: the layer that authenticates first (the WebDAV dispatcher,
which checks locks before a PUT, POST or DELETE reaches its route; the download fast path)
hands its outcome to the route's dependency instead of the route looking the token up again."""

from __future__ import annotations

import time

import pytest
import requests

from gateway.errors import ApiError


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


def test_a_token_in_use_stays_cached_and_a_revoked_one_leaves(stack, user):
    """A cached entry half its age old is looked up again in the background: a busy client never
    finds its token expired from the cache, and a token revoked behind the server's back (another
    process, ``kgpu admin``) leaves the cache at that look-up, never used past the cache's time."""
    from gateway import tokens
    from gateway.auth import Authenticator

    now = [1000.0]
    sessions = stack.server.app.state.sessions
    authenticator = Authenticator(sessions, "", cache_seconds=2, clock=lambda: now[0])
    try:
        authenticator.lookup(user.token)
        now[0] += 1.5
        assert authenticator.cached(user.token) is not None  # and a look-up again has begun
        settled(authenticator)
        now[0] += 0.9  # 2.4 s after the first look-up: the refreshed entry (0.9 s old) answers
        assert authenticator.cached(user.token) is not None

        with sessions.begin() as session:
            tokens.revoke(session, tokens.find_by_plaintext(session, user.token).id)
        now[0] += 0.2
        assert authenticator.cached(user.token) is not None  # 1.1 s old, younger than 2 s: still served
        settled(authenticator)
        assert authenticator.cached(user.token) is None
        with pytest.raises(ApiError):
            authenticator.lookup(user.token)
    finally:
        authenticator.close()


def test_an_entry_past_its_time_is_not_served(stack, user):
    from gateway.auth import Authenticator

    now = [1000.0]
    authenticator = Authenticator(stack.server.app.state.sessions, "", cache_seconds=2, clock=lambda: now[0])
    try:
        authenticator.lookup(user.token)
        now[0] += 2.5  # no request in between: nothing looked it up again
        assert authenticator.cached(user.token) is None
    finally:
        authenticator.close()


def test_a_lookup_overtaken_by_an_invalidation_caches_nothing(stack, user):
    from gateway.auth import Authenticator

    class InvalidatedWhileReading:
        """The database's sessions, with the cache invalidated (a change made through the API)
        between the start of a look-up and its end."""

        def __call__(self):
            authenticator.invalidate()
            return stack.server.app.state.sessions()

    authenticator = Authenticator(InvalidatedWhileReading(), "", cache_seconds=60)
    try:
        assert authenticator.lookup(user.token).user_id == user.id
        assert authenticator.cached(user.token) is None
    finally:
        authenticator.close()


def settled(authenticator, seconds: float = 30) -> None:
    """Wait for the background look-ups to finish."""
    deadline = time.monotonic() + seconds
    while authenticator._refreshing:
        assert time.monotonic() < deadline, "a background look-up never finished"
        time.sleep(0.02)
