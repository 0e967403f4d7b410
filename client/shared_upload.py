"""Uploads into a shared drive (``kgpu cp LOCAL kgpu:shared/ORG/…``), file by file over HTTP.

The WebDAV view of shared drives is read-only; their writers upload through
``/v1/shared/ORG/…`` (a PUT streamed through the gateway), several files at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client.api import Api
from client.locations import Remote


def plan(source: Path, destination: Remote, into_folder: bool) -> list[tuple[Path, str]]:
    """(local file, HTTP path) pairs: a folder's files keep their relative paths under the destination."""
    base = destination.shared_path.strip("/")
    org = destination.org

    def route(relative: str) -> str:
        return f"/v1/shared/{org}/" + "/".join(p for p in (base, relative) if p)

    if source.is_dir():
        return [(f, route(f.relative_to(source).as_posix())) for f in sorted(source.rglob("*")) if f.is_file()]
    return [(source, route(source.name) if into_folder else route(""))]


def upload(api: Api, files: list[tuple[Path, str]], transfers: int, on_stats: Callable[[dict], None]) -> dict:
    """Upload every file, ``transfers`` at a time; the first refusal stops the rest and is raised."""
    total = sum(f.stat().st_size for f, _ in files)
    started = time.monotonic()
    lock = threading.Lock()
    done = {"bytes": 0, "files": 0}

    def one(item: tuple[Path, str]) -> None:
        local, path = item
        api.put_file(path, local)
        with lock:
            done["bytes"] += local.stat().st_size
            done["files"] += 1
            elapsed = max(time.monotonic() - started, 1e-6)
            on_stats({"bytes": done["bytes"], "totalBytes": total, "transfers": done["files"],
                      "totalTransfers": len(files), "speed": done["bytes"] / elapsed})

    with ThreadPoolExecutor(max_workers=max(1, transfers)) as pool:
        for future in [pool.submit(one, item) for item in files]:
            future.result()
    return {**done, "seconds": round(time.monotonic() - started, 3)}
