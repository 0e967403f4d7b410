"""What this process served, counted in plain ints on the event loop: requests, their latency
and bytes per route family, SSH logins (and the store's failures, which drive/store counts). ``GET /metrics`` (gateway/metrics.py)
reads the counts at scrape time.

Counting costs a few dict and list updates per request, no lock and no call into a metrics
library (the download redirect, the hottest request, must stay cheap: issue 23). Labels come
from a fixed set: the route family (the first segment of the path, never the path itself), the
status the server chose, never anything of the request's own (no path, no token, no query).

Several processes (``kgpu serve --workers N``) each count their own: each writes its totals to
``DIR/PID.json`` every second (:class:`Snapshots`), and a scrape answered by any of them adds
the others' files to its own live counts. Counts of a process that has ended stay in its file,
so the totals only grow while the server runs; ``kgpu serve`` clears the folder when it starts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from bisect import bisect_left
from pathlib import Path

from drive.store import StoreUnavailable

log = logging.getLogger("kgpu.metrics")

# Upper bounds (seconds) of the latency histogram's buckets; one more bucket is +Inf.
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_V1_FAMILIES = {
    b"files": "files",
    b"shared": "shared",
    b"dav": "dav",
    b"gpus": "gpus",
    b"gpu-models": "gpus",
    b"balance": "gpus",
    b"runs": "runs",
    b"objects": "objects",
    b"me": "me",
    b"admin": "admin",
}
_TOP_FAMILIES = {
    b"": "web",
    b"view": "web",
    b"healthz": "health",
    b"metrics": "metrics",
    b"docs": "docs",
    b"redoc": "docs",
    b"openapi.json": "docs",
}
FAMILIES = frozenset(_V1_FAMILIES.values()) | frozenset(_TOP_FAMILIES.values()) | {"other"}


def family_of(raw_path: bytes) -> str:
    """The route family of a raw request path (query string removed): one of :data:`FAMILIES`."""
    if raw_path.startswith(b"/v1/"):
        return _V1_FAMILIES.get(raw_path[4:].split(b"/", 1)[0], "other")
    return _TOP_FAMILIES.get(raw_path[1:].split(b"/", 1)[0], "other")


class Traffic:
    """This process's counts. Written by the event loop's thread alone; read by copying each
    dict, which the GIL makes atomic."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}  # (family, status) -> requests answered
        self.latency_buckets: dict[str, list[int]] = {}  # family -> requests per bucket (not cumulative)
        self.latency_seconds: dict[str, float] = {}  # family -> total seconds
        self.received_bytes: dict[str, int] = {}  # family -> request body bytes
        self.sent_bytes: dict[str, int] = {}  # family -> response body bytes
        self.ssh_logins: dict[str, int] = {}  # accepted | refused -> logins

    def request(self, family: str, status: int, seconds: float, received: int = 0, sent: int = 0) -> None:
        """One answered request. ``received``/``sent``: the bytes of its request and response bodies."""
        key = (family, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        buckets = self.latency_buckets.get(family)
        if buckets is None:
            buckets = self.latency_buckets[family] = [0] * (len(LATENCY_BOUNDS) + 1)
        buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_seconds[family] = self.latency_seconds.get(family, 0.0) + seconds
        if received:
            self.received_bytes[family] = self.received_bytes.get(family, 0) + received
        if sent:
            self.sent_bytes[family] = self.sent_bytes.get(family, 0) + sent

    def ssh_login(self, accepted: bool) -> None:
        outcome = "accepted" if accepted else "refused"
        self.ssh_logins[outcome] = self.ssh_logins.get(outcome, 0) + 1

    def totals(self) -> dict:
        """The counts as plain JSON data (what :class:`Snapshots` writes and :func:`add` sums)."""
        return {
            "requests": [[family, status, n] for (family, status), n in dict(self.requests).items()],
            "latency_buckets": {family: list(b) for family, b in dict(self.latency_buckets).items()},
            "latency_seconds": dict(self.latency_seconds),
            "received_bytes": dict(self.received_bytes),
            "sent_bytes": dict(self.sent_bytes),
            "ssh_logins": dict(self.ssh_logins),
            "store_errors": StoreUnavailable.raised,
        }


def empty_totals() -> dict:
    return {
        "requests": [], "latency_buckets": {}, "latency_seconds": {}, "received_bytes": {}, "sent_bytes": {},
        "ssh_logins": {}, "store_errors": 0,
    }


def add(total: dict, more: dict) -> None:
    """Add the totals ``more`` (one process's) into ``total``."""
    requests = {(f, s): n for f, s, n in total["requests"]}
    for family, status, n in more.get("requests", ()):
        requests[(family, status)] = requests.get((family, status), 0) + n
    total["requests"] = [[f, s, n] for (f, s), n in requests.items()]
    for family, buckets in more.get("latency_buckets", {}).items():
        mine = total["latency_buckets"].setdefault(family, [0] * (len(LATENCY_BOUNDS) + 1))
        for i, n in enumerate(buckets[: len(mine)]):
            mine[i] += n
    for name in ("latency_seconds", "received_bytes", "sent_bytes", "ssh_logins"):
        for label, n in more.get(name, {}).items():
            total[name][label] = total[name].get(label, 0) + n
    total["store_errors"] += more.get("store_errors", 0)


# The counts of this process (one event loop, one set of counts, whatever apps it serves).
TRAFFIC = Traffic()


class Snapshots:
    """Each process's totals in ``folder/PID.json``, written every ``interval`` seconds by a thread."""

    def __init__(self, folder: Path, traffic: Traffic = TRAFFIC, interval: float = 1.0):
        self.folder = folder
        self._traffic = traffic
        self._interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._written: dict | None = None

    def start(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="kgpu-metrics-snapshots", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.write()
        self.write()

    def write(self) -> None:
        totals = self._traffic.totals()
        if totals == self._written:
            return
        path = self.folder / f"{os.getpid()}.json"
        part = path.with_suffix(".part")
        try:
            part.write_text(json.dumps(totals))
            os.replace(part, path)
        except OSError:
            log.warning("could not write this process's metrics to %s", path, exc_info=True)
            return
        self._written = totals

    def others(self) -> list[dict]:
        """The latest totals of every other process that wrote here."""
        mine = f"{os.getpid()}.json"
        found = []
        try:
            paths = [p for p in self.folder.glob("*.json") if p.name != mine]
        except OSError:
            return found
        for path in paths:
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced, or gone: its next write is read next time
        return found


def clear(folder: Path) -> None:
    """Forget the counts of processes of an earlier run (``kgpu serve`` starting)."""
    for path in folder.glob("*.json"):
        path.unlink(missing_ok=True)
