"""The dashboard in a real browser: headless Debian chromium driven by Playwright, signing in at a
real OIDC provider (tests/oidc). A new researcher goes from never signed in to an uploaded file
and a finished run with only the browser and the export line; an unlisted email waits until an
admin approves it in the admin page. A console error or an uncaught exception on any page fails
the test that opened it. Screenshots of each page go to $KGPU_SCREENSHOTS if set."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import pytest
import requests
from playwright import sync_api  # in the test extras; the browser is Debian's chromium
from playwright.sync_api import expect

from tests.conftest import require_system_part
from tests.oidc_support import signin_server, signing_keys

CHROMIUM = "/usr/bin/chromium"
RESEARCHER = "ada@lab.example"
ADMIN = "boss@lab.example"
STRANGER = "stranger@elsewhere.example"
# Researchers of one test each: their rentals and charges are theirs alone.
WALKER, STARTER, CHOOSER = "grace@lab.example", "linus@lab.example", "edsger@lab.example"
EXPORT = re.compile(r"export KGPU_API_BASE=(\S+)\s+export KGPU_API_TOKEN=(kgpu_[0-9a-f]{48})")
TIMEOUT_MS = 60_000  # a pod's start on a busy machine; every wait below ends as soon as the page shows it


@pytest.fixture(scope="module")
def server(tmp_path_factory, rclone_target):
    with signin_server(
        tmp_path_factory.mktemp("browser"), rclone_target, signing_keys(),
        allowed_emails=",".join((RESEARCHER, WALKER, STARTER, CHOOSER)), admin_emails=ADMIN,
    ) as (running, _):
        yield running


@pytest.fixture(scope="module")
def browser():
    require_system_part(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} (tests/browser/setup.sh: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
        yield launched
        launched.close()


def screenshot(page, name: str) -> None:
    folder = os.environ.get("KGPU_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=True)


class Pages:
    """Opens pages, each in a browser context of its own, and watches them: any console error or
    uncaught exception on one fails the test at teardown (a pattern attribute the browser cannot
    compile, a script that throws), but for the console errors the test said it provokes."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.errors: list[str] = []
        self.allowed: list[str] = []

    def __call__(self):
        context = self.browser.new_context()
        self.contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.on("console", lambda message: self._console(page, message))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught on {page.url}: {error}"))
        return page

    def allow(self, text: str) -> None:
        """Console errors holding ``text`` are expected (Chromium logs each refused request)."""
        self.allowed.append(text)

    def _console(self, page, message) -> None:
        if message.type == "error" and not any(text in message.text for text in self.allowed):
            self.errors.append(f"console error on {page.url}: {message.text} ({message.location.get('url')})")

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def new_page(browser):
    pages = Pages(browser)
    yield pages
    pages.close()
    assert not pages.errors, "\n".join(pages.errors)


def sign_in(page, base: str, email: str, shot: str | None = None) -> None:
    page.goto(f"{base}/view")
    if shot:
        screenshot(page, shot)
    page.click("#signin")
    page.fill("input[name=login]", email)
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/view")


def token_on(page) -> str:
    """The token of the dashboard on ``page``: a reissued one where it was shown elsewhere first."""
    if page.query_selector("#export-line") is None:
        page.click("#reissue")
    page.wait_for_selector("#export-line")
    return EXPORT.search(page.text_content("#export-line")).group(2)


