"""No `embtables` import hides inside a function (it would hide an import cycle until call
time), except in the CLI modules, which import a subcommand's implementation only when it
runs. The layer contract itself is checked by `lint-imports` (pyproject.toml, `make test`),
with no exception left: its allow-list of violations is gone and must not come back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "embtables"


def _is_cli(path: Path) -> bool:
    """The cli layer: embtables/cli.py, doctor.py, the subcommand package embtables/commands/,
    and the areas' own argument modules (``*/cli.py``, ``*_cli.py``)."""
    in_commands = path.parent == PACKAGE / "commands"
    return in_commands or path.name in ("cli.py", "doctor.py") or path.name.endswith("_cli.py")


def _function_level_imports(path: Path) -> list[int]:
    def ours(name: str | None) -> bool:
        return (name or "").split(".")[0] == "embtables"

    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and ours(sub.module):
                    lines.append(sub.lineno)
                elif isinstance(sub, ast.Import) and any(ours(a.name) for a in sub.names):
                    lines.append(sub.lineno)
    return sorted(set(lines))


def test_no_embtables_import_inside_a_function_outside_the_cli():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if _is_cli(path):
            continue
        lines = _function_level_imports(path)
        if lines:
            found[rel] = lines
    assert not found, f"embtables imports inside functions (move them to the top of the module): {found}"


def test_the_scan_sees_a_function_level_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\n\ndef f():\n"
                 "    from embtables.errors import is_user_error\n"
                 "    import embtables\n")
    assert _function_level_imports(f) == [5, 6]


def test_the_layer_contract_has_no_allow_list():
    """Every import of embtables points down the layers; none is let through by name."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[tool.importlinter]"):]
    assert "ignore_imports" not in section, "pyproject.toml's import-linter contract lets a violation through"
    assert "embtables.commands" in section and "embtables.logs" in section
