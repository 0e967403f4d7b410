"""The researcher's ``kgpu`` client, end to end against a live server.

Every command runs as its own process (``python -m client``, what the ``kgpu`` entry
point runs), with a config directory of its own and no ``KGPU_*`` or ``RCLONE_*`` variable
from this environment, against the ``rclone-sqlite`` stack (embedded ``rclone serve s3``,
which checks presigned signatures; SQLite; the ``local`` pod backend). Transfers go through
the bundled rclone against the WebDAV endpoint, as they do for a researcher.
"""

from __future__ import annotations

import html
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from tests.conftest import fuse_present, require_system_part
from tests.tcp_relay import Forwarder
from tests.test_docs_examples import bash_blocks, run_doc

pytestmark = pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)


class Kgpu:
    """``kgpu`` as a researcher runs it: its own config and state folders, the server in its login."""

    def __init__(self, home: Path, env: dict[str, str] | None = None):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("KGPU_", "RCLONE_"))}
        self.env.update(XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"), **(env or {}))

    def __call__(self, *args: str, stdin: str | None = None, cwd: Path | None = None, env=None, timeout=300):
        return subprocess.run(
            [sys.executable, "-m", "client", *args], input=stdin, capture_output=True, text=True,
            cwd=cwd or self.home, env={**self.env, **(env or {})}, timeout=timeout,
            **({} if stdin is not None else {"stdin": subprocess.DEVNULL}),
        )

    def json(self, *args: str, **kwargs):
        done = self(*args, "--json", **kwargs)
        assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
        return json.loads(done.stdout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "client", *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=self.home, env=self.env,
        )


@pytest.fixture
def kgpu(stack, user, tmp_path) -> Kgpu:
    """A client logged in as ``user``."""
    client = Kgpu(tmp_path)
    done = client("login", "--base-url", stack.base, stdin=user.token + "\n")
    assert done.returncode == 0, done.stderr
    return client


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"epoch,loss\n1,0.9\n",
        "sub/b.bin": os.urandom(3_000_000),
        "sub/deeper/c d.txt": b"a name with a space\n",
        "sub/empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def tree_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def drive_files(stack, user, prefix: str) -> dict[str, int]:
    listing = requests.get(f"{stack.base}/v1/files", params={"prefix": prefix}, headers=user.auth).json()
    return {f["path"][len(prefix):]: f["size"] for f in listing["files"]}


# ---------------------------------------------------------------- login


def test_login_keeps_the_token_in_a_file_only_its_owner_reads(stack, user, tmp_path):
    client = Kgpu(tmp_path)
    not_yet = client("ls")
    assert not_yet.returncode == 3 and "kgpu login" in not_yet.stderr

    refused = client("login", "--base-url", stack.base, stdin="kgpu_" + "0" * 48 + "\n")
    assert refused.returncode == 1 and refused.stderr.strip(), refused.stderr
    config = tmp_path / "config" / "kgpu" / "config.json"
    assert not config.exists()

    done = client("login", "--base-url", stack.base + "/v1/", "--json", stdin=user.token + "\n")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["me"]["user"]["email"] == user.email
    assert config.stat().st_mode & 0o777 == 0o600
    assert json.loads(config.read_text()) == {"base_url": stack.base, "token": user.token}
    assert user.token not in done.stdout + done.stderr

    # The environment overrides the file: a revoked token there is refused with the server's message.
    other = stack.new_user()
    assert client.json("ls", env={"KGPU_API_TOKEN": other.token})["entries"] == []
    bad = client("gpus", env={"KGPU_API_TOKEN": "kgpu_" + "1" * 48})
    assert bad.returncode == 1 and "token" in bad.stderr.lower()

    assert client("logout").returncode == 0 and not config.exists()
    assert client("gpus").returncode == 3


def test_login_takes_the_token_from_the_environment(stack, user, tmp_path):
    client = Kgpu(tmp_path, {"KGPU_API_TOKEN": user.token, "KGPU_API_BASE": stack.base})
    done = client("login")
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "config" / "kgpu" / "config.json").read_text())
    assert saved == {"base_url": stack.base, "token": user.token}


# ---------------------------------------------------------------- kgpu login --browser (issue 19)

HANDOFF = re.compile(r"(http://\S+/view/cli\?port=(\d+)&state=([\w-]+)(?:&code_challenge=([\w-]{43})&code_challenge_method=S256)?)")
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
CODE_FORM = re.compile(r'<form method="post" action="(/view/cli/code\?[^"]+)"')


def _dashboard_cookie(stack, account) -> dict[str, str]:
    """The cookie of a browser signed in to the dashboard as ``account``, right after its sign-in
    (made with the server's own signer: tests/test_signin.py signs in through a real provider)."""
    from gateway import tokens
    from gateway.web_session import SESSION_COOKIE, new_session

    state = stack.server.app.state
    with state.sessions() as session:
        row = tokens.find_by_plaintext(session, account.token)
    web = new_session(account.id, row.id, account.token)
    return {"Cookie": f"{SESSION_COOKIE}={state.cookie_signer.dump_session(web)}"}


def _confirm(stack, cookie: dict[str, str], page_url: str) -> str:
    """What a signed-in browser does on the page `kgpu login --browser` opens: confirm; the
    address the server then sends it to (the command's loopback, with a one-time code)."""
    page = requests.get(page_url, headers={**cookie, "Accept": "text/html"}, allow_redirects=False)
    assert page.status_code == 200, (page.status_code, page.text[:300])
    action = html.unescape(CODE_FORM.search(page.text).group(1))
    csrf = CSRF_FIELD.search(page.text).group(1)
    answer = requests.post(f"{stack.base}{action}", data={"csrf_token": csrf}, headers=cookie, allow_redirects=False)
    assert answer.status_code == 303, (answer.status_code, answer.text[:300])
    return answer.headers["location"]


def _browser_login(client: Kgpu, base: str) -> tuple[subprocess.Popen, re.Match]:
    command = client.popen("login", "--browser", "--no-open", "--base-url", base)
    line = command.stderr.readline()
    found = HANDOFF.search(line)
    assert found, line
    return command, found


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    """A command of another local user (uid 65534, no groups)."""
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv], capture_output=True, text=True, timeout=60,
    )


