"""Shared drives: organisations, roles, and the whole permission matrix."""

from __future__ import annotations

import os
import uuid

import pytest
import requests

ALLOWED = {200, 201, 204, 302, 307}


@pytest.fixture
def lab(stack):
    """An org with one user of every kind, and a file in its drive."""
    owner = stack.new_user(name="Owner")
    slug = "lab-" + uuid.uuid4().hex[:8]
    reply = requests.post(
        f"{stack.base}/v1/admin/orgs", json={"slug": slug, "name": "Lab", "owner_user_id": owner.id}, headers=stack.admin
    )
    assert reply.status_code == 201, reply.text
    people = {
        "global_admin": stack.new_user(role="admin"),
        "org_admin": owner,
        "uploader": stack.new_user(),
        "member": stack.new_user(),
        "non_member": stack.new_user(),
        "pending": stack.new_user(status="pending"),
    }
    for who, role in [("uploader", "uploader"), ("member", "member"), ("pending", "member")]:
        added = requests.post(
            f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": people[who].id, "role": role}, headers=stack.admin
        )
        assert added.status_code == 200, added.text
    requests.put(f"{stack.base}/v1/shared/{slug}/data/seed.csv", data=b"a,b\n1,2\n", headers=people["org_admin"].auth)
    people["in_pod"] = in_pod_account(stack, people["uploader"])
    return slug, people


def in_pod_account(stack, account):
    """The in-pod token of a rental of ``account`` (read from inside the pod)."""
    gpu = requests.post(f"{stack.base}/v1/gpus", json={"name": "pod"}, headers=account.auth).json()["gpu_id"]
    reply = requests.post(
        f"{stack.base}/v1/runs",
        json={"gpu_id": gpu, "command": ["sh", "-c", "printf %s $KGPU_API_TOKEN"]},
        headers=account.auth,
    ).json()
    return type(account)(account.id, account.email, reply["stdout"], account.base, {"gpu_id": gpu})


def operations(stack, slug: str, account) -> dict[str, int]:
    base, auth = f"{stack.base}/v1/shared/{slug}", account.auth
    name = uuid.uuid4().hex[:6]
    target = stack.new_user()
    results = {
        "list": requests.get(f"{base}/data/?json=1", headers=auth).status_code,
        "get": requests.get(f"{base}/data/seed.csv", headers=auth, allow_redirects=False).status_code,
        "head": requests.head(f"{base}/data/seed.csv", headers=auth).status_code,
        "mint": requests.post(f"{base}/up/{name}-minted.bin", headers=auth).status_code,
        "put": requests.put(f"{base}/up/{name}.bin", data=b"payload", headers=auth).status_code,
    }
    stack.store.put_object(f"orgs/{slug}/up/{name}-oob.bin", b"out of band")
    results["register"] = requests.post(f"{base}/up/{name}-oob.bin/registered", headers=auth).status_code
    stack.store.put_object(f"orgs/{slug}/up/{name}-victim.bin", b"delete me")
    results["delete"] = requests.delete(f"{base}/up/{name}-victim.bin", headers=auth).status_code
    results["manage"] = requests.post(
        f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": target.id, "role": "member"}, headers=auth
    ).status_code
    return results


READ = ["list", "get", "head"]
WRITE = ["mint", "put", "register", "delete"]
EXPECTED = {
    "global_admin": {op: "ok" for op in READ + WRITE + ["manage"]},
    "org_admin": {op: "ok" for op in READ + WRITE + ["manage"]},
    "uploader": {**{op: "ok" for op in READ + WRITE}, "manage": 403},
    "member": {**{op: "ok" for op in READ}, **{op: 403 for op in WRITE}, "manage": 403},
    "non_member": {op: 404 for op in READ + WRITE + ["manage"]},
    "pending": {op: 403 for op in READ + WRITE + ["manage"]},
    # An uploader's in-pod token: the drive with its owner's role, no member management.
    "in_pod": {**{op: "ok" for op in READ + WRITE}, "manage": 403},
}


@pytest.mark.parametrize("who", list(EXPECTED))
def test_permission_matrix(stack, lab, who):
    slug, people = lab
    got = operations(stack, slug, people[who])
    for op, expected in EXPECTED[who].items():
        if expected == "ok":
            assert got[op] in ALLOWED, (who, op, got[op])
        else:
            assert got[op] == expected, (who, op, got[op])


def test_org_listing_and_files(stack, lab, tmp_path):
    slug, people = lab
    member = people["member"]
    orgs = requests.get(f"{stack.base}/v1/shared?json=1", headers=member.auth).json()["orgs"]
    assert [o["name"] for o in orgs] == [slug] and orgs[0]["role"] == "member"
    page = requests.get(f"{stack.base}/v1/shared/", headers=member.auth)
    assert f'href="{slug}/"' in page.text
    assert requests.get(f"{stack.base}/v1/shared", headers=member.auth, allow_redirects=False).status_code == 301
    assert requests.get(f"{stack.base}/v1/shared?json=1", headers=people["non_member"].auth).json()["orgs"] == []
    root = requests.get(f"{stack.base}/v1/shared/{slug}/", headers=member.auth)
    assert 'href="data/"' in root.text
    got = requests.get(f"{stack.base}/v1/shared/{slug}/data/seed.csv", headers=member.auth)
    assert got.content == b"a,b\n1,2\n"
    envelope = requests.get(f"{stack.base}/v1/shared/{slug}/data/seed.csv?json=1", headers=member.auth).json()
    assert envelope["size"] == 8 and requests.get(envelope["url"]).content == b"a,b\n1,2\n"


