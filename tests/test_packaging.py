"""A non-editable install carries every file the code reads at run time (scripts, templates,
migrations), not only the modules of its packages: each such file matches a package-data
pattern of its project's pyproject.toml (setuptools' rule: a glob relative to the package's
folder). Two projects: the server (pyproject.toml) and the client (client/pyproject.toml, whose
project folder is the package's own)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = {ROOT / "pyproject.toml": ("gateway", "bootstrap", "drive"), ROOT / "client" / "pyproject.toml": ("client",)}


def _needs_package_data(path: Path) -> bool:
    """Modules of a package (a folder with __init__.py) come along by themselves; anything
    else (a script, a template, a migration in a plain folder) only as package data."""
    if path.suffix == ".md" or "__pycache__" in path.parts:
        return False  # documentation, byte code
    return path.suffix != ".py" or not (path.parent / "__init__.py").is_file()


def test_every_data_file_is_package_data():
    missing = []
    for project, packages in PROJECTS.items():
        declared = tomllib.loads(project.read_text())["tool"]["setuptools"].get("package-data", {})
        missing += _missing_package_data(project, packages, declared)
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def test_each_package_belongs_to_one_project():
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(server) == sorted(f"{p}*" for p in PROJECTS[ROOT / "pyproject.toml"])
    assert client == ["client"]


def _missing_package_data(project: Path, packages: tuple[str, ...], declared: dict) -> list[str]:
    missing = []
    for package in packages:
        folder = ROOT / package
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path == project or not _needs_package_data(path):
                continue
            relative = path.relative_to(folder)
            if not any(relative.match(pattern) and len(relative.parts) == len(Path(pattern).parts)
                       for pattern in declared.get(package, [])):
                missing.append(str(path.relative_to(ROOT)))
    return missing
