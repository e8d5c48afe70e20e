"""The package's shape: one import name, no import cycles, and the dependency rules of
docs/ARCHITECTURE.md (kernels import neither the engine nor the converters; converters never
import the engine; bench is a leaf nobody in the package imports at module level).

The graph is read from the source (every `import` statement, including those inside functions:
a lazy import that closes a cycle is still a cycle a reader has to untangle), resolved to module
names. Importing a submodule implicitly imports its parent packages; those implicit edges are not
counted, only the imports written in the code.
"""
import ast
import importlib
import os
import pkgutil


TOP_PACKAGES = ("lmengine", "lmengine.kernels", "lmengine.converters", "lmengine.bench")


def _modules() -> dict[str, str]:
    """Module name -> source path, for every module of the installed package."""
    found = {}
    for pkg_name in TOP_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        found[pkg_name] = pkg.__file__
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                found[info.name] = spec.origin
    return found


def _imports(name: str, path: str, modules) -> set[str]:
    """The package modules that module `name` (source at `path`) imports by name."""
    is_package = os.path.basename(path) == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:    # `from pkg import submodule` names the submodule
                full = f"{base}.{alias.name}"
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != name}


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _area(module: str) -> str:
    for sub in ("kernels", "converters", "bench"):
        if module == f"lmengine.{sub}" or module.startswith(f"lmengine.{sub}."):
            return sub
    return "engine"


def test_dependency_direction():
    allowed = {"kernels": {"kernels"}, "converters": {"converters", "kernels"},
               "engine": {"engine", "kernels", "converters", "bench"}, "bench": {"bench", "engine", "kernels", "converters"}}
    wrong = [(m, t) for m, targets in _graph().items() for t in targets if _area(t) not in allowed[_area(m)]]
    assert wrong == []


def test_only_the_cli_reaches_bench():
    users = sorted(m for m, targets in _graph().items() if _area(m) != "bench" and any(_area(t) == "bench" for t in targets))
    assert users == ["lmengine.cli"]


def test_one_import_name(tmp_path):
    """The folders install only as lmengine and its subpackages: in a fresh interpreter started
    outside the repository, their folder names are not importable as ours. (`kernels` may exist as
    PyPI's package of that name, which transformers pulls in: it must not be ours.)"""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(importlib.import_module("lmengine.kernels").__file__)))
    probe = ("import importlib.util, os, sys\n"
             "for name in ('engine', 'kernels', 'converters', 'bench'):\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    print(name, os.path.abspath(spec.origin) if spec and spec.origin else None)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert origin == "None" or not origin.startswith(os.path.join(root, name) + os.sep), line
