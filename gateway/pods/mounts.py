"""The gateway's view of the rclone mounts inside a pod (made by bootstrap/bin/*).

``kgpu-bootstrap`` writes ``/tmp/kgpu/mounts/status`` as ``key=value`` lines::

    shared.path=/shared
    shared.status=mounted        (or failed)
    shared.seconds=0.84
    shared.error=                (why it failed)
    files.…
    state=ready                  (last; "mounting" before)

The gateway reads it with ``READ_STATUS_SCRIPT``, which adds ``live=`` (the rclone mounts
alive now): a mount reported ``mounted`` that has gone since shows as ``lost``.

``kgpu-flush`` (run in the pod before it is destroyed) uploads what the ``/files`` mount
still holds and unmounts everything; the gateway runs the script's text with ``sh -c``,
so it works in any image, also where the user ran the helpers by hand.
"""

from __future__ import annotations

from bootstrap import script_path
from gateway.log_line import one_line
from gateway.pods import PodStatus

STATUS_PATH = "/tmp/kgpu/mounts/status"
# The status file, then the rclone mounts alive now (a mount can die after it was reported).
READ_STATUS_SCRIPT = """
head -c 16384 "$1" 2>/dev/null; echo
printf 'live='; awk '$3 ~ /^fuse[.]rclone/ { printf "%s,", $2 }' /proc/mounts 2>/dev/null; echo
exit 0
"""
FLUSH_SCRIPT = script_path("kgpu-flush").read_text()
BOOTSTRAP_NAME = "kgpu-bootstrap"
MAX_MOUNTS = 8
MAX_VALUE = 1000
MAX_FLUSH_REPORT = 4000
FLUSH_LOG_CHARS = 500  # of a report, in the log's one line: the rental keeps all of it (flush_error)


def flush_report_logged(report: str) -> str:
    """A flush report as the gateway's log quotes it: rclone's words about the tenant's files,
    names with newlines included, on one short line."""
    return one_line(report, FLUSH_LOG_CHARS)


def parse_status(text: str) -> tuple[bool, dict | None]:
    """(all mounts reported, {mount: {"path", "status", "seconds", "error"}}) from the status
    file's text (and the ``live=`` line, when there is one); (False, None) when the bootstrap
    has written nothing yet."""
    mounts: dict[str, dict] = {}
    state = None
    live = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "state":
            state = value.strip()
            continue
        if key == "live":
            live = {path for path in value.strip().split(",") if path}
            continue
        mount, _, field = key.partition(".")
        if not field or (mount not in mounts and len(mounts) >= MAX_MOUNTS):
            continue
        value = value[:MAX_VALUE]  # the pod writes this file: keep what reaches the database small
        entry = mounts.setdefault(mount, {"path": None, "status": None, "seconds": None, "error": None})
        if field == "seconds":
            try:
                entry["seconds"] = float(value)
            except ValueError:
                pass
        elif field in entry:
            entry[field] = value or None
    if state is None:
        return False, None
    if live is not None:
        for entry in mounts.values():
            if entry["status"] == "mounted" and entry["path"] not in live:
                entry["status"] = "lost"
                entry["error"] = f"{entry['path']} is no longer mounted (rclone exited; see /tmp/kgpu/mounts/*.log)"
    return state == "ready", mounts


def runs_bootstrap(entrypoint: list[str] | str | None) -> bool:
    """Whether an image's entrypoint is kgpu-bootstrap (then the pod mounts by itself)."""
    if not entrypoint:
        return False
    parts = entrypoint.split() if isinstance(entrypoint, str) else entrypoint
    return any(part.rsplit("/", 1)[-1] == BOOTSTRAP_NAME for part in parts)


def bootstrap_status(text: str, age_seconds: float, timeout_s: int) -> PodStatus:
    """A running pod's status from its bootstrap's report (``text``, with its ``live=`` line).
    Ready once the mounts are reported; a bootstrap silent for ``timeout_s`` must not hold the
    rental (and its billing) hostage: the pod is then ready, with the failure in ``mounts``."""
    ready, mounts = parse_status(text)
    if ready:
        return PodStatus("Running", True, mounts=mounts)
    if age_seconds > timeout_s:
        silent = {"path": None, "status": "failed", "seconds": None,
                  "error": f"kgpu-bootstrap reported nothing within {timeout_s} s"}
        return PodStatus("Running", True, mounts={**(mounts or {}), "bootstrap": silent})
    return PodStatus("Running", False, "kgpu-bootstrap is mounting /shared and /files", mounts=mounts)