def test_a_new_researcher_signs_in_uploads_runs_and_signs_out(server, new_page, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # every record of the server and the OIDC client, to look for the token
    base = server.base
    page = new_page()
    sign_in(page, base, RESEARCHER, shot="01-sign-in")

    # The export line, pasted into a shell: here its token used with requests.
    export = page.text_content("#export-line")
    api_base, token = EXPORT.search(export).groups()
    assert api_base == base
    auth = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{api_base}/v1/me", headers=auth).json()["user"]["email"] == RESEARCHER
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.click("#copy-export")
    page.wait_for_selector("#copy-export:text-is('Copied')")
    assert page.evaluate("navigator.clipboard.readText()") == export

    # An upload through the page, with its progress bar.
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(3 << 20))
    page.set_input_files("#upload-input", str(data))
    page.wait_for_selector(".upload[data-done]")
    assert page.get_attribute(".upload", "data-done") == "1"
    assert page.eval_on_selector(".upload progress", "bar => bar.value") == 100
    page.wait_for_selector("#files a[data-download='weights.bin']")
    listed = requests.get(f"{api_base}/v1/files", headers=auth).json()
    assert [(f["path"], f["size"]) for f in listed["files"]] == [("weights.bin", 3 << 20)]
    assert "3.0 MiB" in page.text_content("#quota-text")
    screenshot(page, "02-dashboard-uploaded")
    with page.expect_download() as download:  # through a presigned URL the API hands the page
        page.click("#files a[data-download='weights.bin']")
    assert Path(download.value.path()).read_bytes() == data.read_bytes()

    # A rental on the local backend (a CPU class), a run in it and its live output.
    page.fill("#rent-form input[name=name]", "first")
    page.click("#rent")
    page.wait_for_selector(".rental .run-form input[name=command]")
    page.fill(".rental .run-form input[name=command]", "echo hello-from-$((6 * 7)); ls -l /files 2>/dev/null | head -1")
    page.click(".rental .run-form button[type=submit]")
    page.wait_for_selector(".run pre.output:has-text('[exit 0]')")
    assert "hello-from-42" in page.text_content(".run pre.output")
    gpus = requests.get(f"{api_base}/v1/gpus", headers=auth).json()["my_gpus"]
    assert [(g["name"], g["phase"]) for g in gpus] == [("first", "Running")]
    assert page.text_content(".rental .phase") == "Running" and gpus[0]["node"] in page.text_content(".rental .head")
    screenshot(page, "03-dashboard-run")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(".rental button[data-return]")
    page.wait_for_selector("#rentals:has-text('No rentals')")
    page.reload()  # what the rental was charged
    charged = requests.get(f"{api_base}/v1/gpus/{gpus[0]['gpu_id']}", headers=auth).json()["credits_charged"]
    assert charged > 0
    assert "first" in page.text_content("#charges tbody tr td:first-child")
    assert page.text_content("#charges tbody tr td:last-child") == str(charged)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#files button[data-delete='weights.bin']")
    page.wait_for_selector("#files:has-text('This folder is empty')")
    assert requests.get(f"{api_base}/v1/files", headers=auth).json()["files"] == []

    # Signing out revokes the token at once.
    page.click("#signout")
    page.wait_for_selector("#signin")
    screenshot(page, "04-signed-out")
    assert requests.get(f"{api_base}/v1/me", headers=auth).status_code == 401
    assert "kgpu_" not in page.content()
    assert token not in caplog.text and server.settings.oidc_client_secret.get_secret_value() not in caplog.text


def test_an_unlisted_email_waits_for_an_admin_then_gets_a_token(server, new_page):
    base = server.base
    stranger = new_page()
    sign_in(stranger, base, STRANGER)
    stranger.wait_for_selector("#pending")
    stranger.wait_for_selector("#cluster table")  # a pending account sees the cluster's state
    assert "kgpu_" not in stranger.content() and stranger.query_selector("#export-line") is None
    screenshot(stranger, "05-pending")

    admin = new_page()
    sign_in(admin, base, ADMIN)
    admin.click("nav a[href='/view/admin']")
    row = f"#users tr[data-email='{STRANGER}']"
    assert admin.text_content(f"{row} .badge") == "pending"
    screenshot(admin, "06-admin-before")
    admin.click(f"{row} button.approve")
    admin.wait_for_selector(f"{row} .badge.approved")
    admin.fill(f"{row} input[name=credits]", "2500")
    admin.click(f"{row} button.grant")
    admin.fill("input[name=slug]", "-vision-")  # the browser checks the slug itself
    assert admin.eval_on_selector("input[name=slug]", "input => input.validity.patternMismatch")
    admin.fill("input[name=slug]", "vision-lab")
    assert admin.eval_on_selector("input[name=slug]", "input => input.validity.valid")
    admin.fill("form.row input[name=name]", "Vision lab")
    admin.click("#create-org")
    admin.fill(".org[data-slug='vision-lab'] input[name=user]", STRANGER)
    admin.select_option(".org[data-slug='vision-lab'] select[name=role]", "uploader")
    admin.click(".org[data-slug='vision-lab'] button.add-member")
    admin.wait_for_selector(f".org[data-slug='vision-lab'] td:has-text('{STRANGER}')")
    screenshot(admin, "07-admin-after")

    # Approved after signing in: a token comes with the next sign-in, not to the old session.
    stranger.reload()
    assert "kgpu_" not in stranger.content()
    stranger.click("#signin-again")
    stranger.wait_for_selector("#signin")
    stranger.click("#signin")  # the provider still knows this browser: straight back
    stranger.wait_for_selector("#export-line")
    _, token = EXPORT.search(stranger.text_content("#export-line")).groups()
    me = requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert me["status"] == "approved" and me["user"]["credits"] == server.settings.starting_credits + 2500
    put = requests.put(f"{base}/v1/shared/vision-lab/papers/notes.txt", data=b"shared notes",
                       headers={"Authorization": f"Bearer {token}"})
    assert put.status_code in (200, 201), put.text
    stranger.click("#shared a[data-org='vision-lab']")
    stranger.click("#shared-files a[data-folder='papers/']")
    stranger.wait_for_selector("#shared-files a[data-file='papers/notes.txt']")
    assert "12 B" in stranger.text_content("#shared-files")
    screenshot(stranger, "08-approved-dashboard")


