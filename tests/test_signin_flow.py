"""Sign-in without a browser: the OIDC checks (state, PKCE, nonce, audience, issuer), pending
accounts, CSRF, cookies and / — with requests against a real provider (tests/oidc) and the app."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlencode, urlparse, urlunparse

import pytest
import requests

from drive.store.embedded import free_port
from gateway.signin import OidcClient, SignInError
from tests.conftest import LiveServer, make_settings
from tests.test_docs_examples import run_doc
from tests.oidc_support import CLIENT_SECRET, Client, OidcProvider, login_at_provider, signing_keys
from tests.oidc_support import signin_server as running_signin_server

ALLOWED = "ada@lab.example"
ADMIN = "boss@lab.example"
TOKEN_SHAPE = re.compile(r"kgpu_[0-9a-f]{48}")


@pytest.fixture(scope="module")
def keys():
    return signing_keys()


@pytest.fixture(scope="module")
def signin_server(tmp_path_factory, rclone_target, keys):
    """The app with sign-in configured, and the provider it trusts (clients: kgpu and another)."""
    with running_signin_server(
        tmp_path_factory.mktemp("signin"), rclone_target, keys,
        allowed_emails=ALLOWED, allowed_domains="allowed.example", admin_emails=ADMIN,
    ) as running:
        yield running


def start(server: LiveServer) -> tuple[requests.Session, str]:
    """A browser-like session that began a sign-in; returns it and the provider's URL."""
    browser = requests.Session()
    reply = browser.get(f"{server.base}/view/signin", allow_redirects=False)
    assert reply.status_code == 303, reply.text
    return browser, reply.headers["Location"]


def callback_of(server: LiveServer, email: str) -> tuple[requests.Session, str]:
    browser, url = start(server)
    return browser, login_at_provider(browser, url, email, f"{server.base}/view/callback")


