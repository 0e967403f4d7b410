"""Accounts and tokens: the admin API, the CLI, and what each kind of token may do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
import requests

from gateway import tokens
from gateway.models import utcnow


def envelope_of(reply: requests.Response) -> dict:
    body = reply.json()
    assert set(body) == {"error_code", "message", "trace_id"}, body
    assert body["trace_id"] == reply.headers["X-Request-ID"]
    return body


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-token", "Bearer kgpu_" + "0" * 48, "Bearer kgpu_" + "G" * 48],
)
def test_bad_credentials_are_401(stack, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/v1/me"), ("GET", "/v1/files"), ("PUT", "/v1/files/a.txt"), ("GET", "/v1/admin/users")]:
        reply = requests.request(method, f"{stack.base}{path}", headers=headers, data=b"x" if method == "PUT" else None)
        assert reply.status_code == 401, (method, path, reply.text)
        assert envelope_of(reply)["error_code"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_me(stack, user):
    reply = requests.get(f"{stack.base}/v1/me", headers=user.auth)
    assert reply.status_code == 200
    body = reply.json()
    assert body["user"]["email"] == user.email and body["status"] == "approved"
    assert body["user"]["credits"] == stack.settings.starting_credits


def test_token_format_and_storage(stack, user):
    assert tokens.is_well_formed(user.token)
    with stack.server.app.state.sessions() as session:
        row = tokens.find_by_plaintext(session, user.token)
        assert row.token_hash == tokens.hash_token(user.token) and user.token not in (row.token_hash, row.hint)


def test_reissue_revokes_the_old_token(stack, user):
    reply = requests.post(f"{stack.base}/v1/admin/users/{user.id}/token", headers=stack.admin)
    assert reply.status_code == 201
    new_token = reply.json()["token"]
    assert tokens.is_well_formed(new_token) and new_token != user.token
    old = requests.get(f"{stack.base}/v1/me", headers=user.auth)
    assert old.status_code == 401 and envelope_of(old)["message"] == "token revoked"
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {new_token}"}).status_code == 200


def test_expired_token_is_401(stack, user):
    with stack.server.app.state.sessions.begin() as session:
        _, plaintext = tokens.issue(session, user.id, expires_at=utcnow() - timedelta(seconds=1))
    reply = requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {plaintext}"})
    assert reply.status_code == 401 and envelope_of(reply)["message"] == "token expired"


def test_pending_user_may_only_read_me(stack):
    pending = stack.new_user(status="pending")
    assert requests.get(f"{stack.base}/v1/me", headers=pending.auth).json()["status"] == "pending"
    for method, path in [("GET", "/v1/files"), ("GET", "/v1/files/a.txt"), ("PUT", "/v1/files/a.txt"), ("DELETE", "/v1/files/a.txt"), ("GET", "/v1/admin/users")]:
        reply = requests.request(method, f"{stack.base}{path}", headers=pending.auth)
        assert reply.status_code == 403, (method, path)
        assert envelope_of(reply)["error_code"] == "account_pending"
    approve = requests.patch(f"{stack.base}/v1/admin/users/{pending.id}", json={"status": "approved"}, headers=stack.admin)
    assert approve.status_code == 200 and approve.json()["user"]["status"] == "approved"
    assert requests.get(f"{stack.base}/v1/files", headers=pending.auth).status_code == 200


def test_admin_api(stack, user):
    listed = requests.get(f"{stack.base}/v1/admin/users", headers=stack.admin).json()["users"]
    assert user.email in [u["email"] for u in listed]
    duplicate = requests.post(f"{stack.base}/v1/admin/users", json={"email": user.email}, headers=stack.admin)
    assert duplicate.status_code == 409 and envelope_of(duplicate)["error_code"] == "user_exists"
    bad = requests.post(f"{stack.base}/v1/admin/users", json={"email": "not an email"}, headers=stack.admin)
    assert bad.status_code == 422 and envelope_of(bad)["error_code"] == "validation_error"
    bad_role = requests.patch(f"{stack.base}/v1/admin/users/{user.id}", json={"role": "root"}, headers=stack.admin)
    assert bad_role.status_code == 422
    missing = requests.patch(f"{stack.base}/v1/admin/users/999999", json={"status": "pending"}, headers=stack.admin)
    assert missing.status_code == 404 and envelope_of(missing)["error_code"] == "user_not_found"
    granted = requests.post(f"{stack.base}/v1/admin/users/{user.id}/credits", json={"credits": 500}, headers=stack.admin)
    assert granted.json()["user"]["credits"] == stack.settings.starting_credits + 500
    overdrawn = requests.post(
        f"{stack.base}/v1/admin/users/{user.id}/credits", json={"credits": -(stack.settings.starting_credits + 501)}, headers=stack.admin
    )
    assert overdrawn.status_code == 422
    taken = requests.post(f"{stack.base}/v1/admin/users/{user.id}/credits", json={"credits": -500}, headers=stack.admin)
    assert taken.json()["user"]["credits"] == stack.settings.starting_credits


def test_users_are_not_admins_until_promoted(stack, user):
    forbidden = requests.get(f"{stack.base}/v1/admin/users", headers=user.auth)
    assert forbidden.status_code == 403 and envelope_of(forbidden)["error_code"] == "admin_only"
    promoted = requests.patch(f"{stack.base}/v1/admin/users/{user.id}", json={"role": "admin"}, headers=stack.admin)
    assert promoted.status_code == 200
    assert requests.get(f"{stack.base}/v1/admin/users", headers=user.auth).status_code == 200
    requests.patch(f"{stack.base}/v1/admin/users/{user.id}", json={"role": "user"}, headers=stack.admin)
    assert requests.get(f"{stack.base}/v1/admin/users", headers=user.auth).status_code == 403


def test_environment_admin_has_no_drive(stack):
    reply = requests.get(f"{stack.base}/v1/files", headers=stack.admin)
    assert reply.status_code == 403 and envelope_of(reply)["error_code"] == "no_drive"


def kgpu_admin(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KGPU_DATABASE_URL": stack.settings.resolved_database_url}
    return subprocess.run(
        [sys.executable, "-m", "client", "admin", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_users_and_tokens(stack):
    email = f"cli-{os.urandom(4).hex()}@lab.example"
    created = kgpu_admin(stack, "user", "create", "--email", email, "--name", "CLI User")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    first = body["token"]
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {first}"}).status_code == 200

    issued = json.loads(kgpu_admin(stack, "token", "issue", email, "--expires-days", "1").stdout)
    assert issued["token_info"]["expires_at"] is not None
    second = issued["token"]
    listed = json.loads(kgpu_admin(stack, "token", "list", "--user", email).stdout)["tokens"]
    assert [t["live"] for t in listed] == [True, True]
    assert all(first not in json.dumps(t) and second not in json.dumps(t) for t in listed)

    assert kgpu_admin(stack, "token", "revoke", str(listed[0]["id"])).returncode == 0
    stack.server.app.state.authenticator.invalidate()  # another process changed the database
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {first}"}).status_code == 401
    assert requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    again = kgpu_admin(stack, "token", "revoke", str(listed[0]["id"]))
    assert again.returncode == 1 and "no live token" in again.stderr

    users = json.loads(kgpu_admin(stack, "user", "list").stdout)["users"]
    assert email in [u["email"] for u in users]
    assert kgpu_admin(stack, "user", "set", email, "--status", "pending").returncode == 0
    stack.server.app.state.authenticator.invalidate()
    assert requests.get(f"{stack.base}/v1/files", headers={"Authorization": f"Bearer {second}"}).status_code == 403
    dup = kgpu_admin(stack, "user", "create", "--email", email)
    assert dup.returncode == 1 and "already exists" in dup.stderr
