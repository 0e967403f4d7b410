"""The gateway serves the drive but runs none of its steps: the modules that answer drive
requests over HTTP parse, call the drive service (drive/service.py) and answer. They import
nothing of the store (``drive.store``), nor the database's usage book (``gateway.quota``), nor
of drive/usage.py anything but its exceptions (no reservation, no lease, no quota formula), and
they reach neither the store, the usage book nor a key hold themselves (``.store``, ``.usage``,
``.writing``); gateway/drive_http.py reads no setting either (the service is configured with
the drive's). Each probe is shown to catch what it looks for."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules that serve a drive over HTTP, and what each may not reach.
SERVING = {
    "gateway/drive_http.py": {"store", "usage", "writing", "settings"},
    "gateway/routes/files.py": {"store", "usage", "writing"},
    "gateway/routes/shared.py": {"store", "usage", "writing"},
    "gateway/dav_app.py": {"store", "writing"},  # it hands the usage book to wsgidav's dead properties
    "gateway/edge.py": {"store", "usage", "writing", "settings"},  # the download 302 before FastAPI
}
FORBIDDEN_MODULES = ("drive.store", "gateway.quota")
EXCEPTIONS_ONLY = ("drive.usage",)


def _is_exception(module: str, name: str) -> bool:
    found = getattr(importlib.import_module(module), name, None)
    return isinstance(found, type) and issubclass(found, BaseException)


def forbidden_imports(source: str) -> list[str]:
    """What ``source`` imports of the store, the usage book, or drive/usage.py beyond its exceptions."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in imported:
            whole = module if name is None else f"{module}.{name}"
            if any(whole == bad or whole.startswith(bad + ".") for bad in FORBIDDEN_MODULES) or whole in EXCEPTIONS_ONLY:
                found.append(whole)
            elif module in EXCEPTIONS_ONLY and not _is_exception(module, name):
                found.append(whole)
    return sorted(found)


def reaches(source: str, attributes: set[str]) -> list[str]:
    """``line: .name`` for each attribute of ``attributes`` that ``source`` reads (``x.store``,
    ``state.settings``, ``service.writing(...)``)."""
    found = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute) and node.attr in attributes]
    return [f"{node.lineno}: .{node.attr}" for node in sorted(found, key=lambda node: (node.lineno, node.col_offset))]


@pytest.mark.parametrize("module", sorted(SERVING))
def test_a_drive_is_served_without_the_store_or_the_usage_book(module):
    source = (ROOT / module).read_text()
    assert forbidden_imports(source) == []
    assert reaches(source, SERVING[module]) == []


def test_the_import_probe_sees_the_store_and_the_book():
    source = (
        "from drive.store import ObjectInfo\n"
        "import drive.store.caching\n"
        "from gateway.quota import DbUsageBook\n"
        "from drive.usage import QuotaExceeded, Upload\n"
        "from drive import usage\n"
    )
    assert forbidden_imports(source) == [
        "drive.store.ObjectInfo",
        "drive.store.caching",
        "drive.usage",
        "drive.usage.Upload",
        "gateway.quota.DbUsageBook",
    ]


def test_the_reach_probe_sees_a_store_call_a_hold_and_a_setting():
    source = (
        "info = await run_in_threadpool(service.store.head, path.key)\n"
        "lease = service.writing(prefix, [key])\n"
        "seconds = request.app.state.settings.presign_expires_seconds\n"
    )
    assert reaches(source, {"store", "writing", "settings"}) == ["1: .store", "2: .writing", "3: .settings"]