def test_two_step_upload_and_registration(stack, lab):
    slug, people = lab
    uploader = people["uploader"]
    payload = os.urandom(100_000)
    minted = requests.post(
        f"{stack.base}/v1/shared/{slug}/datasets/x.zip", headers={**uploader.auth, "x-content-type": "application/zip"}
    ).json()
    assert minted["headers"] == {"Content-Type": "application/zip"}
    assert requests.put(minted["url"], data=payload, headers=minted["headers"]).status_code == 200
    record = requests.post(f"{stack.base}/v1/shared/{slug}/datasets/x.zip/registered", headers=uploader.auth)
    assert record.status_code == 201, record.text
    body = record.json()
    assert body["key"] == "datasets/x.zip" and body["size"] == len(payload)
    assert body["content_type"] == "application/zip" and body["uploader_user_id"] == uploader.id
    missing = requests.post(f"{stack.base}/v1/shared/{slug}/datasets/none.zip/registered", headers=uploader.auth)
    assert missing.status_code == 404
    head = requests.head(f"{stack.base}/v1/shared/{slug}/datasets/x.zip", headers=people["member"].auth)
    assert head.headers["Content-Length"] == str(len(payload)) and head.headers["Content-Type"] == "application/zip"


def test_removed_member_loses_access_at_once(stack, lab):
    slug, people = lab
    member = people["member"]
    assert requests.get(f"{stack.base}/v1/shared/{slug}/", headers=member.auth).status_code == 200
    removed = requests.delete(f"{stack.base}/v1/admin/orgs/{slug}/members/{member.id}", headers=people["org_admin"].auth)
    assert removed.status_code == 204
    assert requests.get(f"{stack.base}/v1/shared/{slug}/", headers=member.auth).status_code == 404
    again = requests.delete(f"{stack.base}/v1/admin/orgs/{slug}/members/{member.id}", headers=stack.admin)
    assert again.status_code == 404


def test_role_change_takes_effect(stack, lab):
    slug, people = lab
    member = people["member"]
    assert requests.put(f"{stack.base}/v1/shared/{slug}/m.txt", data=b"x", headers=member.auth).status_code == 403
    promoted = requests.post(
        f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": member.id, "role": "uploader"}, headers=stack.admin
    )
    assert promoted.json()["member"]["role"] == "uploader"
    assert requests.put(f"{stack.base}/v1/shared/{slug}/m.txt", data=b"x", headers=member.auth).status_code == 201


def test_org_admin_api(stack, lab):
    slug, people = lab
    listed = requests.get(f"{stack.base}/v1/admin/orgs", headers=stack.admin).json()["orgs"]
    assert slug in [o["slug"] for o in listed]
    own = requests.get(f"{stack.base}/v1/admin/orgs", headers=people["org_admin"].auth).json()["orgs"]
    assert [o["slug"] for o in own] == [slug]
    assert requests.get(f"{stack.base}/v1/admin/orgs", headers=people["member"].auth).status_code == 403
    members = requests.get(f"{stack.base}/v1/admin/orgs/{slug}/members", headers=people["org_admin"].auth).json()
    roles = {m["user_id"]: m["role"] for m in members["members"]}
    assert roles[people["org_admin"].id] == "admin" and roles[people["uploader"].id] == "uploader"
    for bad in ["UPPER", "-dash", "dash-", "under_score", "a" * 64, "dots.no", ""]:
        reply = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": bad, "name": "x"}, headers=stack.admin)
        assert reply.status_code == 422, bad
    dup = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": slug, "name": "again"}, headers=stack.admin)
    assert dup.status_code == 409
    by_org_admin = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": "nope-" + slug[-4:]}, headers=people["org_admin"].auth)
    assert by_org_admin.status_code == 403
    bad_role = requests.post(
        f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": people["member"].id, "role": "owner"}, headers=stack.admin
    )
    assert bad_role.status_code == 422
    no_user = requests.post(f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": 999999}, headers=stack.admin)
    assert no_user.status_code == 404


def test_shared_keys_stay_in_the_org(stack, lab):
    slug, people = lab
    other = "other-" + uuid.uuid4().hex[:6]
    requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": other}, headers=stack.admin)
    stack.store.put_object(f"orgs/{other}/secret.txt", b"secret")
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(stack.base)
    for attack in [f"/v1/shared/{slug}/../{other}/secret.txt", f"/v1/shared/{slug}/%2e%2e/{other}/secret.txt",
                   f"/v1/shared/{slug}/..%2f{other}%2fsecret.txt", "/v1/shared/%6cab/x"]:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        conn.request("GET", attack, headers=people["uploader"].auth)
        status = conn.getresponse().status
        conn.close()
        assert status in (400, 404), (attack, status)
    assert stack.store.head(f"orgs/{other}/secret.txt").size == 6