def test_login_through_the_browser_never_takes_a_token_another_user_sends(stack, user, tmp_path):
    """Issue 19: the login's port and state are on the browser's command line, readable by every
    user of the machine, and a script of uid 65534 posted its own token to the listener, which the
    victim's command saved. Now the listener takes only a one-time code that the server redeems for
    the verifier only this command holds (PKCE), and nothing at all from another uid: everything the
    attacker tries is refused, the command keeps waiting, and it ends with the victim's own token."""
    attacker = stack.new_user()
    client = Kgpu(tmp_path)
    command, found = _browser_login(client, stack.base)
    page_url, port, state = found.group(1), found.group(2), found.group(3)
    callback = f"http://127.0.0.1:{port}/callback"
    try:
        # Another local user posts the token it made itself, with the state it read from `ps`.
        posted = _as_nobody("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--data-urlencode", f"state={state}",
                            "--data-urlencode", f"token={attacker.token}", callback)
        assert posted.stdout == "403", (posted.stdout, posted.stderr)
        # ... or a code its own dashboard session minted for this login's challenge (read from `ps` too).
        injected = _confirm(stack, _dashboard_cookie(stack, attacker), page_url)
        assert injected.startswith(f"{callback}?code=")
        sent = _as_nobody("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", injected)
        assert sent.stdout == "403", (sent.stdout, sent.stderr)
        # Whatever comes from this very user (the one check a listener can make where the kernel does
        # not tell who connects) must still be a code the server redeems for this command's verifier.
        for fields in (
            {"state": state, "token": attacker.token},
            {"state": state, "code": "A" * 43},
            {"state": "x" * 32, "code": "A" * 43},
        ):
            refused = requests.post(callback, data=fields)
            assert refused.status_code == 400, (fields, refused.status_code, refused.text)
        # A code minted for another login (the attacker's own, with its own challenge) is refused by the server.
        (tmp_path / "other").mkdir()
        other = Kgpu(tmp_path / "other")
        other_command, other_found = _browser_login(other, stack.base)
        try:
            foreign = _confirm(stack, _dashboard_cookie(stack, attacker), other_found.group(1))
            foreign_code = re.search(r"code=([\w-]+)", foreign).group(1)
            refused = requests.get(callback, params={"code": foreign_code, "state": state})
            assert refused.status_code == 400 and "did not take this code" in refused.text, refused.text
        finally:
            other_command.kill()
            other_command.wait()
        assert command.poll() is None, command.communicate()  # still waiting for its own sign-in

        # The victim confirms in their own browser: the command gets their token.
        own = _confirm(stack, _dashboard_cookie(stack, user), page_url)
        done = requests.get(own)
        assert done.status_code == 200 and "The kgpu command has your token" in done.text
        out, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, err
    assert user.email in out
    config = tmp_path / "config" / "kgpu" / "config.json"
    assert json.loads(config.read_text()) == {"base_url": stack.base, "token": user.token}
    assert config.stat().st_mode & 0o777 == 0o600
    assert "another user of this computer (uid 65534)" in err and attacker.token not in out + err
    # The code was good once: replayed, even with a verifier, it is refused.
    code = re.search(r"code=([\w-]+)", own).group(1)
    replay = requests.post(f"{stack.base}/view/cli/exchange", json={"code": code, "code_verifier": "v" * 43})
    assert replay.status_code == 400 and replay.json()["error_code"] == "invalid_grant"


def test_a_login_code_is_one_time_short_lived_and_bound_to_its_challenge(stack, user):
    """POST /view/cli/exchange: the code a signed-in page mints gives the token once, within its
    minute, and only with the verifier of the challenge it was minted for; the first try burns it."""
    from client.browser_login import s256
    from gateway import cli_login, tokens

    cookie = _dashboard_cookie(stack, user)
    verifier = "v" * 20 + uuid.uuid4().hex + "~._-"
    query = {"port": 40000, "state": "s" * 20, "code_challenge": s256(verifier), "code_challenge_method": "S256"}
    page_url = f"{stack.base}/view/cli?{urlencode(query)}"

    def new_code() -> str:
        location = _confirm(stack, cookie, page_url)
        assert location.startswith("http://127.0.0.1:40000/callback?") and "state=" + "s" * 20 in location
        assert user.token not in location
        return re.search(r"code=([\w-]+)", location).group(1)

    def exchange(code: str, with_verifier: str) -> requests.Response:
        return requests.post(f"{stack.base}/view/cli/exchange", json={"code": code, "code_verifier": with_verifier})

    code = new_code()
    wrong = exchange(code, "w" * 43)
    assert wrong.status_code == 400 and wrong.json()["error_code"] == "invalid_grant", wrong.text
    assert set(wrong.json()) == {"error_code", "message", "trace_id"}
    assert exchange(code, verifier).status_code == 400  # burnt by the wrong try

    code = new_code()
    right = exchange(code, verifier)
    assert right.status_code == 200 and right.json()["token"] == user.token
    assert right.headers["cache-control"] == "no-store"
    assert exchange(code, verifier).status_code == 400  # once

    # Past its minute: refused.
    state = stack.server.app.state
    with state.sessions.begin() as session:
        row = tokens.find_by_plaintext(session, user.token)
        old = cli_login.mint(session, user.id, row.id, user.token, s256(verifier), now=time.time() - 120)
    late = exchange(old, verifier)
    assert late.status_code == 400 and "expired" in late.json()["message"]

    # Nothing but a code and a verifier; a page without a challenge (an older kgpu) is a 400.
    for body in ({}, {"code": 1, "code_verifier": verifier}, {"code": "x", "code_verifier": "short"}):
        assert exchange_status(stack, body) == 400, body
    for odd in ({**query, "code_challenge_method": "plain"}, {k: v for k, v in query.items() if k != "code_challenge"},
                {**query, "code_challenge": "short"}):
        reply = requests.get(f"{stack.base}/view/cli?{urlencode(odd)}", headers={"Accept": "application/json"})
        assert reply.status_code == 400, odd
    # Minting needs the session's CSRF token.
    forged = requests.post(f"{stack.base}/view/cli/code?{urlencode(query)}", data={"csrf_token": "x"}, headers=cookie,
                           allow_redirects=False)
    assert forged.status_code == 403
    # A person signs in a command at a time: past a few codes a minute, a 429 (the table stays small).
    for _ in range(cli_login.MAX_LIVE_CODES_PER_USER - 2):
        new_code()
    page = requests.get(page_url, headers={**cookie, "Accept": "text/html"})
    csrf = CSRF_FIELD.search(page.text).group(1)
    more = requests.post(f"{stack.base}/view/cli/code?{urlencode(query)}", data={"csrf_token": csrf},
                         headers={**cookie, "Accept": "application/json"}, allow_redirects=False)
    assert more.status_code == 429 and more.json()["error_code"] == "too_many_requests", more.text


