"""The package's layering, read from its source: docstrings, imports that go one
way, and no module reaching into another's private names (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import scenebreak

PACKAGE = Path(scenebreak.__file__).parent
MODULES = sorted(p for p in PACKAGE.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _package_imports(tree: ast.Module):
    """(module, name) for every `from .module import name` / `from scenebreak.module import name`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("scenebreak")):
            module = (node.module or "").removeprefix("scenebreak").lstrip(".")
            for alias in node.names:
                yield module, alias.name


def test_every_module_says_its_job():
    for path in MODULES:
        assert ast.get_docstring(_tree(path)), f"{path.name} has no docstring"


def test_no_module_imports_another_modules_private_names():
    for path in MODULES:
        tree = _tree(path)
        modules = set()
        for module, name in _package_imports(tree):
            assert not (name.startswith("_") and not name.startswith("__")), f"{path.name} imports {module}.{name}"
            if not module:
                modules.add(name)  # `from . import maskops`
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert not node.attr.startswith("_"), f"{path.name} uses {node.value.id}.{node.attr}"


def test_only_the_front_end_knows_click_and_rich():
    front = {"cli.py", "ui.py", "__main__.py"}
    for path in MODULES:
        if path.name in front:
            continue
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("click", "rich") for n in names), f"{path.name} imports {names}"
        assert all(module != "cli" for module, _ in _package_imports(_tree(path))), f"{path.name} imports the CLI"


def test_test_scaffolding_is_not_installed():
    assert not (PACKAGE / "testing.py").exists()
