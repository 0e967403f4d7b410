"""``kgpu login --browser``: the token comes back from the dashboard to this computer.

The command listens on a free loopback port and opens ``{base}/view/cli?port=P&state=S`` in the
browser; once the person is signed in there and confirms, the page posts the token (and the
random ``state``) to ``http://127.0.0.1:P/callback`` — in a form body, never in a URL. Only a
post carrying this run's state is taken; anything else is refused and the wait goes on.
"""

from __future__ import annotations

import hmac
import http.server
import secrets
import sys
import threading
import urllib.parse
import webbrowser

MAX_FORM_BYTES = 4096
DONE_PAGE = (
    b"<!doctype html><meta charset=utf-8><title>kgpu</title>"
    b"<p style='font-family:sans-serif'>The kgpu command has your token. You can close this tab.</p>"
)


class _Handoff(http.server.BaseHTTPRequestHandler):
    server: "_Listener"

    def do_POST(self) -> None:  # noqa: N802 - the http.server interface
        length = self.headers.get("Content-Length", "")
        if self.path != "/callback" or not length.isdigit() or int(length) > MAX_FORM_BYTES:
            self._answer(400, b"not a kgpu sign-in")
            return
        fields = urllib.parse.parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace"))
        state = (fields.get("state") or [""])[0]
        token = (fields.get("token") or [""])[0]
        if not hmac.compare_digest(state.encode(), self.server.state.encode()) or not token:
            self._answer(400, b"this sign-in was not started by this kgpu login")
            return
        self.server.token = token
        self._answer(200, DONE_PAGE, "text/html; charset=utf-8")
        self.server.received.set()

    def do_GET(self) -> None:  # noqa: N802
        self._answer(404, b"kgpu login waits for its sign-in page")

    def _answer(self, status: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:  # the request line is nobody's business
        pass


class _Listener(http.server.HTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handoff)
        self.state = secrets.token_urlsafe(24)
        self.token: str | None = None
        self.received = threading.Event()


def token_from_browser(base: str, open_browser: bool, timeout_s: float) -> str | None:
    """The token the dashboard hands back, or None when none came within ``timeout_s``."""
    listener = _Listener()
    port = listener.server_address[1]
    url = f"{base}/view/cli?{urllib.parse.urlencode({'port': port, 'state': listener.state})}"
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
    return listener.token
