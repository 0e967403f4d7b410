"""What the client prints: JSON for scripts and agents (``--json``), text and progress for people."""

from __future__ import annotations

import json
import sys
import time


def emit_json(data) -> None:
    print(json.dumps(data, indent=None, sort_keys=False))


def error(message: str, *, as_json: bool, error_code: str = "error") -> None:
    """An error on stderr: ``kgpu: message``, or the envelope's shape with ``--json``."""
    if as_json:
        print(json.dumps({"error_code": error_code, "message": message}), file=sys.stderr)
    else:
        print(f"kgpu: {message}", file=sys.stderr)


def notice(message: str) -> None:
    """A line on stderr for the person at the terminal: what the command is waiting for."""
    print(f"kgpu: {message}", file=sys.stderr, flush=True)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)).rstrip()
        for row in rows
    )


class ProgressBar:
    """One line on stderr redrawn from rclone's stats; silent when stderr is not a terminal."""

    WIDTH = 30

    def __init__(self, label: str, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self.drawn = False

    def update(self, stats: dict) -> None:
        if not self.enabled:
            return
        done, total = stats.get("bytes", 0), stats.get("totalBytes", 0)
        fraction = done / total if total else 0.0
        filled = int(self.WIDTH * fraction)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        eta = stats.get("eta")
        files = f"{stats.get('transfers', 0)}/{stats.get('totalTransfers', 0)} files"
        line = (f"\r{self.label} [{bar}] {fraction * 100:5.1f}% {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(stats.get('speed', 0))}/s {files}" + (f" ETA {eta:.0f}s" if eta else ""))
        sys.stderr.write(line.ljust(100)[:160])
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
