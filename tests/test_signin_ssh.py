"""The dashboard's SSH parts in a real browser (headless Debian chromium through Playwright, sign-in
at the real test OIDC provider, as in tests/test_signin.py), against a server that runs the SSH
bastion: the bastion's known_hosts line, a rental's ssh line, a private key minted at rent and on
the card (shown once, downloaded, and logging in with the real OpenSSH client), a pasted public
key pinned, and what a bad or borrowed key does (the API's message on the card; nothing changes).
A console error or an uncaught exception on the page fails the test."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect

from drive.store.embedded import free_port
from tests.conftest import ADMIN_TOKEN, passable, require_system_part
from tests.oidc_support import signin_server, signing_keys
from tests.test_signin import browser, new_page, screenshot, sign_in, token_on  # noqa: F401 (fixtures)

KEEPER = "ken@lab.example"  # a researcher whose rental's key the page changes
PASTER = "barbara@lab.example"  # one who pastes a key to rent with
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory, rclone_target):
    require_system_part(shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None,
                        "OpenSSH's ssh and ssh-keygen")
    with signin_server(
        tmp_path_factory.mktemp("browser-ssh"), rclone_target, signing_keys(),
        allowed_emails=f"{KEEPER},{PASTER}", ssh_port=free_port(),
    ) as (running, _):
        yield running


def login(server, key: Path, login_name: str = "kgpu") -> subprocess.CompletedProcess:
    """``echo $KGPU_RENT_ID`` through the bastion with the real ssh client and only ``key``."""
    port = requests.get(f"{server.base}/v1/gpus").json()["ssh"]["ssh_port"]
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20", "-i", str(key),
         "-p", str(port), f"{login_name}@127.0.0.1", "echo $KGPU_RENT_ID"],
        capture_output=True, text=True, timeout=120,
    )


def logs_in(server, key: Path, gpu_id: str) -> bool:
    done = login(server, key)
    if done.returncode == 0:
        assert done.stdout.strip() == gpu_id, done
        return True
    assert "Permission denied" in done.stderr, done  # refused for its key, not for anything else
    return False


def download_key(page, gpu_id: str, folder: Path) -> tuple[Path, str]:
    """Save the card's minted private key with its Download link; (the file, the key shown)."""
    card = page.locator(f".rental[data-gpu='{gpu_id}']")
    shown = card.locator(".minted pre.private-key").text_content()
    with page.expect_download() as download:
        card.locator(".minted a[download]").click()
    assert download.value.suggested_filename == f"kgpu-{gpu_id}"
    path = folder / f"{download.value.suggested_filename}-{len(list(folder.iterdir()))}"
    download.value.save_as(path)
    path.chmod(0o600)
    assert path.read_text() == shown and "PRIVATE KEY" in shown
    return path, shown


