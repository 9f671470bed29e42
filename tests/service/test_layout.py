"""The package layout as tests: no import cycles, edges depend on the stages (never the other way round), the
client imports without the server's dependencies, and the console script resolves (DESIGN.md, Layout)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "snipserve_client")
# service.client: the client's old name; service.settings: the composition root (composes every config, the
# edges' included), which no stage imports.
EDGES = ("service.http", "service.cli", "snipserve_client", "service.client", "service.settings")


def is_edge(module: str) -> bool:
    return any(module == e or module.startswith(e + ".") for e in EDGES)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, at module level or lazily inside a function (a lazy import that closes a
    loop is still a cycle between layers), each with the packages above it (their ``__init__`` runs first).
    Imports under ``if TYPE_CHECKING`` never run and are left out."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for child in node.body for n in ast.walk(child)}  # fmt: skip
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    out: set[str] = set()
    for name in names:
        parts = name.split(".")
        out.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in known)
    return out


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {module_name(p) for p in files}
    graph = {module_name(p): imports(p, known) for p in files}
    # A module's own packages are already being initialised when it runs (a package re-exporting its modules is
    # not a cycle), so those edges are left out.
    return {k: {d for d in v if d != k and not k.startswith(d + ".")} for k, v in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_and_engines_never_import_the_edges() -> None:
    graph = import_graph()
    inner = [m for m in graph if not is_edge(m) and m.startswith("service")]
    bad = {m: sorted(d for d in graph[m] if is_edge(d)) for m in inner}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_client_imports_without_the_servers_dependencies() -> None:
    code = textwrap.dedent(
        """
        import sys
        blocked = ("service", "fastapi", "starlette", "uvicorn", "onnxruntime", "cv2", "numpy", "tifffile")

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in blocked:
                    raise ImportError(f"{name} is blocked")
                return None

        sys.meta_path.insert(0, Block())
        import snipserve_client
        from snipserve_client import Client

        with Client("http://127.0.0.1:9") as client:
            assert client is not None
        print(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in blocked))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_console_script_and_module_entry_point() -> None:
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "snipserve"]
    assert script.value == "service.cli:main"
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "serve" in r.stdout, r.stderr


def test_every_package_has_an_init() -> None:
    """setuptools' packages.find only ships directories with ``__init__.py`` (a namespace package would be left out
    of the wheel and the Docker image)."""
    dirs = {p.parent for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert sorted(str(d.relative_to(ROOT)) for d in dirs if not (d / "__init__.py").exists()) == []
