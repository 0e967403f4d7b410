"""A non-editable install carries every file the code reads at run time (scripts, templates,
migrations), not only the modules of its packages: each such file matches a package-data
pattern of pyproject.toml (setuptools' rule: a glob relative to the package's folder)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("gateway", "bootstrap", "drive", "client")


def _needs_package_data(path: Path) -> bool:
    """Modules of a package (a folder with __init__.py) come along by themselves; anything
    else (a script, a template, a migration in a plain folder) only as package data."""
    if path.suffix == ".md" or "__pycache__" in path.parts:
        return False  # documentation, byte code
    return path.suffix != ".py" or not (path.parent / "__init__.py").is_file()


def test_every_data_file_is_package_data():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for package in TOP_PACKAGES:
        folder = ROOT / package
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or not _needs_package_data(path):
                continue
            relative = path.relative_to(folder)
            if not any(relative.match(pattern) and len(relative.parts) == len(Path(pattern).parts)
                       for pattern in declared.get(package, [])):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
