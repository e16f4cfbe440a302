"""The package's layering, read from its source (docs/architecture.md): every module
says its job, subpackages by job import one way (command line -> jobs -> machinery ->
ground), nothing imports the command line, families import only the ground, modules
form no import cycles, no module reaches into another's private names, and the family
names live in families/ alone."""

from __future__ import annotations

import ast
from pathlib import Path

import scenebreak

PACKAGE = Path(scenebreak.__file__).parent
TESTS = Path(__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
# Top to bottom: a package may import its own modules and those of the layers below it,
# never one beside it or above it. "ground" is the top-level modules (config, paths, ...).
LAYERS = [("cli",), ("ui",), ("batch", "evaluation", "exports"), ("train",), ("sample",), ("masks",), ("scenes",), ("families",), ("ground",)]
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MAX_TOP_LEVEL = 11  # modules beside the subpackages, __init__ and __main__ not counted


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(path: Path):
    """(absolute module, imported name) for every import of a scenebreak module from
    `path`, relative or absolute, at the top or inside a function."""
    name = _name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "scenebreak":
                module = node.module
            else:
                continue
            for alias in node.names:
                target = f"{module}.{alias.name}"
                yield (target if _is_module(target) else module), alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "scenebreak":
                    yield alias.name, ""


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "ground"


def _rank(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_every_module_and_subpackage_says_its_job():
    for path in MODULES:
        assert ast.get_docstring(_tree(path)), f"{path.relative_to(PACKAGE)} has no docstring"


def test_the_layers_cover_every_subpackage_and_the_top_level_stays_small():
    assert sorted(p for layer in LAYERS for p in layer if p != "ground") == SUBPACKAGES
    top = [p for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(top) <= MAX_TOP_LEVEL, sorted(p.name for p in top)


def test_imports_go_down_the_layers_only():
    wrong = []
    for path in MODULES:
        if path.name == "__main__.py" or path == PACKAGE / "__init__.py":
            continue  # the entry points: the command line, and the lazy public API
        own = _layer_of(_name(path))
        for module, name in _imports(path):
            if module == "scenebreak" and name == "__version__":
                continue
            other = _layer_of(module)
            if other != own and _rank(other) <= _rank(own):
                wrong.append(f"{_name(path)} ({own}) imports {module} ({other})")
    assert not wrong, "\n".join(wrong)


def test_families_import_only_the_ground_and_nothing_imports_the_command_line():
    for path in MODULES:
        layer = _layer_of(_name(path))
        for module, _ in _imports(path):
            if layer == "families":
                assert _layer_of(module) in ("families", "ground"), f"{_name(path)} imports {module}"
            if layer != "cli" and path.name != "__main__.py":
                assert _layer_of(module) != "cli", f"{_name(path)} imports the command line ({module})"


def test_modules_form_no_import_cycle():
    graph = {_name(path): {m for m, _ in _imports(path) if m != _name(path) and _is_module(m)} for path in MODULES}
    # A package's __init__ is imported on the way to its modules: edges to it do not make a cycle.
    graph = {name: {m for m in edges if not (PACKAGE.parent.joinpath(*m.split(".")) / "__init__.py").is_file()}
             for name, edges in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_no_module_imports_another_modules_private_names():
    for path in MODULES:
        modules = set()
        for module, name in _imports(path):
            if name == module.rpartition(".")[2]:  # `from . import ops as maskops`: a module
                modules.add(name)
                continue
            assert not (name.startswith("_") and not name.startswith("__")), f"{_name(path)} imports {module}.{name}"
        aliases = {a.asname or a.name for node in ast.walk(_tree(path)) if isinstance(node, ast.ImportFrom)
                   for a in node.names if a.name in modules}
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert not node.attr.startswith("_"), f"{_name(path)} uses {node.value.id}.{node.attr}"


def test_only_the_command_line_knows_click_and_rich():
    for path in MODULES:
        if _layer_of(_name(path)) == "cli":
            continue
        for node in ast.walk(_tree(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("click", "rich") for n in names), f"{_name(path)} imports {names}"


def test_family_names_live_in_families_alone():
    """The trainer, samplers, scene file and exports ask the family (families.Family)
    what differs: no family's name and no is-this-family flag outside families/."""
    from scenebreak.families import SUPPORTED

    for path in MODULES:
        if _layer_of(_name(path)) == "families":
            continue
        tree = _tree(path)
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert node.value not in SUPPORTED, f"{_name(path)} names the family {node.value!r}"
            if isinstance(node, ast.Attribute):
                assert node.attr != "is_xl", f"{_name(path)} branches on is_xl"


def test_tests_mirror_the_layout():
    folders = sorted(p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py")))
    assert folders == SUBPACKAGES, "every subpackage has its tests/<subpackage>/, and no other test folder"


def test_test_scaffolding_is_not_installed():
    assert not (PACKAGE / "testing.py").exists() and not list(PACKAGE.rglob("tinymodels.py"))


def test_text_files_are_read_and_written_as_utf8_whatever_the_locale():
    """Without `encoding=`, Python reads and writes text in the system's code page
    (cp1252 on most Windows machines): an a1111 export whose README names a base model
    folder in Chinese failed there (UnicodeEncodeError), and an accented one wrote a
    README that is not UTF-8."""
    unencoded = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in MODULES for node in ast.walk(_tree(path))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr in ("read_text", "write_text")
                 and not any(keyword.arg == "encoding" for keyword in node.keywords)]
    assert not unencoded, unencoded