@contextlib.contextmanager
def _browser_login(base: str, home: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`kgpu login --browser --no-open` started (and killed on the way out if it still runs); the
    address of the page it asks to open."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KGPU_")}, "XDG_CONFIG_HOME": str(home)}
    command = subprocess.Popen(
        [sys.executable, "-m", "client", "login", "--browser", "--no-open", "--base-url", base],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = command.stderr.readline()
        found = re.search(r"(http://\S+/view/cli\?port=(\d+)&state=\S+)", line)
        assert found, line
        yield command, found.group(1)
    finally:
        if command.poll() is None:
            command.kill()


def _allow(page, command: subprocess.Popen) -> str:
    """Confirm on the handoff page; what the command printed once it has saved the token."""
    page.click("#allow")
    page.wait_for_selector("text=The kgpu command has your token")
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0, err
    return out


def test_kgpu_login_through_the_browser(server, new_page, tmp_path):
    """`kgpu login --browser`: the person signs in on the page it opens and confirms; the token
    reaches the command in a form post to its loopback listener, never in a URL."""
    base = server.base
    with _browser_login(base, tmp_path) as (command, url):
        port = int(re.search(r"port=(\d+)", url).group(1))
        # A post without this login's state is refused, and the command keeps waiting.
        forged = requests.post(f"http://127.0.0.1:{port}/callback", data={"state": "x" * 32, "token": "kgpu_forged"})
        assert forged.status_code == 400 and command.poll() is None
        page = new_page()
        seen = []
        page.on("request", lambda request: seen.append(request.url))
        page.goto(url)  # not signed in: the provider first, then back to this page
        page.fill("input[name=login]", RESEARCHER)
        page.fill("input[name=password]", "any")
        page.click("button[type=submit]")
        page.wait_for_selector("#allow")
        screenshot(page, "09-kgpu-login")
        out = _allow(page, command)
    assert RESEARCHER in out
    saved = json.loads((tmp_path / "kgpu" / "config.json").read_text())
    assert (tmp_path / "kgpu" / "config.json").stat().st_mode & 0o777 == 0o600
    me = requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {saved['token']}"})
    assert me.status_code == 200 and me.json()["user"]["email"] == RESEARCHER
    assert not any(saved["token"] in address for address in seen)  # in a form body only


def test_the_handoff_page_refuses_odd_addresses_and_reissues_when_it_cannot_show_the_token(server, new_page, tmp_path):
    base = server.base
    for query in ("port=80&state=" + "a" * 20, "port=5000&state=short", "port=5000&state=" + "a" * 20 + "&x=1",
                  "state=" + "a" * 20 + "&port=5000", "port=99999&state=" + "a" * 20):
        reply = requests.get(f"{base}/view/cli?{query}", headers={"Accept": "application/json"})
        assert reply.status_code == 400, (query, reply.status_code)
    # A second browser of a person whose token was issued elsewhere cannot show it: it offers a new one.
    first = new_page()
    sign_in(first, base, RESEARCHER)
    with _browser_login(base, tmp_path) as (command, url):
        second = new_page()
        sign_in(second, base, RESEARCHER)
        second.goto(url)
        second.click("#reissue-for-cli")
        _allow(second, command)
    token = json.loads((tmp_path / "kgpu" / "config.json").read_text())["token"]
    assert requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_hostile_file_names_show_as_text_on_the_dashboard(server, new_page):
    """A name that is markup stays text: no element of it is made, no script of it runs."""
    page = new_page()
    sign_in(page, server.base, RESEARCHER)
    token = token_on(page)
    hostile = '<img src=x onerror="window.pwned=1">"\'&.txt'
    folder = "<i title=x>italic"
    for name in (hostile, f"{folder}/inner.txt"):
        reply = requests.put(f"{server.base}/v1/files/{requests.utils.quote(name)}", data=b"x",
                             headers={"Authorization": f"Bearer {token}"})
        assert reply.status_code in (200, 201), reply.text
    page.reload()
    page.locator("#files").get_by_text("onerror", exact=False).first.wait_for()
    assert page.query_selector("#files img") is None and page.query_selector("#files i") is None
    assert hostile in page.text_content("#files") and f"{folder}/" in page.text_content("#files")
    assert page.evaluate("window.pwned === undefined")


def test_a_researcher_rents_runs_and_returns_on_the_page_alone(server, new_page):
    """What a researcher does, on the page alone: rent with the form's fields, wait until the
    rental is usable without reloading, run a command and read its output as it comes, return
    the rental and see its charge on the credits card."""
    page = new_page()
    page.set_default_timeout(20_000)
    sign_in(page, server.base, WALKER)
    auth = {"Authorization": f"Bearer {token_on(page)}"}
    page.evaluate("window.notReloaded = true")  # gone if the page is loaded again
    assert page.text_content("#charges") == "Nothing charged yet."

    form = "#rent-form"
    page.select_option(f"{form} select[name=gpu_model]", "cpu")  # waits for the menu from the API
    assert page.input_value(f"{form} input[name=gpu_count]") == "0"  # a CPU-only model: no GPU
    fields = {"name": "walk", "gpu_count": "0", "image": "kgpu-test:latest", "cpu": "1", "memory": "2Gi",
              "ephemeral_storage_gib": "2", "duration_hours": "2"}
    for field, value in fields.items():
        page.fill(f"{form} input[name={field}]", value)
    page.fill(f"{form} textarea[name=env]", "WHERE=page")
    with page.expect_request(lambda request: request.method == "POST" and request.url.endswith("/v1/gpus")) as sent:
        page.click("#rent")
    assert sent.value.post_data_json == {
        "name": "walk", "gpu_model": "cpu", "gpu_count": 0, "image": "kgpu-test:latest", "cpu": "1", "memory": "2Gi",
        "ephemeral_storage_gib": 2, "duration_hours": 2, "env": {"WHERE": "page"}, "queue": False,
    }

    command = ".rental .run-form input[name=command]"
    page.wait_for_selector(command, timeout=30_000)  # ready, seen without a reload
    gpu_id = page.get_attribute(".rental", "data-gpu")
    rental = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()
    assert (rental["name"], rental["image"], rental["gpu_count"]) == ("walk", "kgpu-test:latest", 0)
    lasts = datetime.fromisoformat(rental["expires_at"]) - datetime.fromisoformat(rental["started_at"])
    assert rental["ready"] and lasts == timedelta(hours=2)
    page.fill(command, "echo hello-from-the-$WHERE; sleep 4; echo bye")
    page.click(".rental .run-form button[type=submit]")
    output = page.locator(".run pre.output")
    expect(output).to_contain_text("hello-from-the-page", timeout=15_000)
    assert "bye" not in output.text_content()  # shown while the run still sleeps
    expect(output).to_contain_text("bye\n[exit 0]", timeout=15_000)

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f".rental[data-gpu='{gpu_id}'] button[data-return]")
    page.wait_for_selector("#rentals:has-text('No rentals')")
    charged = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()["credits_charged"]
    credits = requests.get(f"{server.base}/v1/balance", headers=auth).json()
    balance, charges = credits["balance"], credits["charges"]
    assert charged > 0
    assert [(c["rental_id"], c["name"], c["credits"]) for c in charges] == [(gpu_id, "walk", charged)]
    charge = page.locator("#charges tbody tr", has_text=gpu_id)
    expect(charge.locator("td").first).to_contain_text("walk")
    expect(charge.locator("td").last).to_have_text(str(charged))
    expect(page.locator("#balance")).to_have_text(str(balance))
    assert page.evaluate("window.notReloaded")
    screenshot(page, "10-walk-returned")


