"""The shape of the package (docs/architecture.md, "The house"): no import cycle, no module over
450 lines, no function over 60 lines outside the listed exceptions, and the layering rules.

Read from the source with `ast`, module-level and function-level imports alike; nothing imported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "jlm"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Modules allowed over MAX_MODULE_LINES (none today).
LONG_MODULES: set[str] = set()
# Functions allowed over MAX_FUNCTION_LINES, each with its reason.
LONG_FUNCTIONS = {
    # The argparse declaration of every subcommand: a list of declarations, read top to bottom.
    "jlm.cli.parser.build_parser",
    # A list of metric declarations, one per collector.
    "jlm.metrics.Metrics.__init__",
    # The typed call of manage.lua: one keyword parameter per ARGV (25), in the script's order.
    "jlm.store.Store.manage",
}
# The AMQP libraries: the decisions (`lifecycle`) stay free of their types.
AMQP_LIBRARIES = ("aio_pika", "aiormq", "pamqp")


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def modules(root: Path = PACKAGE) -> dict[str, Module]:
    """Every module under `root` by dotted name (`jlm.worker` for `jlm/worker/__init__.py`)."""
    found: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = Module(".".join(parts), path, ast.parse(path.read_text()))
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import run at some point: module level and in functions, not `if TYPE_CHECKING`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child):
            yield from _import_nodes_of(child.orelse)
        else:
            yield from _import_nodes(child)


def _import_nodes_of(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    for stmt in body:
        yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))


def imported(module: Module, known: set[str]) -> set[str]:
    """The names `module` imports: every module of `known` it imports, and any other top-level
    name (a library) as itself."""
    out: set[str] = set()
    for node in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: from the module's package
            package = module.name.split(".")
            if not module.is_package:
                package.pop()
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in known else base)
    return out


def jlm_imports(found: dict[str, Module]) -> dict[str, set[str]]:
    known = set(found)
    return {name: imported(m, known) & known for name, m in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def functions(module: Module) -> Iterator[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                assert child.end_lineno is not None
                yield f"{prefix}{child.name}", child.end_lineno - child.lineno + 1
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(module.tree, f"{module.name}.")


# -- the rules, on the package ------------------------------------------------------------------


def test_no_import_cycle() -> None:
    cycle = find_cycle(jlm_imports(modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_over_450_lines() -> None:
    sizes = {m.name: len(m.path.read_text().splitlines()) for m in modules().values()}
    assert len(sizes) > 20
    over = {
        name: n for name, n in sizes.items() if n > MAX_MODULE_LINES and name not in LONG_MODULES
    }
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"
    assert set(sizes) >= LONG_MODULES, "an exception for a module that no longer exists"


def test_no_function_over_60_lines_outside_the_exceptions() -> None:
    lengths = dict(f for m in modules().values() for f in functions(m))
    over = {
        name: n
        for name, n in lengths.items()
        if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS
    }
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"
    gone = LONG_FUNCTIONS - set(lengths)
    assert not gone, f"exceptions for functions that no longer exist: {gone}"
    # The decision path reads in one screen: the script call, the reply and the events apart.
    assert lengths["jlm.lifecycle.Lifecycle.manage"] < 50


def test_lifecycle_is_free_of_amqp() -> None:
    found = modules()
    libraries = {name.split(".")[0] for name in imported(found["jlm.lifecycle"], set(found))}
    assert not libraries & set(AMQP_LIBRARIES)
    assert not {n for n in jlm_imports(found)["jlm.lifecycle"] if n.startswith("jlm.amqp")}


def test_store_never_imports_the_broker() -> None:
    found = modules()
    for name in ("jlm.store", "jlm.worker.store"):
        bad = {
            n
            for n in jlm_imports(found)[name]
            if n in ("jlm.broker", "jlm.worker.broker") or n.startswith("jlm.amqp")
        }
        assert not bad, f"{name} imports {bad}"


def test_nothing_imports_the_cli() -> None:
    """Only the command line itself, and `python -m jlm`, import `jlm.cli`."""
    graph = jlm_imports(modules())
    importers = {
        name
        for name, targets in graph.items()
        if any(t == "jlm.cli" or t.startswith("jlm.cli.") for t in targets)
        and not (name == "jlm.cli" or name.startswith("jlm.cli."))
    }
    assert importers == {"jlm.__main__"}


# -- the checks themselves ----------------------------------------------------------------------


def test_a_cycle_is_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_imports_in_functions_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    pkg = tmp_path / "jlm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import two\n")
    (pkg / "one.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from jlm.sub import two\n"
        "def f():\n    from jlm.sub.two import g\n    import aio_pika\n"
    )
    (pkg / "sub" / "two.py").write_text("def g():\n    from jlm import one\n")
    found = modules(pkg)
    assert set(found) == {"jlm", "jlm.sub", "jlm.one", "jlm.sub.two"}
    graph = jlm_imports(found)
    assert graph["jlm.one"] == {"jlm.sub.two"}
    assert graph["jlm.sub"] == {"jlm.sub.two"}
    assert "aio_pika" in imported(found["jlm.one"], set(found))
    assert find_cycle(graph) in (
        ["jlm.one", "jlm.sub.two", "jlm.one"],
        ["jlm.sub.two", "jlm.one", "jlm.sub.two"],
    )


def test_function_lengths_include_methods_and_nested_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "jlm"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "class C:\n    def f(self):\n        def g():\n            pass\n        return g\n"
    )
    found = modules(pkg)
    assert dict(functions(found["jlm.m"])) == {"jlm.m.C.f": 4, "jlm.m.C.f.g": 2}


def test_the_architecture_doc_lists_every_module() -> None:
    """docs/architecture.md's module table names each module of the tree once, and no other."""
    doc = (PACKAGE.parents[1] / "docs" / "architecture.md").read_text()
    table = doc[doc.index("| module | what it holds |") :].split("\n\n")[0]
    listed = [line.split("`")[1] for line in table.splitlines()[2:]]
    assert len(listed) == len(set(listed)), "a module listed twice"
    assert set(listed) == set(modules())


def test_one_version() -> None:
    """pyproject.toml holds the version; `jlm.__version__` reads it from the package metadata,
    and the compose stack's image tag (pinned, by tests/test_deploy_artifacts.py) repeats it."""
    import tomllib

    import yaml

    import jlm

    root = PACKAGE.parents[1]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert jlm.__version__ == version
    assert "__version__ =" not in (PACKAGE / "__init__.py").read_text()
    compose = yaml.safe_load((root / "deploy" / "docker-compose.yml").read_text())
    assert compose["x-jlm-image"]["image"] == f"job-lifecycle-manager:{version}"
    assert f"job-lifecycle-manager:{version} ." in (root / "deploy" / "Dockerfile").read_text()


def test_tests_take_shared_helpers_from_support_not_conftest() -> None:
    here = Path(__file__)
    found = [
        str(p.relative_to(here.parent))
        for p in here.parent.rglob("*.py")
        if p != here
        and re.search(r"^from tests\.conftest import|^import tests\.conftest", p.read_text(), re.M)
    ]
    assert not found, f"import tests/support instead of tests.conftest in: {found}"