def test_a_researcher_logs_in_with_the_key_the_page_minted_and_pins_their_own(server, new_page, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every record of the server: no private key in any of them
    new_page.allow("status of 400")  # the refused key, which the card then explains
    new_page.allow("status of 409")  # the borrowed key, likewise
    folder = passable(tmp_path)
    page = new_page()
    page.set_default_timeout(TIMEOUT_MS)
    sign_in(page, server.base, KEEPER)
    auth = {"Authorization": f"Bearer {token_on(page)}"}
    page.evaluate("window.notReloaded = true")

    # The bastion's host key, to pin in ~/.ssh/known_hosts.
    published = requests.get(f"{server.base}/v1/gpus").json()["ssh"]
    assert page.text_content("#known-hosts") == published["known_hosts"]
    assert page.text_content("#host-key-fingerprint") == published["host_key_fingerprint"]
    assert published["known_hosts"].startswith(f"[127.0.0.1]:{published['ssh_port']} ssh-ed25519 ")

    # Rent with the SSH field left empty: the server mints a pair, the page shows its private half.
    form = "#rent-form"
    page.select_option(f"{form} select[name=gpu_model]", "cpu")
    for field, value in {"name": "door", "cpu": "1", "memory": "1Gi", "ephemeral_storage_gib": "2"}.items():
        page.fill(f"{form} input[name={field}]", value)
    assert page.input_value(f"{form} textarea[name=ssh_pubkey]") == ""
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/gpus")) as sent:
        page.click("#rent")
    assert "ssh_pubkey" not in sent.value.request.post_data_json
    rented = sent.value.json()
    gpu_id, first_private = rented["gpu_id"], rented["ssh_access"]["private_key"]
    expect(page.locator("#rent-status")).to_contain_text("shown once")
    card = page.locator(f".rental[data-gpu='{gpu_id}']")
    expect(card.locator(".minted")).to_contain_text("not shown again")
    expect(card.locator(".minted")).to_contain_text("chmod 600")
    first, shown = download_key(page, gpu_id, folder)
    assert shown == first_private

    # The ssh line and the key's fingerprint, once it runs.
    page.wait_for_selector(f".rental[data-gpu='{gpu_id}'] .run-form", timeout=60_000)
    access = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()["ssh_access"]
    assert "private_key" not in access  # returned once, with the rent
    line = f"ssh -p {published['ssh_port']} kgpu@127.0.0.1"
    expect(card.locator(".ssh-line pre")).to_have_text(line)
    expect(card.locator(".fingerprint")).to_have_text(access["fingerprint"])
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    card.locator(".ssh-line button[data-copy]").click()
    expect(card.locator(".ssh-line button[data-copy]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == line
    assert logs_in(server, first, gpu_id)
    screenshot(page, "20-ssh-minted-at-rent")
    card.locator("button[data-forget]").click()
    expect(card.locator(".minted")).to_be_hidden()
    assert card.locator(".private-key").count() == 0

    # "Mint a new key" on the card: a new private key, shown once; it logs in and the old one no longer does.
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_response(lambda r: r.request.method == "PATCH") as patched:
        card.locator("button[data-mint]").click()
    assert patched.value.status == 200 and patched.value.request.post_data_json == {}
    expect(card.locator(".minted pre.private-key")).to_be_visible()
    second, second_private = download_key(page, gpu_id, folder)
    assert second_private != first_private
    fingerprint = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()["ssh_access"]["fingerprint"]
    assert fingerprint != access["fingerprint"]
    expect(card.locator(".fingerprint")).to_have_text(fingerprint)
    assert logs_in(server, second, gpu_id)
    assert not logs_in(server, first, gpu_id)
    screenshot(page, "21-ssh-minted-on-the-card")

    # Garbage pasted: the API's 400 message on the card, and nothing changes.
    garbage = "ssh-ed25519 not-a-key <img src=x onerror=alert(1)>"
    card.locator(".key-form textarea").fill(garbage)
    with page.expect_response(lambda r: r.request.method == "PATCH") as refused:
        card.locator(".key-form button[type=submit]").click()
    assert refused.value.status == 400 and refused.value.json()["error_code"] == "bad_ssh_key"
    expect(card.locator(".key-status.error")).to_contain_text(refused.value.json()["message"])
    assert card.locator(".key-status img").count() == 0
    assert requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()["ssh_access"]["fingerprint"] == fingerprint
    expect(card.locator(".fingerprint")).to_have_text(fingerprint)
    assert card.locator(".key-form textarea").input_value() == garbage  # still there to fix
    assert logs_in(server, second, gpu_id)

    # Another account's key: 409, shown on the card; nothing changes either.
    stranger = requests.post(f"{server.base}/v1/admin/users", json={"email": "mallory@elsewhere.example"},
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["token"]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "theirs")], check=True)
    theirs = (folder / "theirs.pub").read_text().strip()
    taken = requests.post(f"{server.base}/v1/gpus", json={"name": "theirs", "cpu": "1", "memory": "1Gi",
                                                          "ssh_pubkey": theirs},
                          headers={"Authorization": f"Bearer {stranger}"})
    assert taken.status_code == 201, taken.text
    card.locator(".key-form textarea").fill(theirs)
    card.locator(".key-form button[type=submit]").click()
    expect(card.locator(".key-status.error")).to_contain_text("another account's rental pins this SSH key")
    expect(card.locator(".fingerprint")).to_have_text(fingerprint)
    assert logs_in(server, second, gpu_id)
    requests.delete(f"{server.base}/v1/gpus/{taken.json()['gpu_id']}", headers={"Authorization": f"Bearer {stranger}"})

    # A public key of one's own, pasted and pinned: it logs in, the minted one no longer does.
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ken@laptop", "-f", str(folder / "mine")],
                   check=True)
    mine = (folder / "mine.pub").read_text()
    card.locator(".key-form textarea").fill(mine)
    with page.expect_response(lambda r: r.request.method == "PATCH") as pinned:
        card.locator(".key-form button[type=submit]").click()
    assert pinned.value.status == 200 and pinned.value.request.post_data_json == {"ssh_pubkey": mine.strip()}
    assert "private_key" not in pinned.value.json()["ssh_access"]
    expect(card.locator(".fingerprint")).to_have_text(pinned.value.json()["ssh_access"]["fingerprint"])
    expect(card.locator(".key-status")).to_have_text("")
    assert card.locator(".key-form textarea").input_value() == ""
    assert card.locator(".minted").is_hidden()
    assert logs_in(server, folder / "mine", gpu_id)
    assert not logs_in(server, second, gpu_id)
    screenshot(page, "22-ssh-pinned")

    # The private keys were in the page's memory alone: not in its storage, its URL or a log.
    kept = page.evaluate("JSON.stringify([localStorage, sessionStorage, location.href, document.cookie])")
    body = first_private.splitlines()[1]
    assert body not in kept and body not in page.content()
    assert not any(private.splitlines()[1] in caplog.text for private in (first_private, second_private))
    assert page.evaluate("window.notReloaded")
    page.reload()
    page.wait_for_selector(f".rental[data-gpu='{gpu_id}'] .fingerprint")
    assert page.locator(".private-key").count() == 0

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f".rental[data-gpu='{gpu_id}'] button[data-return]")
    page.wait_for_selector("#rentals:has-text('No rentals')")
    assert not logs_in(server, folder / "mine", gpu_id)