MOUNTING = "kgpu-bootstrap is mounting /shared and /files"


def hold_back_readiness(page, answers: int) -> None:
    """The page's first ``answers`` lists of rentals that hold a Running one say it is not ready
    yet, as while kgpu-bootstrap mounts /shared and /files in a pod (the test server's pods have
    no mounts: they are ready at once); the later ones are the API's own."""
    held = []

    def answer(route) -> None:
        if route.request.method != "GET":
            route.continue_()
            return
        response = route.fetch()
        listed = response.json()
        running = [gpu for gpu in listed.get("my_gpus", []) if gpu["phase"] == "Running"]
        if running and len(held) < answers:
            held.append(route.request.url)
            for gpu in running:
                gpu.update(ready=False, pending_reason=MOUNTING)
        route.fulfill(response=response, json=listed)

    page.route(re.compile(r"/v1/gpus$"), answer)


def test_a_starting_rental_becomes_usable_and_shows_its_charge_without_a_reload(server, new_page):
    """A rental Running but not ready yet is looked at again until it is, and the credits card
    follows its charge; while it is live the page keeps looking, and what is being typed stays."""
    page = new_page()
    sign_in(page, server.base, STARTER)
    auth = {"Authorization": f"Bearer {token_on(page)}"}
    page.evaluate("window.notReloaded = true")
    hold_back_readiness(page, answers=2)
    page.fill("#rent-form input[name=name]", "starting")
    page.click("#rent")
    page.wait_for_selector(f".rental:has-text('{MOUNTING}')", timeout=15_000)
    page.wait_for_selector(".rental .run-form input[name=command]", timeout=15_000)
    gpu_id = page.get_attribute(".rental", "data-gpu")
    charged = requests.get(f"{server.base}/v1/gpus/{gpu_id}", headers=auth).json()["credits_charged"]
    assert charged > 0  # its first minute, charged as it started
    expect(page.locator("#charges tbody tr", has_text=gpu_id).locator("td").last).to_have_text(str(charged))
    expect(page.locator(".rental .charged")).to_have_text(str(charged))

    page.fill(".rental .run-form input[name=command]", "echo half-typed")
    with page.expect_response(lambda response: response.url.endswith("/v1/balance"), timeout=15_000):
        pass  # the next look at a live rental
    assert page.input_value(".rental .run-form input[name=command]") == "echo half-typed"
    assert page.evaluate("document.activeElement.name") == "command"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(".rental button[data-return]")
    page.wait_for_selector("#rentals:has-text('No rentals')")
    assert page.evaluate("window.notReloaded")


