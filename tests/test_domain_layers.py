"""The domain speaks no HTTP: its modules import neither FastAPI nor Starlette nor the HTTP layer
(gateway/errors.py, auth.py, deps.py), not even transitively, and raise no HTTP status; the
one place a domain error becomes a status (gateway/errors.py) knows every kind of them."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import domain_errors
from gateway.errors import status_of

DOMAIN = [
    "gateway.domain_errors",
    "gateway.principal",
    "gateway.orgs",
    "gateway.users",
    "gateway.runs",
    "gateway.pod_files",
    "gateway.billing",
    "gateway.tokens",
    "gateway.bounds",
    "gateway.rentals",
]
HTTP_LAYER = ("fastapi", "starlette", "gateway.errors", "gateway.auth", "gateway.deps", "gateway.app", "gateway.routes")


def _with_submodules(names: list[str]) -> list[str]:
    found = []
    for name in names:
        found.append(name)
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):
            found += [info.name for info in pkgutil.walk_packages(module.__path__, name + ".")]
    return found


def _http_modules_loaded_by(module: str) -> list[str]:
    """What of the HTTP layer importing ``module`` pulls in, in a fresh interpreter."""
    script = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return [m for m in loaded if any(m == layer or m.startswith(layer + ".") for layer in HTTP_LAYER)]


@pytest.mark.parametrize("module", _with_submodules(DOMAIN))
def test_the_domain_imports_no_http(module):
    assert _http_modules_loaded_by(module) == []


def test_the_import_probe_sees_the_http_layer():
    """The check above can fail: the auth module (HTTP) is caught by it."""
    assert "fastapi" in _http_modules_loaded_by("gateway.auth")


def _http_statuses_raised(source: str) -> list[int]:
    """Integer literals from 100 to 599 passed to whatever a ``raise`` calls."""
    statuses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            call = node.exc
            for arg in [*call.args, *(k.value for k in call.keywords)]:
                if isinstance(arg, ast.Constant) and type(arg.value) is int and 100 <= arg.value <= 599:
                    statuses.append(arg.value)
    return statuses


@pytest.mark.parametrize("module", _with_submodules(DOMAIN))
def test_the_domain_raises_no_http_status(module):
    assert _http_statuses_raised(Path(importlib.import_module(module).__file__).read_text()) == []


def test_the_status_probe_sees_a_status():
    assert _http_statuses_raised('raise ApiError(409, "conflict", "taken")') == [409]


def test_every_domain_error_has_a_status():
    kinds = [
        kind for _, kind in inspect.getmembers(domain_errors, inspect.isclass)
        if issubclass(kind, domain_errors.DomainError) and kind is not domain_errors.DomainError
    ]
    assert kinds
    for kind in kinds:
        error = kind.__new__(kind)
        assert 400 <= status_of(error) <= 599, kind


def _backend_reads(source: str) -> list[int]:
    """Lines where ``source`` reads an attribute named ``backend`` (the pod backend)."""
    return [
        node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute) and node.attr == "backend"
    ]


ROUTES = Path(__file__).parents[1] / "gateway" / "routes"


@pytest.mark.parametrize("route", sorted(p.name for p in ROUTES.glob("*.py")))
def test_no_route_reaches_around_the_domain_to_the_pod_backend(route):
    source = (ROUTES / route).read_text()
    assert _backend_reads(source) == []


def test_the_backend_probe_sees_a_backend_read():
    assert _backend_reads("state = rentals.backend.run_state(ref, run_id, 0)") == [1]
