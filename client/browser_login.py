"""``kgpu login --browser``: the dashboard signs this command in (RFC 8252, with PKCE: RFC 7636).

The command makes a random **verifier** in its own memory (never on a command line, never in a
file) and listens on a free loopback port; it opens
``{base}/view/cli?port=P&state=S&code_challenge=C&code_challenge_method=S256`` in the browser,
with ``C = BASE64URL(SHA-256(verifier))``. Every user of the machine can read that address (it is
on the browser's command line): it holds nothing worth a token. Once the person is signed in
there and confirms, the server sends the browser to ``http://127.0.0.1:P/callback?code=…&state=…``
with a **one-time code** (never the token); the command redeems it at the server with the
verifier (``POST {base}/view/cli/exchange``) and gets the token. A code is good once, for a
minute, and only with the verifier of the challenge it was made for.

What comes to the listener is refused, said on standard error, and the wait goes on, when

* it comes from another user of this computer (Linux: the connecting socket's owner, in
  ``/proc/net/tcp``, is neither this user nor root), whatever it carries;
* it carries a token instead of a code, or not this login's state;
* the server does not redeem its code for this verifier (a code minted for another login, a
  made-up one, one used or expired).

So a token another local user made for itself never lands in this user's config file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import struct
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import webbrowser

MAX_FORM_BYTES = 4096
CODE = re.compile(r"^[A-Za-z0-9_-]{43}$")
EXCHANGE_TIMEOUT_S = 30.0
# No favicon to ask for: this listener closes as soon as it has the token.
DONE_PAGE = (
    b"<!doctype html><meta charset=utf-8><title>kgpu</title><link rel=icon href='data:,'>"
    b"<p style='font-family:sans-serif'>The kgpu command has your token. You can close this tab.</p>"
)
_ESTABLISHED = "01"  # /proc/net/tcp's states: a connected socket, a listening one
_LISTEN = "0A"


def s256(verifier: str) -> str:
    """The S256 challenge of a PKCE verifier (RFC 7636 4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _address(field: str) -> tuple[bytes, int]:
    """An address of /proc/net/tcp{,6} ("0100007F:1F90"): its bytes in network order, its port.
    The kernel prints each 32-bit word of the address in this machine's byte order."""
    address, port = field.rsplit(":", 1)
    words = [int(address[i : i + 8], 16) for i in range(0, len(address), 8)]
    return b"".join(struct.pack("=I", word) for word in words), int(port, 16)


def _is_loopback_v4(raw: bytes) -> bool:
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:127.0.0.1
        raw = raw[12:]
    return raw == bytes((127, 0, 0, 1))


def _sockets() -> list[tuple[int, int, str, int]] | None:
    """(local port, remote port, state, owner uid) of every listening TCP socket and of every one
    between two 127.0.0.1 addresses, in this network namespace; None where the kernel does not
    tell (not Linux, no /proc)."""
    found = []
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                readable = True
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) < 8:
                        continue
                    (local, local_port), (remote, remote_port) = _address(fields[1]), _address(fields[2])
                    state = fields[3].upper()
                    if state == _LISTEN or (_is_loopback_v4(local) and _is_loopback_v4(remote)):
                        found.append((local_port, remote_port, state, int(fields[7])))
        except (OSError, ValueError, struct.error):
            continue
    return found if readable else None


