"""``kgpu login`` / ``kgpu logout``: keep the server's base URL and your token in the config file."""

from __future__ import annotations

import getpass
import os
import sys

from client import config
from client.api import Api
from client.browser_login import token_from_browser
from client.errors import UsageError
from client.output import emit_json


BROWSER_WAIT_S = 300.0


def login(base_url: str | None, as_json: bool, browser: bool = False, open_browser: bool = True) -> int:
    """The token comes from ``KGPU_API_TOKEN``, standard input or (``browser``) the dashboard,
    never from the command line."""
    base = base_url or os.environ.get("KGPU_API_BASE") or _ask("kgpu server (base URL, e.g. https://api.kgpu.net): ")
    try:
        base = config.normalise_base(base)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if browser:
        token = token_from_browser(base, open_browser, BROWSER_WAIT_S)
        if not token:
            raise UsageError(f"no token came from the browser within {BROWSER_WAIT_S:.0f} s")
    else:
        token = os.environ.get("KGPU_API_TOKEN") or _read_token()
    if not token:
        raise UsageError("no token: set KGPU_API_TOKEN or give it on standard input")
    candidate = config.Login(base, token)
    me = Api(candidate).call("GET", "/v1/me")
    path = config.save(candidate)
    who = (me.get("user") or {}).get("email") or me.get("kind", "?")
    if as_json:
        emit_json({"base_url": base, "config": str(path), "me": me})
    else:
        print(f"logged in to {base} as {who} ({me.get('status', '')}); saved in {path}")
    return 0


def logout(as_json: bool) -> int:
    path = config.config_path()
    existed = path.is_file()
    path.unlink(missing_ok=True)
    if as_json:
        emit_json({"config": str(path), "removed": existed})
    else:
        print(f"removed {path}" if existed else f"not logged in ({path} does not exist)")
    return 0


def _ask(prompt: str) -> str:
    if not sys.stdin.isatty():
        raise UsageError("give the server with --base-url (or KGPU_API_BASE)")
    return input(prompt)


def _read_token() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("token (kgpu_…, not echoed): ").strip()
    return sys.stdin.readline().strip()