def with_query(url: str, **changes) -> str:
    parts = urlparse(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return urlunparse(parts._replace(query=urlencode({**query, **changes})))


def signed_in(server: LiveServer, email: str) -> requests.Session:
    browser, callback = callback_of(server, email)
    reply = browser.get(callback)
    assert reply.status_code == 200 and reply.url == f"{server.base}/view", reply.text[:300]
    return browser


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def token_of(html: str) -> str | None:
    found = TOKEN_SHAPE.search(html)
    return found.group(0) if found else None


def test_an_allowlisted_email_signs_in_and_gets_a_working_token(signin_server):
    server, _ = signin_server
    browser = signed_in(server, ALLOWED)
    page = browser.get(f"{server.base}/view").text
    token = token_of(page)
    assert token and f"export KGPU_API_BASE={server.base}" in page and f"export KGPU_API_TOKEN={token}" in page
    me = requests.get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["user"]["email"] == ALLOWED and me.json()["status"] == "approved"
    # Signing in again elsewhere keeps the token (a shell may use it); it is not shown again there.
    again = signed_in(server, ALLOWED).get(f"{server.base}/view").text
    assert token_of(again) is None and 'id="token-hidden"' in again
    assert requests.get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_session_cookie_is_httponly_and_lax_and_the_page_is_not_cached(signin_server):
    server, _ = signin_server
    browser, callback = callback_of(server, "cookies@allowed.example")
    reply = browser.get(callback, allow_redirects=False)
    cookie = reply.headers["set-cookie"]
    assert "kgpu_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # a plain-http test server: a Secure cookie would never come back
    page = browser.get(f"{server.base}/view")
    assert page.headers["cache-control"] == "no-store" and token_of(page.text)


def test_state_mismatch_is_refused(signin_server):
    server, _ = signin_server
    browser, callback = callback_of(server, ALLOWED)
    reply = browser.get(with_query(callback, state="forged-state"))
    assert reply.status_code == 400
    assert reply.json()["error_code"] == "signin_failed" and "state" in reply.json()["message"]


def test_a_callback_in_another_browser_is_refused(signin_server):
    """Login CSRF: an answer meant for one browser cannot sign in another."""
    server, _ = signin_server
    _, callback = callback_of(server, ALLOWED)
    reply = requests.get(callback)
    assert reply.status_code == 400 and reply.json()["error_code"] == "signin_expired"


def test_a_code_with_another_sign_ins_verifier_is_refused(signin_server):
    """PKCE: a code injected into another browser's sign-in (its state, its verifier) is refused
    by the provider, because that verifier does not match the code's challenge."""
    server, _ = signin_server
    _, stolen = callback_of(server, ALLOWED)
    victim, victim_callback = callback_of(server, "victim@allowed.example")
    code = parse_qs(urlparse(stolen).query)["code"][0]
    reply = victim.get(with_query(victim_callback, code=code))
    assert reply.status_code == 400
    assert reply.json()["error_code"] == "signin_failed" and "refused the authorization code" in reply.json()["message"]


def test_a_provider_error_is_a_clear_400(signin_server):
    server, _ = signin_server
    browser, callback = callback_of(server, ALLOWED)
    reply = browser.get(f"{server.base}/view/callback?error=access_denied&state=x", headers={"Accept": "text/html"})
    assert reply.status_code == 400 and "access_denied" in reply.text and "<html" in reply.text


def id_token_for(provider: OidcProvider, client_id: str, redirect_uri: str, email: str) -> tuple[dict, str]:
    """A real token response for ``client_id`` (its ID token, access token) and the nonce asked for."""
    client = OidcClient(provider.issuer, client_id, CLIENT_SECRET)
    pending = client.begin(redirect_uri)
    browser = requests.Session()
    callback = login_at_provider(browser, pending.url, email, redirect_uri)
    code = parse_qs(urlparse(callback).query)["code"][0]
    token = client._app.fetch_access_token(redirect_uri, code=code, code_verifier=pending.code_verifier)
    return token, pending.nonce


def test_id_token_checks(signin_server, keys):
    server, provider = signin_server
    ours = OidcClient(provider.issuer, "kgpu", CLIENT_SECRET)
    token, nonce = id_token_for(provider, "kgpu", f"{server.base}/view/callback", ALLOWED)
    assert ours.verify_id_token(token, nonce).email == ALLOWED
    with pytest.raises(SignInError, match="Invalid claim: 'nonce'"):
        ours.verify_id_token(token, "another-nonce")
    header, claims, signature = token["id_token"].split(".")
    tampered = signature[:-6] + ("AAAAAA" if not signature.endswith("AAAAAA") else "BBBBBB")
    with pytest.raises(SignInError, match="refused"):
        ours.verify_id_token({**token, "id_token": f"{header}.{claims}.{tampered}"}, nonce)
    # The same provider's ID token for another app: the audience is not us.
    theirs, their_nonce = id_token_for(provider, "other-app", f"{server.base}/other/callback", ALLOWED)
    with pytest.raises(SignInError, match="Invalid claim: 'aud'"):
        ours.verify_id_token(theirs, their_nonce)
    # Another issuer signing with the very same keys: refused on the issuer alone.
    impostor = OidcProvider([Client("kgpu", [f"{server.base}/view/callback"])], keys).start()
    try:
        forged, forged_nonce = id_token_for(impostor, "kgpu", f"{server.base}/view/callback", ALLOWED)
        assert OidcClient(impostor.issuer, "kgpu", CLIENT_SECRET).verify_id_token(forged, forged_nonce).email == ALLOWED
        with pytest.raises(SignInError, match="Invalid claim: 'iss'"):
            ours.verify_id_token(forged, forged_nonce)
    finally:
        impostor.stop()


def test_an_unlisted_email_is_pending_and_gets_no_token(signin_server):
    server, _ = signin_server
    browser = signed_in(server, "stranger@elsewhere.example")
    page = browser.get(f"{server.base}/view").text
    assert 'id="pending"' in page and token_of(page) is None
    refused = browser.post(f"{server.base}/view/token", data={"csrf_token": csrf_of(page)})
    assert refused.status_code == 403 and refused.json()["error_code"] == "account_pending"
    # A token made for them anyway (by an admin's API call) reaches nothing but /v1/me.
    admin = {"Authorization": f"Bearer {server.settings.admin_token}"}
    user = [u for u in requests.get(f"{server.base}/v1/admin/users", headers=admin).json()["users"]
            if u["email"] == "stranger@elsewhere.example"][0]
    assert user["status"] == "pending"
    token = requests.post(f"{server.base}/v1/admin/users/{user['id']}/token", headers=admin).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{server.base}/v1/me", headers=auth).json()["status"] == "pending"
    for method, path in (("GET", "/v1/files"), ("POST", "/v1/gpus"), ("GET", "/v1/runs"), ("PUT", "/v1/files/x")):
        reply = requests.request(method, f"{server.base}{path}", headers=auth, json={})
        assert reply.status_code == 403 and reply.json()["error_code"] == "account_pending", (method, path)
    # Approved now, the session that began pending still gets no token: only a new sign-in does.
    assert requests.patch(f"{server.base}/v1/admin/users/{user['id']}", json={"status": "approved"},
                          headers=admin).status_code == 200
    refused = browser.post(f"{server.base}/view/token", data={"csrf_token": csrf_of(page)})
    assert refused.status_code == 403 and refused.json()["error_code"] == "sign_in_again"
    assert token_of(browser.get(f"{server.base}/view").text) is None
    # A new sign-in finds the token the admin made live: it is kept, and not shown (reissue shows one).
    assert 'id="token-hidden"' in signed_in(server, "stranger@elsewhere.example").get(f"{server.base}/view").text


def test_state_changes_without_the_csrf_token_are_refused(signin_server):
    server, _ = signin_server
    admin = signed_in(server, ADMIN)
    page = admin.get(f"{server.base}/view").text
    token = token_of(page)
    for path in ("/view/signout", "/view/token", "/view/admin/orgs"):
        for data in ({}, {"csrf_token": "not-the-one"}):
            reply = admin.post(f"{server.base}{path}", data={**data, "slug": "csrf-lab"})
            assert reply.status_code == 403 and reply.json()["error_code"] == "csrf_failed", (path, data)
    # Nothing happened: the token lives, no org was made.
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{server.base}/v1/me", headers=auth).status_code == 200
    assert all(o["slug"] != "csrf-lab" for o in requests.get(f"{server.base}/v1/admin/orgs", headers=auth).json()["orgs"])
    # With it, the same POST works.
    made = admin.post(f"{server.base}/view/admin/orgs", data={"csrf_token": csrf_of(page), "slug": "csrf-lab"})
    assert made.status_code == 200 and made.url.endswith("/view/admin") and "csrf-lab" in made.text


def test_sign_out_revokes_the_token_and_the_session(signin_server):
    server, _ = signin_server
    browser = signed_in(server, "leaver@allowed.example")
    page = browser.get(f"{server.base}/view").text
    token, cookie = token_of(page), dict(browser.cookies)
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{server.base}/v1/files", headers=auth).status_code == 200  # warms the auth cache
    out = browser.post(f"{server.base}/view/signout", data={"csrf_token": csrf_of(page)})
    assert out.status_code == 200 and token_of(out.text) is None and 'id="signin"' in out.text
    assert requests.get(f"{server.base}/v1/files", headers=auth).status_code == 401
    # A copy of the old cookie is worth nothing now.
    replay = requests.get(f"{server.base}/view", cookies=cookie)
    assert token_of(replay.text) is None and 'id="signin"' in replay.text


def test_view_shows_a_stranger_no_token(signin_server):
    server, _ = signin_server
    for cookies in ({}, {"kgpu_session": "forged.value.here"}):
        page = requests.get(f"{server.base}/view", cookies=cookies)
        assert page.status_code == 200 and token_of(page.text) is None and 'id="signin"' in page.text
    assert requests.get(f"{server.base}/view/admin", allow_redirects=False).status_code == 303


def test_root_leads_a_browser_to_view_and_a_client_to_the_api(signin_server):
    server, _ = signin_server
    browser = requests.get(f"{server.base}/", headers={"Accept": "text/html,*/*"}, allow_redirects=False)
    assert browser.status_code == 303 and browser.headers["location"] == "/view"
    client = requests.get(f"{server.base}/")
    assert client.status_code == 200 and client.json()["docs"] == "/docs" and client.json()["api"] == "/v1"


def test_secure_cookies_when_the_public_url_is_https(tmp_path, rclone_target, keys):
    provider = OidcProvider([Client("kgpu", ["https://kgpu.example/view/callback"])], keys).start()
    server = LiveServer(make_settings(
        tmp_path, rclone_target, public_base_url="https://kgpu.example",
        oidc_issuer=provider.issuer, oidc_client_id="kgpu", oidc_client_secret=CLIENT_SECRET,
    )).start()
    try:
        reply = requests.get(f"{server.base}/view/signin", allow_redirects=False)
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("__Host-kgpu_signin=") and "Secure" in cookie and "HttpOnly" in cookie
        assert "redirect_uri=https%3A%2F%2Fkgpu.example%2Fview%2Fcallback" in reply.headers["location"]
    finally:
        server.stop()
        provider.stop()


def test_without_sign_in_configured_view_says_so(tmp_path, rclone_target):
    server = LiveServer(make_settings(tmp_path, rclone_target)).start()
    try:
        assert "not configured" in requests.get(f"{server.base}/view").text
        reply = requests.get(f"{server.base}/view/signin")
        assert reply.status_code == 404 and reply.json()["error_code"] == "signin_not_configured"
    finally:
        server.stop()


def test_the_sign_in_guide_examples_run(signin_server, tmp_path):
    """docs/sign-in.md's bash blocks, with the export lines of a dashboard."""
    server, _ = signin_server
    token = token_of(signed_in(server, "reader@allowed.example").get(f"{server.base}/view").text)
    result, workdir = run_doc("sign-in.md", tmp_path, {"KGPU_API_BASE": server.base, "KGPU_API_TOKEN": token})
    assert result.stdout.splitlines() == [
        "reader@allowed.example approved",
        f"logged in to {server.base} as reader@allowed.example (approved); saved in {workdir}/config/kgpu/config.json",
        "API docs at /docs", f"303 {server.base}/view",
    ]
    assert json.loads((workdir / "config/kgpu/config.json").read_text())["token"] == token


def test_a_suspended_account_is_refused_everywhere(signin_server):
    server, _ = signin_server
    browser = signed_in(server, "gone@allowed.example")
    token = token_of(browser.get(f"{server.base}/view").text)
    admin = signed_in(server, ADMIN)
    page = admin.get(f"{server.base}/view/admin").text
    user_id = re.search(r'data-email="gone@allowed.example">.*?/view/admin/users/(\d+)/status', page, re.S).group(1)
    done = admin.post(f"{server.base}/view/admin/users/{user_id}/status",
                      data={"csrf_token": csrf_of(page), "status": "suspended"})
    assert done.status_code == 200 and "suspended" in done.text
    reply = requests.get(f"{server.base}/v1/files", headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 403 and reply.json()["error_code"] == "account_suspended"
    assert 'id="signin"' in browser.get(f"{server.base}/view").text  # the session ended with it
    again, callback = callback_of(server, "gone@allowed.example")
    refused = again.get(callback)
    assert refused.status_code == 403 and refused.json()["error_code"] == "account_suspended"
    bad = admin.post(f"{server.base}/view/admin/users/{user_id}/status", data={"csrf_token": csrf_of(page), "status": "gone"})
    assert bad.status_code == 422 and bad.json()["error_code"] == "validation_error"


def test_admin_pages_need_an_admin_and_forms_stay_small(signin_server):
    server, _ = signin_server
    browser = signed_in(server, "plain@allowed.example")
    page = browser.get(f"{server.base}/view").text
    assert 'href="/view/admin"' not in page
    assert browser.get(f"{server.base}/view/admin").status_code == 403
    refused = browser.post(f"{server.base}/view/admin/orgs", data={"csrf_token": csrf_of(page), "slug": "mine"})
    assert refused.status_code == 403 and refused.json()["error_code"] == "admin_only"
    huge = browser.post(f"{server.base}/view/token", data={"csrf_token": csrf_of(page), "pad": "x" * 20_000})
    assert huge.status_code == 413 and huge.json()["error_code"] == "payload_too_large"
    nobody = requests.post(f"{server.base}/view/token", data={"csrf_token": csrf_of(page)})
    assert nobody.status_code == 401 and nobody.json()["error_code"] == "unauthorized"


def test_reissue_shows_a_new_token_and_kills_the_old_one(signin_server):
    server, _ = signin_server
    browser = signed_in(server, "renew@allowed.example")
    page = browser.get(f"{server.base}/view").text
    old = token_of(page)
    renewed = browser.post(f"{server.base}/view/token", data={"csrf_token": csrf_of(page)})
    new = token_of(renewed.text)
    assert renewed.status_code == 200 and new and new != old
    assert requests.get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {old}"}).status_code == 401
    assert requests.get(f"{server.base}/v1/me", headers={"Authorization": f"Bearer {new}"}).status_code == 200


def test_an_unreachable_provider_is_a_clear_503(tmp_path, rclone_target):
    closed = f"http://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    server = LiveServer(make_settings(
        tmp_path, rclone_target, oidc_issuer=closed, oidc_client_id="kgpu", oidc_client_secret=CLIENT_SECRET,
    )).start()
    try:
        reply = requests.get(f"{server.base}/view/signin", allow_redirects=False)
        assert reply.status_code == 503 and reply.json()["error_code"] == "signin_unavailable"
        page = requests.get(f"{server.base}/view/signin", headers={"Accept": "text/html"})
        assert page.status_code == 503 and "cannot be reached" in page.text
    finally:
        server.stop()