def test_the_rent_form_offers_the_apis_defaults_and_shows_its_refusals(server, new_page):
    new_page.allow("status of 422")  # each refused rent, which the page then explains
    page = new_page()
    page.set_default_timeout(15_000)
    sign_in(page, server.base, CHOOSER)
    auth = {"Authorization": f"Bearer {token_on(page)}"}
    form = "#rent-form"
    page.wait_for_selector(f"{form} select[name=gpu_model] option[value=cpu]", state="attached")
    shown = {field: page.input_value(f"{form} [name={field}]") for field in
             ("name", "gpu_count", "image", "cpu", "memory", "ephemeral_storage_gib", "duration_hours", "env")}
    assert shown == {"name": "work", "gpu_count": "0", "image": "", "cpu": "2", "memory": "16Gi",
                     "ephemeral_storage_gib": "100", "duration_hours": "12", "env": ""}
    assert page.get_attribute(f"{form} input[name=image]", "placeholder") == server.settings.default_image
    assert page.locator(f"#ssh-card, {form} [name=ssh_pubkey]").count() == 0  # no bastion here (KGPU_SSH_PORT=0)

    name = page.locator(f"{form} input[name=name]")
    name.fill("-work")  # the browser's own check, with a pattern it can compile
    assert name.evaluate("input => input.validity.patternMismatch")
    name.fill("work")
    assert name.evaluate("input => input.validity.valid")

    refusals = [
        ("input[name=memory]", "200Gi", "memory must be more than 0 and at most 128Gi"),
        ("input[name=cpu]", "32", "cpu must be more than 0 and at most 16 cores"),
        ("textarea[name=env]", "KGPU_API_TOKEN=mine", "env KGPU_API_TOKEN is set by kgpu and cannot be overridden"),
        ("textarea[name=env]", "WHERE", 'environment lines are NAME=VALUE, not "WHERE"'),  # the page's own
    ]
    for field, value, message in refusals:
        before = page.input_value(f"{form} {field}")
        page.fill(f"{form} {field}", value)
        page.click("#rent")
        expect(page.locator("#rent-status.error")).to_contain_text(message)
        page.fill(f"{form} {field}", before)
    assert requests.get(f"{server.base}/v1/gpus", headers=auth).json()["my_gpus"] == []