def test_a_pasted_key_at_rent_is_pinned_and_no_private_key_is_shown(server, new_page, tmp_path):
    new_page.allow("status of 400")  # the refused rent, which the page then explains
    folder = passable(tmp_path)
    page = new_page()
    page.set_default_timeout(TIMEOUT_MS)
    sign_in(page, server.base, PASTER)
    auth = {"Authorization": f"Bearer {token_on(page)}"}
    form = "#rent-form"
    page.wait_for_selector(f"{form} select[name=gpu_model] option[value=cpu]", state="attached")
    page.select_option(f"{form} select[name=gpu_model]", "cpu")
    for field, value in {"name": "pasted", "cpu": "1", "memory": "1Gi", "ephemeral_storage_gib": "2"}.items():
        page.fill(f"{form} input[name={field}]", value)

    page.fill(f"{form} textarea[name=ssh_pubkey]", "ssh-rsa AAAA")
    page.click("#rent")
    expect(page.locator("#rent-status.error")).to_contain_text("could not rent: ssh_pubkey")
    assert requests.get(f"{server.base}/v1/gpus", headers=auth).json()["my_gpus"] == []

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "mine")], check=True)
    page.fill(f"{form} textarea[name=ssh_pubkey]", (folder / "mine.pub").read_text())
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/v1/gpus")) as sent:
        page.click("#rent")
    rented = sent.value.json()
    assert "private_key" not in rented["ssh_access"]
    gpu_id = rented["gpu_id"]
    card = page.locator(f".rental[data-gpu='{gpu_id}']")
    expect(card.locator(".fingerprint")).to_have_text(rented["ssh_access"]["fingerprint"])
    expect(page.locator("#rent-status")).to_have_text(f"rented {gpu_id}")
    assert card.locator(".minted").is_hidden()
    page.wait_for_selector(f".rental[data-gpu='{gpu_id}'] .run-form", timeout=60_000)
    assert logs_in(server, folder / "mine", gpu_id)
    page.once("dialog", lambda dialog: dialog.accept())
    card.locator("button[data-return]").click()
    page.wait_for_selector("#rentals:has-text('No rentals')")
