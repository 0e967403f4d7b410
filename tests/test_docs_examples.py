"""The docs' examples run as written.

For each of docs/my-drive.md, docs/admin.md, docs/configuration.md and docs/metrics.md, every
```bash block is taken in order, the blocks are joined into one script, and the
script runs with ``bash -euo pipefail`` in an empty directory against a live
server (the ``rclone-sqlite`` stack: embedded ``rclone serve s3``, which checks
presigned signatures, and SQLite). The environment holds only
``KGPU_API_BASE``, ``KGPU_API_TOKEN`` and ``KGPU_ADMIN_TOKEN`` of the ``KGPU_*``
variables, and ``PATH`` starts with this interpreter's bin directory (``kgpu``,
and a ``python3`` that has ``requests``). After each script, the test checks
that what the example claims to do really happened.

Fast checks that need no server keep the docs in step with the code: every
``KGPU_*`` setting is documented with its default, every route of /v1/files and
/v1/admin/users is in a table, and the examples use no other variables.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
import requests

DOCS = Path(__file__).resolve().parent.parent / "docs"
BASH_BLOCK = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
ONLY_STACK = "rclone-sqlite"
ALLOWED_VARIABLES = {
    "my-drive.md": {"KGPU_API_BASE", "KGPU_API_TOKEN"},
    "admin.md": {"KGPU_API_BASE", "KGPU_ADMIN_TOKEN"},
    "configuration.md": set(),
    "metrics.md": {"KGPU_API_BASE", "KGPU_ADMIN_TOKEN"},
    "client.md": {"KGPU_API_BASE", "KGPU_API_TOKEN"},  # its examples run in tests/test_client.py
    "ssh.md": {"KGPU_API_BASE", "KGPU_API_TOKEN", "KGPU_RENT_ID"},  # run in tests/test_ssh.py; the last in a pod
}
TOKEN = re.compile(r"^kgpu_[0-9a-f]{48}$")


def bash_blocks(doc: str) -> list[str]:
    return BASH_BLOCK.findall((DOCS / doc).read_text())


def run_doc(doc: str, tmp_path: Path, variables: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the document's bash blocks, concatenated, in a fresh directory; return the result and that directory."""
    blocks = bash_blocks(doc)
    assert blocks, f"{doc} has no bash examples"
    script = tmp_path / f"{doc}.sh"
    script.write_text("\n".join(blocks))
    workdir = tmp_path / "work"
    workdir.mkdir()
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KGPU_") and k.lower() not in proxies}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(variables)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", str(script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{doc}: the examples exited with {result.returncode}\n"
        f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result, workdir


def assert_sha256_checks_passed(doc: str, output: str) -> None:
    """Every `sha256sum -c` in the examples printed its 'NAME: OK' line, and none failed."""
    expected = sum(block.count("sha256sum -c") for block in bash_blocks(doc))
    passed = re.findall(r"^\S+: OK$", output, re.M)
    assert "FAILED" not in output
    assert len(passed) == expected, (passed, output)


def assert_in_step(stack, doc: str, wanted) -> None:
    """The document's examples use only KGPU_API_BASE and KGPU_API_TOKEN, and every operation
    of the server's paths that ``wanted(path)`` picks is a row of its routes table."""
    used = set()
    for block in bash_blocks(doc):
        used |= set(re.findall(r"\$\{?(KGPU_[A-Z0-9_]+)", block))
    assert used <= {"KGPU_API_BASE", "KGPU_API_TOKEN"}, used
    rows = re.findall(r"^\| (GET|HEAD|PUT|POST|PATCH|DELETE) \| `([^`?]+)", (DOCS / doc).read_text(), re.M)
    documented = {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in rows}
    paths = {path: ops for path, ops in stack.server.app.openapi()["paths"].items() if wanted(path)}
    assert paths
    for path, operations in paths.items():
        for method in operations:
            assert (method.upper(), re.sub(r"\{[^}]*\}", "{}", path)) in documented, f"{method} {path}"


def variables_for(stack, user) -> dict[str, str]:
    # conftest's ADMIN_TOKEN, as the server got it: importing conftest again here would
    # make a second module with a token of its own.
    return {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": user.token, "KGPU_ADMIN_TOKEN": stack.settings.admin_token}


def only_one_stack(stack) -> None:
    if stack.name != ONLY_STACK:
        pytest.skip(f"the docs' examples run on the {ONLY_STACK} stack only")


# ---------------------------------------------------------------- the examples, against a live server


@pytest.mark.parametrize("stack", [ONLY_STACK], indirect=True)
def test_my_drive_examples(stack, user, tmp_path):
    only_one_stack(stack)
    result, workdir = run_doc("my-drive.md", tmp_path, variables_for(stack, user))
    out = result.stdout
    assert_sha256_checks_passed("my-drive.md", out)
    assert "python round trip: sha256 OK" in out
    assert "6000000 bytes; md5 kept: True" in out
    assert "minted 3 refused 1 ('../outside.bin', 400, 'invalid_path')" in out and "batch42 holds 3 files" in out
    assert "HTTP 413" in out and "quota_exceeded" in out
    assert "stamped upload: HTTP 201" in out and "Mon, 06 May 2024 07:08:09 GMT" in out
    assert re.search(r"^oc-checksum: SHA1:[0-9a-f]{40}\s*$", out, re.M | re.I) and "checksum_mismatch" in out
    assert re.search(r"^x-request-id: my-trace-42\s*$", out, re.M | re.I)
    assert "curl exit code 22" in out and "HEAD: HTTP 404" in out
    assert re.search(r"^x-deleted-count: 2\s*$", out, re.M | re.I)

    # What the examples uploaded is in the drive, byte for byte; what they deleted is gone.
    listing = requests.get(f"{stack.base}/v1/files", headers=user.auth).json()
    paths = {f["path"]: f["size"] for f in listing["files"]}
    local_copies = {
        "exp42/checkpoint.pt": "exp42/checkpoint.pt",
        "exp42/results.csv": "exp42/results.csv",
        "exp42/plots/loss.png": "exp42/plots/loss.png",
        "exp42/stream.bin": "stream.bin",
    }
    for remote, local in local_copies.items():
        assert paths.get(remote) == (workdir / local).stat().st_size, remote
    assert paths.get("exp42/big.bin") == (workdir / "big.bin").stat().st_size
    for n in (1, 2, 3):  # the batch mint's files, byte for byte, with their times
        sent = workdir / f"batch/run-{n}.bin"
        got = requests.get(f"{stack.base}/v1/files/batch42/run-{n}.bin", headers=user.auth)
        assert got.content == sent.read_bytes()
        mtime = requests.head(f"{stack.base}/v1/files/batch42/run-{n}.bin", headers=user.auth).headers["Last-Modified"]
        assert parsedate_to_datetime(mtime).timestamp() == int(sent.stat().st_mtime)
    assert "exp42-outputs.tgz" in paths and "envs/exp42.tgz" in paths
    assert "exp42/notes.txt" not in paths
    assert not [p for p in paths if p.startswith("scratch/")]
    for remote, local in (("exp42/checkpoint.pt", "exp42/checkpoint.pt"), ("exp42/stream.bin", "stream.bin")):
        got = requests.get(f"{stack.base}/v1/files/{remote}", headers=user.auth)
        assert got.status_code == 200 and got.content == (workdir / local).read_bytes(), remote
    streamed = requests.head(f"{stack.base}/v1/files/exp42-outputs.tgz", headers=user.auth)
    assert streamed.headers["Content-Type"] == "application/gzip"


@pytest.mark.parametrize("stack", [ONLY_STACK], indirect=True)
def test_admin_examples(stack, user, tmp_path):
    only_one_stack(stack)
    result, workdir = run_doc("admin.md", tmp_path, variables_for(stack, user))
    out = result.stdout
    for line in (
        "HTTP 403",
        "after approval: HTTP 200",
        "ada as admin: HTTP 200",
        "credits now",
        "old token: HTTP 401",
        "new token: HTTP 200",
        "HTTP 409",
        "HTTP 422",
        "second revoke refused, exit code 1",
    ):
        assert line in out, line

    # The account the API examples made, as the server now has it.
    created = json.loads((workdir / "ada.json").read_text())
    reissued = json.loads((workdir / "reissued.json").read_text())
    users = requests.get(f"{stack.base}/v1/admin/users", headers=stack.admin).json()["users"]
    ada = next(u for u in users if u["id"] == created["user"]["id"])
    assert ada["email"] == created["user"]["email"]
    assert (ada["status"], ada["role"], ada["name"]) == ("approved", "user", "Ada L.")
    assert ada["credits"] == stack.settings.starting_credits + 250_000 - 50_000
    assert TOKEN.match(reissued["token"]) and reissued["revoked"] == 1
    old = requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {created['token']}"})
    assert old.status_code == 401
    me = requests.get(f"{stack.base}/v1/me", headers={"Authorization": f"Bearer {reissued['token']}"})
    assert me.status_code == 200 and me.json()["user"]["email"] == ada["email"]

    # The CLI examples worked on their own database in the scratch directory.
    assert (workdir / "kgpu-admin-demo" / "kgpu.db").is_file()
    assert TOKEN.match(json.loads((workdir / "grace.json").read_text())["token"])
    replaced = json.loads((workdir / "alan-new.json").read_text())
    assert TOKEN.match(replaced["token"]) and replaced["token_info"]["live"]


@pytest.mark.parametrize("stack", [ONLY_STACK], indirect=True)
def test_configuration_examples(stack, user, tmp_path):
    only_one_stack(stack)
    result, workdir = run_doc("configuration.md", tmp_path, variables_for(stack, user))
    assert_sha256_checks_passed("configuration.md", result.stdout)
    assert '"object_store":"ok"' in result.stdout
    data = workdir / "kgpu-data"
    for made in ("kgpu.db", "embedded-s3.json", "embedded-s3.log"):
        assert (data / made).is_file(), made
    stored = list((data / "objects").glob("*/users/*/hello.txt"))
    assert [p.read_bytes() for p in stored] == [(workdir / "hello.txt").read_bytes()]
    # Other local users pass through the data directory, and read nothing in it (issue 19).
    for line in ("711 kgpu-data", "600 kgpu-data/kgpu.db", "700 kgpu-data/objects"):
        assert f"{line}\n" in result.stdout, line
    assert "600 kgpu-data/objects/kgpu/users/" in result.stdout
    assert "Application shutdown complete" in (workdir / "kgpu-serve.log").read_text()
    # Worker processes: two of them, one store, the reaper's lease held by one of the two.
    assert re.search(r"^2\n1\nhello.again.txt: OK\n1\n", result.stdout, re.M), result.stdout
    assert "with 2 worker processes" in (workdir / "kgpu-workers.log").read_text()


@pytest.mark.parametrize("stack", [ONLY_STACK], indirect=True)
def test_metrics_examples(stack, user, tmp_path):
    only_one_stack(stack)
    result, workdir = run_doc("metrics.md", tmp_path, variables_for(stack, user))
    out = result.stdout
    for line in ("download: HTTP 302", "no token: HTTP 401", "user token: HTTP 403", "\n17\n"):
        assert line in out, line
    from prometheus_client.parser import text_string_to_metric_families

    names = {family.name for family in text_string_to_metric_families((workdir / "metrics.txt").read_text())}
    documented = set(re.findall(r"^\| `(kgpu_[a-z_]+)` \|", (DOCS / "metrics.md").read_text(), re.M))
    assert {name.removesuffix("_total") for name in documented} == names  # every series in the table, and only those


# ---------------------------------------------------------------- docs in step with the code (no server)


@pytest.mark.parametrize("doc", sorted(ALLOWED_VARIABLES))
def test_examples_use_only_their_variables(doc):
    used = set()
    for block in bash_blocks(doc):
        used |= set(re.findall(r"\$\{?(KGPU_[A-Z0-9_]+)", block))
    assert used <= ALLOWED_VARIABLES[doc], used - ALLOWED_VARIABLES[doc]


def test_every_setting_is_documented_with_its_default():
    from gateway.settings import Settings

    text = (DOCS / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        variable = f"KGPU_{name.upper()}"
        row = re.search(rf"^\| `{variable}` \| (.*?) \|", text, re.M)
        assert row, f"{variable} has no row in docs/configuration.md"
        cell = row.group(1)
        if field.default_factory is not None:  # found at start-up (the machine's cores): said in words
            assert cell and not cell.startswith("`"), (variable, cell)
        elif field.default in ("", None):
            assert cell.startswith("empty"), (variable, cell)
        else:
            assert str(field.default).lower() in cell.lower(), (variable, field.default, cell)


def _documented_routes(doc: str) -> set[tuple[str, str]]:
    rows = re.findall(r"^\| (GET|HEAD|PUT|POST|PATCH|DELETE) \| `([^`?]+)", (DOCS / doc).read_text(), re.M)
    return {(method, re.sub(r"\{[^}]*\}", "{}", path)) for method, path in rows}


@pytest.mark.parametrize("doc, prefix", [("my-drive.md", "/v1/files"), ("admin.md", "/v1/admin/users")])
def test_every_route_is_in_a_table(doc, prefix, tmp_path):
    from gateway.app import create_app
    from gateway.settings import Settings

    app = create_app(Settings(data_dir=tmp_path))  # routes only: nothing starts without the lifespan
    documented = _documented_routes(doc)
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith(prefix):
            continue
        for method in getattr(route, "methods", set()) or set():
            assert (method, re.sub(r"\{[^}]*\}", "{}", path)) in documented, f"{method} {path} is not in {doc}"