def peer_uid(listening_port: int, peer_port: int) -> int | None:
    """The uid owning the connected socket at ``127.0.0.1:peer_port`` that talks to our
    ``127.0.0.1:listening_port``; None where this cannot be told (no /proc/net/tcp, or a table
    that does not even list our own listener); -1 when the table is real and lists no such
    connected socket (one closed already, whose owner the kernel no longer tells)."""
    sockets = _sockets()
    if sockets is None or not any(l == listening_port and s == _LISTEN for l, _, s, _ in sockets):
        return None
    for local, remote, state, uid in sockets:
        if local == peer_port and remote == listening_port and state == _ESTABLISHED:
            return uid
    return -1


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Handoff(http.server.BaseHTTPRequestHandler):
    server: "_Listener"
    timeout = 15  # a connection that says nothing does not hold the listener

    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        path, _, query = self.path.partition("?")
        if path != "/callback":
            self._answer(404, b"kgpu login waits for its sign-in page")
            return
        self._take(urllib.parse.parse_qs(query))

    def do_POST(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length", "")
        if self.path != "/callback" or not length.isdigit() or int(length) > MAX_FORM_BYTES:
            self._answer(400, b"not a kgpu sign-in")
            return
        self._take(urllib.parse.parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace")))

    def _take(self, fields: dict[str, list[str]]) -> None:
        try:
            token = self.server.take(self.client_address, fields)
        except _Refused as refused:  # said here too: someone may be trying to slip a token in
            print(f"kgpu login: refused what came to 127.0.0.1:{self.server.port}: {refused.message}",
                  file=sys.stderr, flush=True)
            self._answer(refused.status, refused.message.encode())
            return
        self._answer(200, DONE_PAGE, "text/html; charset=utf-8")
        self.server.done(token)

    def _answer(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:  # the request line (the code) is nobody's business
        pass


class _Listener(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, base: str):
        super().__init__(("127.0.0.1", 0), _Handoff)
        self.base = base
        self.state = secrets.token_urlsafe(24)
        self.verifier = secrets.token_urlsafe(64)  # 86 characters, in this process's memory only
        self.challenge = s256(self.verifier)
        self.token: str | None = None
        self.received = threading.Event()
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def take(self, client: tuple[str, int], fields: dict[str, list[str]]) -> str:
        """The token the server gives for what was sent, or _Refused (and the wait goes on)."""
        uid = peer_uid(self.port, client[1])
        if uid is not None and uid not in (os.geteuid(), 0):
            who = f"uid {uid}" if uid >= 0 else "a connection already closed"
            raise _Refused(403, f"this came from another user of this computer ({who}), not from your browser")
        state = (fields.get("state") or [""])[0]
        code = (fields.get("code") or [""])[0]
        if "token" in fields and not code:
            raise _Refused(400, "kgpu login takes a one-time code from its sign-in page, never a token")
        if not hmac.compare_digest(state.encode(), self.state.encode()):
            raise _Refused(400, "this sign-in was not started by this kgpu login")
        if not CODE.match(code):
            raise _Refused(400, "this is not a code of kgpu's sign-in page")
        with self._lock:  # one exchange at a time; after a token, nothing more
            if self.token is not None:
                raise _Refused(409, "this kgpu login is already signed in")
            token = self._exchange(code)
            self.token = token
            return token

    def _exchange(self, code: str) -> str:
        body = json.dumps({"code": code, "code_verifier": self.verifier}).encode()
        request = urllib.request.Request(
            f"{self.base}/view/cli/exchange", data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "kgpu-client/0.1"},
        )
        try:
            with urllib.request.urlopen(request, timeout=EXCHANGE_TIMEOUT_S) as reply:
                token = json.loads(reply.read()).get("token")
        except urllib.error.HTTPError as exc:
            try:
                said = json.loads(exc.read()).get("message") or exc.reason
            except (ValueError, AttributeError):
                said = exc.reason
            raise _Refused(400, f"the kgpu server did not take this code: {said}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _Refused(502, f"could not reach the kgpu server at {self.base}: {getattr(exc, 'reason', exc)}") from None
        if not isinstance(token, str) or not token:
            raise _Refused(502, "the kgpu server answered without a token")
        return token

    def done(self, token: str) -> None:
        self.received.set()


def token_from_browser(base: str, open_browser: bool, timeout_s: float) -> str | None:
    """The token the server gives this command once the person signs it in on the dashboard, or
    None when none came within ``timeout_s``."""
    listener = _Listener(base)
    query = urllib.parse.urlencode({
        "port": listener.port, "state": listener.state,
        "code_challenge": listener.challenge, "code_challenge_method": "S256",
    })
    url = f"{base}/view/cli?{query}"
    print(f"Sign in and confirm in your browser: {url}", file=sys.stderr, flush=True)
    if open_browser:
        webbrowser.open(url)
    serving = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    serving.start()
    try:
        listener.received.wait(timeout_s)
    finally:
        listener.shutdown()
        listener.server_close()
    return listener.token if listener.received.is_set() else None
