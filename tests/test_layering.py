"""The layers of postrain, read from the source: cli -> jobs -> trainers -> recipes -> data, rewards -> models ->
method registries -> registry -> tensors, errors (LAYERS has them all).

Every import of one postrain package by another (at module level or inside a function: both are arrows) must
point to a lower layer. The arrows that point up or sideways today are listed in KNOWN_ARROWS, one per importing
module and imported package: issue 19 removes them one by one. A new arrow fails here; so does a listed one that
is gone (take it off the list, so it cannot come back unnoticed).

Two more rules: the module-level import graph has no cycle, and an import inside a function says why it is not at
module level (an optional or slow package; a cycle is broken by moving code, not by an import inside a function).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

POSTRAIN = Path(__file__).resolve().parent.parent / "postrain"

# Lowest first. A module may import its own package and packages of a lower layer.
LAYERS = [
    {"errors"},
    {"value_types", "tensors", "files"},                    # files: atomic writes, run-directory names
    {"registry"},                                            # the Registry mechanism
    {"preference", "rl"},                                    # the method registries: pure functions over tensors
    {"models"},                                              # models and their loading
    {"rewards", "data", "merging"},                          # the libraries that load models or run rewards
    {"evaluation", "variants"},                              # evaluation scores with rewards; every method entry
    {"recipes"},                                             # the recipe vocabulary, loading and checks
    {"trainers", "launch"},
    {"reports"},                                             # reads run directories, trainer configs included
    {"jobs", "coverage"},
    {"cli", "registry_docs"},
]
LAYER = {package: i for i, layer in enumerate(LAYERS) for package in layer}

# module -> the packages it imports against the layering, today (2026-12-07).
KNOWN_ARROWS = {
}


def package_of(module: str) -> str:
    """'postrain.jobs.common' -> 'jobs'; 'postrain.errors' -> 'errors'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imported_modules(path: Path) -> set[str]:
    module = ".".join(path.relative_to(POSTRAIN.parent).with_suffix("").parts)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package, `level - 1` packages up
                base = package_parts[:len(package_parts) - (node.level - 1)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return {name for name in names if name.split(".")[0] == "postrain" and "." in name}


def arrows_against_the_layers() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(POSTRAIN.rglob("*.py")):
        own = package_of(".".join(path.relative_to(POSTRAIN.parent).with_suffix("").parts))
        for target in map(package_of, imported_modules(path)):
            if target != own and LAYER[target] >= LAYER[own]:
                found.setdefault(str(path.relative_to(POSTRAIN.parent)), set()).add(target)
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in POSTRAIN.iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages == set(LAYER), f"give each package a layer: {sorted(packages ^ set(LAYER))}"


def test_imports_point_down_the_layers_except_the_known_arrows():
    found = arrows_against_the_layers()
    new = {m: sorted(t - KNOWN_ARROWS.get(m, set())) for m, t in found.items() if t - KNOWN_ARROWS.get(m, set())}
    gone = {m: sorted(t - found.get(m, set())) for m, t in KNOWN_ARROWS.items() if t - found.get(m, set())}
    assert not new, f"imports against the layering (cli -> jobs -> trainers -> recipes -> registries -> models): {new}"
    assert not gone, f"these arrows are gone: take them off KNOWN_ARROWS: {gone}"


def test_the_checker_sees_a_function_level_import_and_a_relative_one(tmp_path, monkeypatch):
    """The checker itself: an import inside a function counts, and `from ..jobs import x` resolves to jobs."""
    fake = tmp_path / "postrain"
    (fake / "rl").mkdir(parents=True)
    (fake / "jobs").mkdir()
    for init in (fake / "__init__.py", fake / "rl" / "__init__.py", fake / "jobs" / "__init__.py"):
        init.write_text("")
    (fake / "rl" / "a.py").write_text("def f():\n    from postrain.jobs import common\n")
    (fake / "rl" / "b.py").write_text("from ..jobs import common\nfrom . import a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "POSTRAIN", fake)
    assert arrows_against_the_layers() == {"postrain/rl/a.py": {"jobs"}, "postrain/rl/b.py": {"jobs"}}


def test_no_private_name_is_imported_across_modules():
    """A name with a leading underscore is its module's own; another module that needs it gets a public name."""
    private = []
    for path in sorted(POSTRAIN.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("postrain")):
                private += [f"{path.relative_to(POSTRAIN.parent)}: {alias.name} from {node.module}"
                            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, private


# --- import cycles ------------------------------------------------------------------------------------------------

def module_name(path: Path) -> str:
    """postrain/rl/losses.py -> 'postrain.rl.losses'; postrain/rl/__init__.py -> 'postrain.rl'."""
    parts = path.relative_to(POSTRAIN.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(body: list[ast.stmt]):
    """The import statements that run when the module is imported: not those inside functions, nor under
    `if TYPE_CHECKING:`; those in module-level `try`, `if`, `with` and class bodies do run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking(node.test):
                yield from module_level_imports(node.body)
            yield from module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from module_level_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
            yield from module_level_imports(node.body)


def module_import_graph() -> dict[str, set[str]]:
    """postrain module -> the postrain modules it imports at module level. `from x import y` is an arrow to the
    submodule x.y where y is one, else to x. A submodule's implicit import of its package is no arrow: a package
    whose __init__ imports its submodules, which import each other, is the ordinary shape."""
    paths = {module_name(p): p for p in sorted(POSTRAIN.rglob("*.py"))}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in module_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = (".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                    if node.level else node.module)
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_module_level_imports_have_no_cycle():
    """A cycle makes the import order matter (a name missing from a module half imported) and is what pushed
    imports into functions; at module level there is none."""
    graph = module_import_graph()
    cycles = {" -> ".join(cycle): {m: sorted(graph[m] & set(cycle)) for m in cycle} for cycle in import_cycles(graph)}
    assert not cycles, f"module-level import cycles (module -> the modules of the cycle it imports): {cycles}"


def test_the_cycle_checker_on_a_fake_package(tmp_path, monkeypatch):
    """The checker itself: `from . import b` of a submodule and a plain import close a cycle; an import inside a
    function or under `if TYPE_CHECKING:` does not; a package's implicit import by its submodules does not."""
    fake = tmp_path / "postrain"
    (fake / "rl").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "rl" / "__init__.py").write_text("from postrain.rl import a\n")
    (fake / "rl" / "a.py").write_text("from . import b\nfrom postrain import errors\n")
    (fake / "rl" / "b.py").write_text("try:\n    import postrain.rl.c\nexcept ImportError:\n    pass\n")
    (fake / "rl" / "c.py").write_text("from postrain.rl.a import thing\n")
    (fake / "errors.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from postrain.rl import a\n"
                                    "def f():\n    from postrain.rl import b\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "POSTRAIN", fake)
    graph = module_import_graph()
    assert graph["postrain.errors"] == set() and graph["postrain.rl"] == {"postrain.rl.a"}
    assert import_cycles(graph) == [["postrain.rl.a", "postrain.rl.b", "postrain.rl.c"]]
    (fake / "rl" / "c.py").write_text("def f():\n    from postrain.rl.a import thing\n")
    assert import_cycles(module_import_graph()) == []


# --- imports inside functions -------------------------------------------------------------------------------------

WHY_INSIDE = re.compile(r"#\s*(optional|slow)\b")


def function_level_imports_without_a_reason(root: Path) -> list[str]:
    """Imports inside functions whose line, or the comment line above, does not say why the import is there rather
    than at module level: `# optional: vllm` or `# slow: transformers, ...` (`# cycle: ...` is no reason: move the
    code to the module where it belongs). A comment above a block of consecutive imports covers the block."""
    missing = []
    for path in sorted(root.rglob("*.py")):
        relative = str(path.relative_to(root.parent))
        lines = path.read_text().splitlines()
        inside = {node.lineno: node.end_lineno for fn in ast.walk(ast.parse("\n".join(lines)))
                  if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        covered: set[int] = set()  # last lines of imports under a comment line that says why (a block of them)
        for lineno, last in sorted(inside.items()):
            line, above = lines[lineno - 1], lines[lineno - 2].strip() if lineno > 1 else ""
            if (above.startswith("#") and WHY_INSIDE.search(above)) or lineno - 1 in covered:
                covered.add(last)
            elif not WHY_INSIDE.search(line):
                missing.append(f"{relative}:{lineno}: {line.strip()}")
    return missing


def test_every_function_level_import_says_why_it_is_not_at_module_level():
    """An import belongs at module level unless its package is optional (vllm, peft, lm_eval, mergekit, ...) or slow
    to import on a path that must stay fast (torch, transformers, trl, datasets where recipe loading or the CLI's
    --help reads the module); the comment says which. Every module of postrain/ is checked."""
    missing = function_level_imports_without_a_reason(POSTRAIN)
    assert not missing, "say why each is inside a function (# optional: / # slow:), or move it up:\n" + \
        "\n".join(missing)


def test_the_function_level_import_check_on_a_fake_package(tmp_path):
    fake = tmp_path / "postrain"
    (fake / "jobs").mkdir(parents=True)
    (fake / "a.py").write_text(
        "import os\n"
        "def f():\n"
        "    # slow: torch, not needed to load a recipe\n"
        "    import torch\n"
        "    from torch import nn\n"
        "\n"
        "    import vllm  # optional: vllm\n"
        "    import json\n"
        "def g():\n"
        "    # the recipe's own reason, not one of the two\n"
        "    import yaml\n"
        "def h():\n"
        "    # cycle: postrain.b imports this module\n"
        "    from postrain import b\n"
        "    from postrain.b import c  # cycle: as above\n")
    (fake / "jobs" / "b.py").write_text("def f():\n    import json\n")
    assert function_level_imports_without_a_reason(fake) == ["postrain/a.py:8: import json",
                                                             "postrain/a.py:11: import yaml",
                                                             "postrain/a.py:14: from postrain import b",
                                                             "postrain/a.py:15: from postrain.b import c  # cycle: as above",
                                                             "postrain/jobs/b.py:2: import json"]


def test_load_model_is_called_through_its_module():
    """Tests replace `postrain.models.loading.load_model` to prove that a step loads no model; a module that bound the
    name at import (`from postrain.models.loading import load_model`) while a replacement was in place would keep the
    replacement for the rest of the test process (rewards.judge did: later tests failed by order)."""
    bound = [f"{path.relative_to(POSTRAIN.parent)}" for path in sorted(POSTRAIN.rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and node.module == "postrain.models.loading"
             and any(alias.name == "load_model" for alias in node.names)]
    assert not bound, f"import the module and call loading.load_model: {bound}"
