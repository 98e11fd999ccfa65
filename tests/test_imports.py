"""The import rules of docs/ARCHITECTURE.md, checked on the source (every import statement,
lazy ones inside functions included): layers depend downward only, no circles, no production
import of test code, no test importing another test file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ftp_vllm"

# Lower layers never import higher ones; one package never imports another of its own layer.
LAYERS: dict[str, int] = {
    "ftp_vllm.contract": 0,
    "ftp_vllm.routing": 1,
    "ftp_vllm.flops": 1,
    "ftp_vllm.artifact": 2,
    "ftp_vllm.model": 2,
    "ftp_vllm.data": 2,
    "ftp_vllm.reference": 3,
    "ftp_vllm.shortgpt": 3,
    "ftp_vllm.plugin": 4,
    "ftp_vllm.allocator": 4,
    "ftp_vllm.cpu_bf16": 4,
    "ftp_vllm.eval": 5,
    "ftp_vllm.training": 6,
    "ftp_vllm.server": 6,
    "ftp_vllm.bench": 7,
    "ftp_vllm.report": 8,
    "ftp_vllm.cli": 9,
}


def _modules(folder: Path, prefix: str) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = list(path.relative_to(folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([prefix, *parts]) if prefix else ".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module name `name` imports (absolute, relative resolved), at any depth."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base] if base else pkg)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


PRODUCTION = _modules(ROOT / PACKAGE, PACKAGE)
TESTS = _modules(ROOT / "tests", "tests")


def _ours(target: str, known: dict[str, Path]) -> str | None:
    """The module of ours that `target` names (a submodule, or the module defining a name)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in PRODUCTION.items():
        deps = {_ours(t, PRODUCTION) for t in _imports(name, path)}
        graph[name] = {d for d in deps if d and d != name}
    return graph


def _layer_of(module: str) -> tuple[str, int]:
    for pkg in sorted(LAYERS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg, LAYERS[pkg]
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and ARCHITECTURE.md")


def test_every_module_has_a_layer():
    for name in PRODUCTION:
        if name != PACKAGE:
            _layer_of(name)


def test_layers_depend_downward_only():
    bad = []
    for name, deps in _graph().items():
        if name == PACKAGE:
            continue
        pkg, layer = _layer_of(name)
        for dep in deps:
            if dep == PACKAGE:
                continue
            dep_pkg, dep_layer = _layer_of(dep)
            if dep_pkg != pkg and dep_layer >= layer:
                bad.append(f"{name} (layer {layer}) imports {dep} (layer {dep_layer})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_contract_imports_nothing_of_ours():
    assert not _graph()["ftp_vllm.contract"]


def test_production_code_never_imports_test_code():
    bad = [f"{name} imports {t}" for name, path in PRODUCTION.items()
           for t in _imports(name, path)
           if t == "tests" or t.startswith("tests.") or t.rpartition(".")[2] == "testing"]
    assert not bad, "\n".join(bad)
    assert not [n for n in PRODUCTION if n.rpartition(".")[2] == "testing"]


def test_tests_never_import_other_test_files():
    bad = []
    for name, path in TESTS.items():
        for t in _imports(name, path):
            leaf = t.rpartition(".")[2]
            if leaf.startswith("test_") and t.split(".")[0] in ("tests", leaf):
                bad.append(f"{name} imports {t}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("rule", ["layers", "circle"])
def test_the_checks_catch_a_violation(rule, tmp_path):
    """The rules above fail on a tree that breaks them (so a green run means something)."""
    pkg = tmp_path / PACKAGE
    (pkg / "routing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "routing" / "__init__.py").write_text("")
    if rule == "layers":
        (pkg / "routing" / "router.py").write_text("from ftp_vllm.plugin import x\n")
        (pkg / "plugin.py").write_text("x = 1\n")
        mods = _modules(pkg, PACKAGE)
        deps = {_ours(t, mods) for t in _imports("ftp_vllm.routing.router",
                                                  mods["ftp_vllm.routing.router"])}
        assert "ftp_vllm.plugin" in deps
        assert _layer_of("ftp_vllm.plugin")[1] > _layer_of("ftp_vllm.routing.router")[1]
    else:
        (pkg / "routing" / "a.py").write_text("def f():\n    from .b import g\n")
        (pkg / "routing" / "b.py").write_text("from ftp_vllm.routing import a\n")
        mods = _modules(pkg, PACKAGE)
        a = {_ours(t, mods) for t in _imports("ftp_vllm.routing.a", mods["ftp_vllm.routing.a"])}
        b = {_ours(t, mods) for t in _imports("ftp_vllm.routing.b", mods["ftp_vllm.routing.b"])}
        assert "ftp_vllm.routing.b" in a and "ftp_vllm.routing.a" in b