def exchange_status(stack, body: dict) -> int:
    return requests.post(f"{stack.base}/view/cli/exchange", json=body).status_code


# ---------------------------------------------------------------- the drive


def test_cp_ls_sync_mv_rm_round_trips(stack, user, kgpu, tmp_path):
    local = tmp_path / "exp42"
    files = make_tree(local)

    up = kgpu.json("cp", "-r", str(local), "kgpu:exp42", "-j", "4")
    assert up["files"] == len(files) and up["bytes"] == sum(map(len, files.values()))
    assert drive_files(stack, user, "exp42/") == {name: len(data) for name, data in files.items()}

    listing = kgpu.json("ls", "kgpu:exp42")
    assert {(e["path"], e["type"]) for e in listing["entries"]} == {("a.txt", "file"), ("sub/", "dir")}
    everything = kgpu.json("ls", "-R", "kgpu:exp42")["entries"]
    assert {e["path"]: e["size"] for e in everything if e["type"] == "file"} == {n: len(d) for n, d in files.items()}
    human = kgpu("ls", "kgpu:exp42/sub")
    assert human.returncode == 0 and "b.bin" in human.stdout and "deeper/" in human.stdout

    down = tmp_path / "back"
    kgpu.json("cp", "-r", "kgpu:exp42", str(down))
    assert tree_of(down) == files
    # -r to a new local path: a folder's contents, or a file to that very name (rclone tells which).
    kgpu.json("cp", "-r", "kgpu:exp42/sub/b.bin", str(tmp_path / "b.copy"))
    assert (tmp_path / "b.copy").read_bytes() == files["sub/b.bin"]
    kgpu.json("cp", "-r", "kgpu:exp42/sub", str(tmp_path / "sub.copy"))
    assert tree_of(tmp_path / "sub.copy") == {n[len("sub/"):]: d for n, d in files.items() if n.startswith("sub/")}

    # One file: into a folder (like cp), to a new name, and back.
    kgpu.json("cp", str(local / "a.txt"), "kgpu:exp42/sub/")
    kgpu.json("cp", str(local / "sub" / "b.bin"), "kgpu:single/weights.bin")
    kgpu.json("cp", "kgpu:single/weights.bin", str(tmp_path / "weights.copy"))
    assert (tmp_path / "weights.copy").read_bytes() == files["sub/b.bin"]
    assert drive_files(stack, user, "exp42/sub/")["a.txt"] == len(files["a.txt"])

    # sync: a second run moves nothing; a change is sent, a removal deleted.
    first = kgpu.json("sync", str(local), "kgpu:synced")
    assert first["files"] == len(files)
    again = kgpu.json("sync", str(local), "kgpu:synced")
    assert (again["files"], again["bytes"], again["deleted"]) == (0, 0, 0)
    (local / "a.txt").write_bytes(b"epoch,loss\n1,0.9\n2,0.4\n")
    (local / "sub" / "empty.txt").unlink()
    changed = kgpu.json("sync", str(local), "kgpu:synced")
    assert (changed["files"], changed["deleted"]) == (1, 1)
    got = requests.get(f"{stack.base}/v1/files/synced/a.txt", headers=user.auth)
    assert got.content == b"epoch,loss\n1,0.9\n2,0.4\n"
    assert "sub/empty.txt" not in drive_files(stack, user, "synced/")

    # mv: a folder, server-side, then a file back out to this machine.
    kgpu.json("mv", "kgpu:synced", "kgpu:moved")
    assert drive_files(stack, user, "synced/") == {}
    assert drive_files(stack, user, "moved/")["sub/b.bin"] == len(files["sub/b.bin"])
    kgpu.json("mv", "kgpu:moved/sub/b.bin", str(tmp_path / "moved.bin"))
    assert (tmp_path / "moved.bin").read_bytes() == files["sub/b.bin"]
    assert "sub/b.bin" not in drive_files(stack, user, "moved/")

    # rm: a file, then a folder (which needs -r).
    assert kgpu.json("rm", "kgpu:moved/a.txt")["files"] == 1
    folder = kgpu("rm", "kgpu:moved")
    assert folder.returncode == 2 and "-r" in folder.stderr
    assert kgpu.json("rm", "-r", "kgpu:moved")["files"] >= 1
    assert drive_files(stack, user, "moved/") == {}


def test_errors_have_exit_codes_and_messages(stack, user, kgpu, tmp_path):
    missing = kgpu("cp", "kgpu:no/such/file.bin", str(tmp_path / "x"))
    assert missing.returncode == 1 and "no file or folder kgpu:no/such/file.bin" in missing.stderr
    for recursive in (["-r"], ["-r", "--json"]):  # -r to a new path: the server is not asked first
        folder = kgpu("cp", *recursive, "kgpu:no/such/folder", str(tmp_path / "y"))
        assert folder.returncode == 1 and "no file or folder kgpu:no/such/folder" in folder.stderr
        assert "--json" not in recursive or json.loads(folder.stderr)["error_code"] == "not_found"
        assert not os.path.lexists(tmp_path / "y")
    gone = kgpu("rm", "kgpu:no/such/file.bin", "--json")
    assert gone.returncode == 1 and json.loads(gone.stderr)["error_code"] == "not_found"
    assert kgpu("cp", "a", "b").returncode == 2  # neither side in the drive
    assert kgpu("cp", str(tmp_path), "kgpu:x").returncode == 2  # a folder without -r
    assert kgpu("sync", str(tmp_path), "kgpu:").returncode == 2  # never the drive's root
    assert kgpu("frobnicate").returncode == 2
    refused = kgpu("rm", "-r", "kgpu:")
    assert refused.returncode == 2
    # An API refusal: its envelope's message on stderr, exit code 1.
    nope = kgpu("return", "gpu-000000000000", "--json")
    assert nope.returncode == 1
    envelope = json.loads(nope.stderr)
    assert envelope["error_code"] == "gpu_not_found" and "gpu-000000000000" in envelope["message"]
    bad = kgpu("rent", "--name", "Not_DNS_Safe")
    assert bad.returncode == 1 and "DNS-safe" in bad.stderr
    unreachable = kgpu("gpus", env={"KGPU_API_BASE": "http://127.0.0.1:9"})
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr


def test_shared_drives_read_write_by_role(stack, user, kgpu, tmp_path):
    slug = "lab-" + uuid.uuid4().hex[:8]
    made = requests.post(f"{stack.base}/v1/admin/orgs", json={"slug": slug, "owner_user_id": user.id},
                         headers=stack.admin)
    assert made.status_code == 201, made.text
    local = tmp_path / "dataset"
    files = make_tree(local)

    up = kgpu.json("cp", "-r", str(local), f"kgpu:shared/{slug}/datasets/v1")
    assert up["files"] == len(files)
    orgs = kgpu.json("ls", "kgpu:shared")["entries"]
    assert f"{slug}/" in {e["path"] for e in orgs}
    listed = kgpu.json("ls", "-R", f"kgpu:shared/{slug}/datasets")["entries"]
    assert {e["path"] for e in listed if e["type"] == "file"} == {f"v1/{n}" for n in files}
    down = tmp_path / "down"
    kgpu.json("cp", "-r", f"kgpu:shared/{slug}/datasets/v1", str(down))
    assert tree_of(down) == files
    # The WebDAV view of a shared drive is read-only: sync and mv into it are refused here.
    assert kgpu("sync", str(local), f"kgpu:shared/{slug}/x").returncode == 2

    member = stack.new_user()
    added = requests.post(f"{stack.base}/v1/admin/orgs/{slug}/members", json={"user_id": member.id, "role": "member"},
                          headers=stack.admin)
    assert added.status_code == 200, added.text
    reader = Kgpu(tmp_path / "member", {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": member.token})
    (tmp_path / "member").mkdir()
    assert reader.json("ls", f"kgpu:shared/{slug}/datasets/v1")["entries"]
    refused = reader("cp", str(local / "a.txt"), f"kgpu:shared/{slug}/mine.txt", "--json")
    assert refused.returncode == 1 and json.loads(refused.stderr)["error_code"] == "read_only"

    assert kgpu.json("rm", "-r", f"kgpu:shared/{slug}/datasets")["files"] == len(files)
    assert kgpu.json("ls", "-R", f"kgpu:shared/{slug}")["entries"] == []


def _rclone_processes_of(home: Path) -> dict[int, list[str]]:
    """pid → command line of the rclone processes running now with ``home`` in their arguments."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv if a]
        if text and Path(text[0]).name == "rclone" and any(str(home) in a for a in text):
            found[int(proc.name)] = text
    return found


def _rclone_argvs_of(home: Path) -> list[list[str]]:
    return list(_rclone_processes_of(home).values())


def _rclone_pids_of(home: Path) -> list[int]:
    return list(_rclone_processes_of(home))


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


@pytest.mark.skipif(not (Path("/dev/fuse").exists() and shutil.which("fusermount3")), reason="needs FUSE (fuse3)")
def test_mount_unmount_waits_for_uploads_and_keeps_the_token_off_command_lines(stack, user, kgpu, tmp_path):
    mountpoint = tmp_path / "drive"
    mounted = kgpu.json("mount", str(mountpoint), "kgpu:laptop")
    assert mounted["mountpoint"] == str(mountpoint)
    try:
        argvs = _rclone_argvs_of(tmp_path)
        assert argvs and any("mount" in a for a in argvs), argvs
        assert not any(user.token in arg for argv in argvs for arg in argv)
        # It has the token in its environment instead, which only its owner can read.
        environs = [_environ_of(pid) for pid in _rclone_pids_of(tmp_path)]
        assert any(f"Authorization,Bearer {user.token}" in e.get("RCLONE_CONFIG_KGPU_HEADERS", "") for e in environs)
        written = {f"f{i}.bin": os.urandom(200_000 + i) for i in range(12)}
        for name, data in written.items():
            (mountpoint / name).write_bytes(data)
        done = kgpu.json("unmount", str(mountpoint))
        assert done["uploads_drained"] is True
    finally:
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
    assert not os.path.ismount(mountpoint)
    # Unmounted at once after the last write, and still every file is in the drive, byte for byte.
    assert drive_files(stack, user, "laptop/") == {n: len(d) for n, d in written.items()}
    for name, data in written.items():
        assert requests.get(f"{stack.base}/v1/files/laptop/{name}", headers=user.auth).content == data


def test_transfers_never_put_the_token_on_a_command_line(stack, user, kgpu, tmp_path):
    """While a transfer runs, no rclone it started has the token in its argv (every user's ps shows it)."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(24):
        (big / f"{i}.bin").write_bytes(os.urandom(4 << 20))
    assert kgpu.json("cp", "-r", str(big), "kgpu:big")["files"] == 24  # uploads run no rclone
    copying = kgpu.popen("cp", "-r", "kgpu:big", str(tmp_path / "back"), "-j", "1", "--json")
    seen: list[list[str]] = []
    while copying.poll() is None:
        seen += _rclone_argvs_of(tmp_path)
        time.sleep(0.01)
    out, err = copying.communicate()
    assert copying.returncode == 0, err
    assert seen, "never saw the rclone of the copy running"
    assert not any(user.token in arg for argv in seen for arg in argv)
    assert json.loads(out)["files"] == 24


def _read_until(fd: int, wanted: bytes, timeout: float = 60) -> bytes:
    """What a pseudo-terminal's master side reads until ``wanted`` shows up (or the child is gone)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed its side
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_progress_bar_on_a_terminal(stack, user, kgpu, tmp_path):
    """With stderr on a terminal, cp draws a progress bar from rclone's stats; piped, it does not."""
    (tmp_path / "up").mkdir()
    for i in range(4):
        (tmp_path / "up" / f"{i}.bin").write_bytes(os.urandom(1 << 20))
    master, slave = pty.openpty()
    try:
        copying = subprocess.Popen(
            [sys.executable, "-m", "client", "cp", "-r", str(tmp_path / "up"), "kgpu:bar"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, cwd=tmp_path, env=kgpu.env,
        )
        os.close(slave)
        # The bytes can reach 100% a moment before the last file counts as done: wait for both.
        drawn = _read_until(master, b"4/4 files")
        assert copying.wait(timeout=120) == 0
    finally:
        os.close(master)
    assert b"[" + b"#" * 30 + b"] 100.0%" in drawn and b"4/4 files" in drawn, drawn
    piped = kgpu("cp", "-r", str(tmp_path / "up"), "kgpu:bar2")
    assert piped.returncode == 0 and "#" not in piped.stderr


# ---------------------------------------------------------------- rentals and runs


def test_rent_run_stream_exit_code_and_return(stack, user, kgpu):
    rental = kgpu.json("rent", "--name", "cli-test")
    gpu = rental["gpu_id"]
    assert rental["ready"] is True and rental["phase"] == "Running"
    try:
        mine = kgpu.json("gpus")
        assert [g["gpu_id"] for g in mine["my_gpus"]] == [gpu]

        done = kgpu("run", gpu, "--", "bash", "-c", "echo one; echo two >&2; echo three; exit 4")
        assert done.returncode == 4, done.stderr
        assert done.stdout == "one\nthree\n"
        assert "two\n" in done.stderr

        streamed = kgpu("run", gpu, "--json", "--", "sh", "-c", "echo hi; echo there >&2")
        assert streamed.returncode == 0, streamed.stderr
        events = [json.loads(line) for line in streamed.stdout.splitlines()]
        assert events[:-1] == [{"type": "stdout", "chunk": "hi\n"}, {"type": "stderr", "chunk": "there\n"}]
        run_id = events[-1]["run_id"]
        assert events[-1]["exit_code"] == 0

        logs = kgpu("logs", gpu, run_id)
        assert logs.returncode == 0 and logs.stdout == "hi\n" and "there" in logs.stderr

        # Live: the first line arrives while the run is still going.
        live = kgpu.popen("run", gpu, "--", "bash", "-c", "echo started; sleep 600")
        assert live.stdout.readline() == "started\n"
        state = requests.get(f"{stack.base}/v1/runs", params={"gpu_id": gpu}, headers=user.auth).json()
        assert any(r["phase"] == "Running" for r in state["runs"])
        # Ctrl-C without a terminal stops the run; the run's exit code (143, SIGTERM) is ours.
        live.send_signal(signal.SIGINT)
        out, err = live.communicate(timeout=60)
        assert live.returncode == 143, err
        state = requests.get(f"{stack.base}/v1/runs", params={"gpu_id": gpu}, headers=user.auth).json()
        assert not any(r["phase"] == "Running" for r in state["runs"])

        # On a terminal, Ctrl-C asks; "d" detaches and the run goes on; kgpu logs -f follows it to its end.
        master, slave = pty.openpty()
        try:
            asked = subprocess.Popen(
                [sys.executable, "-m", "client", "run", gpu, "--",
                 "bash", "-c", "echo started; until [ -e go.flag ]; do sleep 0.2; done; echo finished; exit 7"],
                stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=kgpu.home, env=kgpu.env,
            )
            os.close(slave)
            assert asked.stdout.readline() == "started\n"
            asked.send_signal(signal.SIGINT)
            os.write(master, b"d\n")
            out, err = asked.communicate(timeout=60)
        finally:
            os.close(master)
        assert asked.returncode == 0, err
        assert "[S]top / [d]etach" in err and "detached" in err
        run_id = err.split("kgpu logs ")[-1].split()[1]
        state = requests.get(f"{stack.base}/v1/runs/{run_id}", headers=user.auth).json()
        assert state["phase"] == "Running"
        follower = kgpu.popen("logs", gpu, run_id, "--follow")
        assert follower.stdout.readline() == "started\n"
        go = kgpu("run", gpu, "--", "touch", "go.flag")
        assert go.returncode == 0, go.stderr
        out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0 and out == "finished\n", (out, err)
        assert requests.get(f"{stack.base}/v1/runs/{run_id}", headers=user.auth).json()["exit_code"] == 7
    finally:
        returned = kgpu.json("return", gpu)
    assert returned["phase"] == "Ended" and returned["end_reason"] == "returned"
    after = kgpu("run", gpu, "--json", "--", "true")
    assert after.returncode == 1


class CuttableProxy(Forwarder):
    """A TCP forwarder to the server whose open connections can be cut (a gateway going away)."""

    def __init__(self, upstream_port: int):
        self.open: list[socket.socket] = []
        self.cuts = 0
        super().__init__(upstream_port)

    def forward(self, client: socket.socket, upstream: socket.socket, *_) -> None:
        self.open += [client, upstream]
        super().forward(client, upstream)

    def cut(self) -> None:
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []
        self.cuts += 1

    def close(self) -> None:
        super().close()
        self.cut()


def test_run_output_survives_a_broken_stream(stack, user, kgpu):
    """The stream breaks off mid-run (as when the gateway restarts): kgpu opens it again and shows
    every line once, in order, and still exits with the run's code."""
    rental = kgpu.json("rent", "--name", "cut-stream")
    proxy = CuttableProxy(stack.server.port)
    try:
        env = {"KGPU_API_BASE": f"http://127.0.0.1:{proxy.port}"}
        running = subprocess.Popen(
            [sys.executable, "-m", "client", "run", rental["gpu_id"], "--",
             "bash", "-c", "for i in $(seq 1 8); do echo line $i; sleep 0.3; done; exit 6"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=kgpu.home, env={**kgpu.env, **env},
        )
        first = running.stdout.readline()
        proxy.cut()
        out, err = running.communicate(timeout=120)
        assert running.returncode == 6, err
        assert first + out == "".join(f"line {i}\n" for i in range(1, 9))
        assert proxy.cuts == 1
    finally:
        proxy.close()
        kgpu.json("return", rental["gpu_id"])


# ---------------------------------------------------------------- docs/client.md


def test_client_guide_examples(stack, user, tmp_path):
    require_system_part(fuse_present(), "FUSE (fuse3), for `kgpu mount`,")
    result, workdir = run_doc("client.md", tmp_path, {"KGPU_API_BASE": stack.base, "KGPU_API_TOKEN": user.token})
    out = result.stdout
    assert bash_blocks("client.md")
    assert "second sync: 0 files" in out
    assert "run exit code: 3" in out
    assert (workdir / "config" / "kgpu" / "config.json").stat().st_mode & 0o777 == 0o600
    assert drive_files(stack, user, "exp42/")["results.csv"] == (workdir / "exp42" / "results.csv").stat().st_size
    assert requests.get(f"{stack.base}/v1/gpus", headers=user.auth).json()["my_gpus"] == []


def test_cp_keeps_modification_times_and_the_drive_knows_the_hashes(stack, user, kgpu, tmp_path):
    """Uploads go straight to the store: the drive keeps each file's time and the MD5 the store
    vouches for (its ETag is the MD5 signed into the URL), never a SHA1 it did not compute; the
    MD5 is the hash rclone checks (``rclone check``, ``sync --checksum``, every download)."""
    import hashlib
    from email.utils import parsedate_to_datetime

    source = tmp_path / "kept"
    source.mkdir()
    payload = os.urandom(200_000)
    (source / "old.bin").write_bytes(payload)
    os.utime(source / "old.bin", (1_600_000_000, 1_600_000_000))  # 2020-09-13
    done = kgpu("cp", "-r", str(source), "kgpu:kept")
    assert done.returncode == 0, done.stderr
    head = requests.head(f"{stack.base}/v1/files/kept/old.bin", headers=user.auth)
    assert head.status_code == 200, head.text
    assert parsedate_to_datetime(head.headers["Last-Modified"]).timestamp() == 1_600_000_000
    assert head.headers["OC-Checksum"] == f"MD5:{hashlib.md5(payload).hexdigest()}"
    listed = kgpu.json("ls", "kgpu:kept")
    assert "2020-09-13" in json.dumps(listed)
    flat = requests.get(f"{stack.base}/v1/files", params={"prefix": "kept/"}, headers=user.auth).json()["files"]
    assert flat[0]["md5"] == hashlib.md5(payload).hexdigest() and "sha1" not in flat[0]
    # rclone checks that hash on the way down.
    back = tmp_path / "back"
    assert kgpu.json("cp", "-r", "kgpu:kept", str(back))["files"] == 1
    assert (back / "old.bin").read_bytes() == payload


def test_cp_skips_what_the_drive_has_and_sync_is_unchanged(stack, user, kgpu, tmp_path):
    """Like ``rclone copy``, cp sends only files whose size or time differ; and ``kgpu sync`` (still
    rclone) finds nothing to do over files cp sent: the times and sizes it reads are the files'."""
    local = tmp_path / "exp"
    files = make_tree(local)
    first = kgpu.json("cp", "-r", str(local), "kgpu:exp", "-j", "4")
    assert first["files"] == len(files)
    again = kgpu.json("cp", "-r", str(local), "kgpu:exp")
    assert (again["files"], again["bytes"]) == (0, 0)
    (local / "a.txt").write_bytes(b"epoch,loss\n1,0.9\n2,0.5\n")
    changed = kgpu.json("cp", "-r", str(local), "kgpu:exp")
    assert changed["files"] == 1
    synced = kgpu.json("sync", str(local), "kgpu:exp")
    assert (synced["files"], synced["bytes"], synced["deleted"]) == (0, 0, 0)
    (local / "sub" / "empty.txt").unlink()
    assert kgpu.json("sync", str(local), "kgpu:exp")["deleted"] == 1
    assert requests.get(f"{stack.base}/v1/files/exp/a.txt", headers=user.auth).content == b"epoch,loss\n1,0.9\n2,0.5\n"


def test_cp_sends_a_large_file_as_parts_straight_to_the_store(stack, user, kgpu, tmp_path):
    """Above KGPU_MULTIPART_THRESHOLD a file goes up as a multipart upload the server starts and
    completes, its parts in parallel: the file arrives whole, with its time and MD5, and counts once."""
    import hashlib

    local = tmp_path / "big"
    local.mkdir()
    payload = os.urandom((11 << 20) + 12345)  # three parts of the test server's 5 MiB
    (local / "weights.bin").write_bytes(payload)
    (local / "small.txt").write_bytes(b"beside it\n")
    os.utime(local / "weights.bin", (1_650_000_000, 1_650_000_000))
    before = requests.get(f"{stack.base}/v1/files", params={"prefix": "nothing/"}, headers=user.auth).json()
    up = kgpu.json("cp", "-r", str(local), "kgpu:big", "-j", "3", env={"KGPU_MULTIPART_THRESHOLD": str(1 << 20)})
    assert (up["files"], up["multipart"], up["bytes"]) == (2, 1, len(payload) + 10)
    got = requests.get(f"{stack.base}/v1/files/big/weights.bin", headers=user.auth)
    assert got.content == payload
    listing = requests.get(f"{stack.base}/v1/files", params={"prefix": "big/"}, headers=user.auth).json()
    entry = next(f for f in listing["files"] if f["path"] == "big/weights.bin")
    assert entry["last_modified"].startswith("2022-04-15")
    assert entry["md5"] == hashlib.md5(payload).hexdigest()  # rclone serve s3 lists a whole MD5
    # Counted once, with no reservation left over.
    assert listing["quota"]["used_bytes"] == before["quota"]["used_bytes"] + len(payload) + 10


def test_cp_refused_by_the_quota_midway_loses_nothing(stack, user, kgpu, tmp_path, monkeypatch):
    """The quota refuses a file midway: cp exits 1 with the reason; every file that went up is
    whole, no partial object is left, and nothing stays reserved."""
    local = tmp_path / "many"
    local.mkdir()
    for i in range(6):
        (local / f"{i}.bin").write_bytes(os.urandom(300_000))
    (local / "9-big.bin").write_bytes(os.urandom(6 << 20))  # a multipart upload, refused whole
    monkeypatch.setattr(stack.settings, "user_quota_bytes", 1_000_000)
    done = kgpu("cp", "-r", str(local), "kgpu:many", "-j", "2", "--json",
                env={"KGPU_MULTIPART_THRESHOLD": str(1 << 20)})
    assert done.returncode == 1, done.stdout
    assert json.loads(done.stderr)["error_code"] == "quota_exceeded"
    listing = requests.get(f"{stack.base}/v1/files", params={"prefix": "many/"}, headers=user.auth).json()
    stored = {f["path"]: f["size"] for f in listing["files"]}
    assert stored and all(size == 300_000 for size in stored.values()), stored
    for path in stored:
        name = path.rsplit("/", 1)[1]
        assert requests.get(f"{stack.base}/v1/files/{path}", headers=user.auth).content == (local / name).read_bytes()
    assert listing["quota"]["used_bytes"] == sum(stored.values())
    # What was refused goes up once there is room; what is there already is not sent again.
    monkeypatch.setattr(stack.settings, "user_quota_bytes", 100 << 30)
    rest = kgpu.json("cp", "-r", str(local), "kgpu:many", env={"KGPU_MULTIPART_THRESHOLD": str(1 << 20)})
    assert rest["files"] == 7 - len(stored)


def test_cp_to_and_from_a_rented_gpu(stack, user, kgpu, gpu, tmp_path):
    """``kgpu cp FILE gpu-…:PATH`` and back (docs/pod-files.md): into a folder as cp(1) does."""
    local = tmp_path / "model.pt"
    local.write_bytes(os.urandom(3 << 20))
    up = kgpu.json("cp", str(local), f"{gpu}:/workspace/")
    assert (up["destination"], up["bytes"], up["files"]) == (f"{gpu}:/workspace/model.pt", 3 << 20, 1)
    kgpu.json("cp", str(local), f"{gpu}:ckpt/v1.pt")  # folders made as needed
    down = tmp_path / "down"
    down.mkdir()
    back = kgpu.json("cp", f"{gpu}:ckpt/v1.pt", str(down))
    assert back["destination"] == str(down / "v1.pt")
    assert (down / "v1.pt").read_bytes() == local.read_bytes()
    kgpu.json("cp", f"{gpu}:/workspace/model.pt", str(down / "renamed.pt"))
    assert (down / "renamed.pt").read_bytes() == local.read_bytes()
    missing = kgpu("cp", f"{gpu}:no/such.bin", str(down))
    assert missing.returncode == 1 and "/workspace/no/such.bin" in missing.stderr
    assert sorted(os.listdir(down)) == ["renamed.pt", "v1.pt"]  # no partial file left behind
    assert kgpu("cp", "-r", str(tmp_path), f"{gpu}:x").returncode == 2
    assert kgpu("cp", f"{gpu}:a", f"{gpu}:b").returncode == 2


def _told_to_wait(process: subprocess.Popen) -> str:
    """The first line a running ``kgpu cp`` writes on stderr: the wait it was told, or its failure."""
    line = process.stderr.readline()
    assert "(trying again in " in line, (line, process.communicate(timeout=30))
    return line


def test_many_cp_with_a_gpu_at_once_wait_out_the_cap_and_all_arrive(stack, user, kgpu, gpu, tmp_path, monkeypatch):
    """Three ``kgpu cp`` up to a GPU at once, then three down, while the user may hold one pod-file
    transfer (KGPU_POD_FILES_PER_USER=1) and already holds it: each is refused (429
    too_many_transfers), says it waits, and once that transfer ends every file arrives whole, both
    ways, with no partial or stray file left."""
    from tests.test_pod_files import _held_download, in_pod

    monkeypatch.setattr(stack.server.app.state.pod_files.slots, "per_caller", 1)
    in_pod(stack, user, gpu, "truncate -s 1G /tmp/big.bin")
    files = {f"f{i}.bin": os.urandom((1 << 20) + i) for i in range(3)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    def all_once_the_held_transfer_ends(*commands: list[str]) -> None:
        held = _held_download(stack, user.auth, gpu, wait_s=30)
        running: list[subprocess.Popen] = []
        try:
            running += [kgpu.popen(*command) for command in commands]
            for process in running:
                assert "1 pod-file transfers going" in _told_to_wait(process)
            held.close()
            for process in running:
                out, err = process.communicate(timeout=240)
                assert process.returncode == 0, (out, err)
        finally:
            held.close()
            for process in running:
                if process.poll() is None:
                    process.kill()
                    process.communicate()

    all_once_the_held_transfer_ends(*[["cp", str(tmp_path / name), f"{gpu}:many/"] for name in files])
    for name, data in files.items():
        deadline = time.monotonic() + 30
        # (the last cp's slot goes back just after its answer: asked again while it is still held)
        route = f"{stack.base}/v1/gpus/{gpu}/files/many/{name}"
        while (got := requests.get(route, headers=user.auth)).status_code == 429:
            assert time.monotonic() < deadline, got.text
            time.sleep(0.2)
        assert (got.status_code, got.content) == (200, data), name
    down = tmp_path / "down"
    down.mkdir()
    all_once_the_held_transfer_ends(*[["cp", f"{gpu}:many/{name}", f"{down}/"] for name in files])
    assert tree_of(down) == files  # each whole, once, and no .NAME.kgpu-partial left


class RecordingProxy(Forwarder):
    """A TCP forwarder to the server that keeps, for each connection, how many bytes the client
    sent up and what the server answered."""

    def __init__(self, upstream_port: int):
        self.sent: list[int] = []
        self.answered: list[bytearray] = []
        super().__init__(upstream_port)

    def forward(self, client: socket.socket, upstream: socket.socket, *_) -> None:
        n = len(self.sent)
        self.sent.append(0)
        self.answered.append(bytearray())

        def went_up(data: bytes) -> None:
            self.sent[n] += len(data)

        super().forward(client, upstream, up=went_up, down=self.answered[n].extend)


def test_cp_to_a_gpu_asks_first_so_a_refusal_costs_no_body(stack, user, gpu, tmp_path, monkeypatch):
    """``kgpu cp FILE gpu-…:PATH`` sends ``Expect: 100-continue`` (client/api.py put_file): the
    server refuses an upload past the user's cap (KGPU_POD_FILES_PER_USER=1, held by a stalled
    download) before its route reads the body, so uvicorn sends no 100 Continue and the client
    sends none of its 8 MiB; once the cap has room, uvicorn's 100 Continue (sent when the route
    reads the body) lets it go, and it arrives whole."""
    import hashlib
    from urllib.parse import urlsplit

    from client import retry
    from client.api import Api, ApiError
    from client.config import Login
    from tests.test_pod_files import _held_download, in_pod

    monkeypatch.setattr(stack.server.app.state.pod_files.slots, "per_caller", 1)
    in_pod(stack, user, gpu, "truncate -s 1G /tmp/big.bin")
    local = tmp_path / "weights.bin"
    local.write_bytes(os.urandom(8 << 20))
    proxy = RecordingProxy(urlsplit(stack.base).port)
    api = Api(Login(f"http://127.0.0.1:{proxy.port}", user.token), timeout=60)
    route = f"/v1/gpus/{gpu}/files/weights.bin"
    try:
        held = _held_download(stack, user.auth, gpu, wait_s=30)
        try:
            with pytest.raises(ApiError) as refused:
                api.put_file(route, local)
        finally:
            held.close()
        assert proxy.sent[0] < 4096, proxy.sent  # the request's head, none of its body
        assert proxy.answered[0].startswith(b"HTTP/1.1 429 "), bytes(proxy.answered[0][:200])
        assert (refused.value.status, refused.value.error_code, refused.value.retry_after) == (429, "too_many_transfers", 5)

        # The held transfer's slot comes back once the server sees it closed: a 429 meanwhile is waited out.
        monkeypatch.setattr(retry, "LONGEST_WAIT_S", 0.5)
        written = retry.attempts(lambda: api.put_file(route, local), tries=40)
        assert written == {"gpu_id": gpu, "path": "/workspace/weights.bin", "size": 8 << 20}
        assert proxy.answered[-1].startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 "), bytes(proxy.answered[-1][:200])
        assert proxy.sent[-1] > 8 << 20
        (tmp_path / "empty").write_bytes(b"")  # nothing to ask about: sent without Expect
        assert api.put_file(f"/v1/gpus/{gpu}/files/empty", tmp_path / "empty")["size"] == 0
    finally:
        proxy.close()
    got = requests.get(f"{stack.base}/v1/gpus/{gpu}/files/weights.bin", headers=user.auth)
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(local.read_bytes()).hexdigest()


def test_cp_with_a_gpu_fails_at_once_on_a_refusal_that_waiting_cannot_change(stack, kgpu, gpu, tmp_path):
    """A 404 (no such file in the pod) and a 400 (a path outside the pod's folders) are not sent again."""
    missing = kgpu("cp", f"{gpu}:no/such.bin", str(tmp_path))
    assert missing.returncode == 1 and missing.stderr.splitlines() == [missing.stderr.strip()], missing.stderr
    assert "/workspace/no/such.bin" in missing.stderr and "trying again" not in missing.stderr
    (tmp_path / "x.bin").write_bytes(b"x")
    outside = kgpu("cp", str(tmp_path / "x.bin"), f"{gpu}:/etc/x.bin")
    assert outside.returncode == 1 and outside.stderr.splitlines() == [outside.stderr.strip()], outside.stderr
    assert "trying again" not in outside.stderr
    as_json = kgpu("cp", str(tmp_path / "x.bin"), f"{gpu}:/etc/x.bin", "--json")
    assert (as_json.returncode, json.loads(as_json.stderr)["error_code"]) == (1, "invalid_path")


def test_a_download_cut_short_is_fetched_again_whole(stack, tmp_path):
    """client/api.py against a server that cuts its first answer short of its Content-Length (a
    gateway going away mid-file): the cut is an error worth another try, never a file renamed into
    place short, and the second try writes the file whole, once, with no partial name left."""
    import http.server

    from client import retry
    from client.api import Api
    from client.config import Login

    data = os.urandom(300_000)
    sent: list[int] = []

    class Cutting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = data[: len(data) // 2] if not sent else data
            sent.append(len(body))
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cutting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = Api(Login(f"http://127.0.0.1:{server.server_address[1]}", "t"))
        local = tmp_path / "ckpt.pt"
        size = retry.attempts(lambda: api.download("/v1/gpus/gpu-1/files/ckpt.pt", local), tries=3)
        assert (size, sent, local.read_bytes() == data) == (len(data), [len(data) // 2, len(data)], True)
        assert os.listdir(tmp_path) == ["ckpt.pt"]
    finally:
        server.shutdown()


def test_a_put_that_fails_on_the_way_is_sent_again_and_a_refusal_is_not(stack, tmp_path):
    """client/uploads.py against a store that answers 500 now and then (rclone serve s3 does, under
    many PUTs at once): the PUT is sent again, whole, its bytes counted once; a 403 is final."""
    import http.server

    from client import uploads

    answers: list[int] = []
    received: list[bytes] = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = answers.pop(0)
            received.append(body)
            self.send_response(status)
            self.send_header("ETag", '"abc"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = tmp_path / "f.bin"
        local.write_bytes(os.urandom(3 << 20))
        url = f"http://127.0.0.1:{server.server_address[1]}/b/k?X-Amz-Signature=x"
        progress = uploads._Progress([uploads.LocalFile(local, "/v1/files/f.bin", 3 << 20, 0)], lambda stats: None)
        answers[:] = [500, 503, 200]
        etag = uploads._attempts(lambda: uploads.put(url, {}, local, 0, 3 << 20, progress), threading.Event())
        assert etag == "abc" and len(received) == 3 and all(body == local.read_bytes() for body in received)
        assert progress.sent == 3 << 20
        answers[:] = [403]
        with pytest.raises(uploads.StoreRefused):
            uploads._attempts(lambda: uploads.put(url, {}, local, 0, 3 << 20, progress), threading.Event())
        assert len(received) == 4 and progress.sent == 3 << 20
    finally:
        server.shutdown()
