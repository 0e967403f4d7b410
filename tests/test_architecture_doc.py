"""docs/architecture.md stays true of the code: every module, folder and function it names exists.

The page names code as `path/module.py` and `path/module.py:name` (`Class.method` for a method),
in backticks. Each such name is looked up by parsing the module with ``ast`` (nothing is
imported), and the rule table gives each rule exactly one home.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
CODE_FOLDERS = ("gateway/", "drive/", "client/", "bench/", "tests/", "docs/", "bootstrap/")
BACKTICKED = re.compile(r"`([^`\s]+)`")
FILE_REF = re.compile(r"(?P<path>[\w.-]+(?:/[\w.-]+)+\.(?:py|sh|md|toml))(?::(?P<name>[A-Za-z_]\w*(?:\.\w+)*))?")
FOLDER_REF = re.compile(r"[\w-]+(?:/[\w-]+)*/")
RULE_SECTION = "## Where each rule lives"


def references(text: str) -> list[str]:
    """Every backticked file reference (``path.py`` or ``path.py:name``) and code folder."""
    found = []
    for token in BACKTICKED.findall(text):
        if FILE_REF.fullmatch(token) or (FOLDER_REF.fullmatch(token) and token.startswith(CODE_FOLDERS)):
            found.append(token)
    return found


@cache
def _module(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _names_in(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """What a module or class body defines: functions, classes, assigned and annotated names."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def problem(reference: str, root: Path = ROOT) -> str | None:
    """Why ``reference`` does not name something in the code under ``root`` (None: it does)."""
    match = FILE_REF.fullmatch(reference)
    if match is None:
        return None if (root / reference).is_dir() else f"no folder {reference}"
    path = root / match["path"]
    if not path.is_file():
        return f"no file {match['path']}"
    if match["name"] is None:
        return None
    if path.suffix != ".py":
        return f"{match['path']} is no Python module, so it defines no {match['name']}"
    parts = match["name"].split(".")
    body = _module(path).body
    for depth, part in enumerate(parts):
        found = _names_in(body).get(part)
        if found is None:
            return f"{match['path']} defines no {'.'.join(parts[: depth + 1])}"
        body = getattr(found, "body", [])
    return None


def rule_table(text: str) -> list[tuple[str, str]]:
    """The rows (rule, home cell) of the page's rule table."""
    section = text.split(RULE_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 2 and cells != ["rule", "home"] and not set(cells[0]) <= set("-: "):
            rows.append((cells[0], cells[1]))
    return rows


TEXT = PAGE.read_text()
REFERENCES = sorted(set(references(TEXT)))


def test_the_page_names_code():
    assert len(REFERENCES) >= 50, REFERENCES


@pytest.mark.parametrize("reference", REFERENCES)
def test_every_named_module_and_function_exists(reference):
    assert problem(reference) is None, problem(reference)


def test_the_rule_table_gives_each_rule_exactly_one_home():
    rows = rule_table(TEXT)
    assert len(rows) >= 30, rows
    rules = [rule for rule, _ in rows]
    assert len(rules) == len(set(rules)), "a rule is listed twice"
    for rule, home in rows:
        named = references(home)
        assert len(named) == 1 and ":" in named[0], f"{rule!r} needs exactly one home as path.py:name, has {home!r}"
        assert problem(named[0]) is None, problem(named[0])


def test_the_checker_sees_what_is_missing(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("class Book:\n    limit: int = 3\n    def write(self): ...\n\nRATE = 2\n")
    assert problem("pkg/mod.py:Book.write", tmp_path) is None
    assert problem("pkg/mod.py:Book.limit", tmp_path) is None
    assert problem("pkg/mod.py:RATE", tmp_path) is None
    assert problem("pkg/", tmp_path) is None
    assert "defines no Book.read" in problem("pkg/mod.py:Book.read", tmp_path)
    assert "defines no Ledger" in problem("pkg/mod.py:Ledger", tmp_path)
    assert "no file" in problem("pkg/gone.py", tmp_path)
    assert "no folder" in problem("lib/", tmp_path)
    assert references("`pkg/mod.py:Book.write` and `/v1/files/` and `shared/` and `pkg/`") == ["pkg/mod.py:Book.write"]
    assert rule_table(f"{RULE_SECTION}\n\n| rule | home |\n|---|---|\n| a | `pkg/mod.py:RATE` |\n\n## next\n| x | y |\n") == [
        ("a", "`pkg/mod.py:RATE`")
    ]


def test_the_page_is_linked_from_the_readme_and_the_development_guide():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
    assert "(architecture.md)" in (ROOT / "docs" / "development.md").read_text()
