"""The package's import graph: no cycle, and core/plugins never import sdk.

Every import statement counts (at module level or inside a function), except
those under ``if TYPE_CHECKING:``, which never run."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmdialog"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The mmdialog modules ``path`` imports (``from a.b import c`` is ``a.b.c`` when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {n for n in names if n in modules and n != here}
    return out


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def test_the_graph_is_read():
    g = graph()
    assert "mmdialog.core.interfaces" in g["mmdialog.core.registry"]
    assert "mmdialog.core.session" in g["mmdialog.core.model"]      # an import inside a function counts
    assert "mmdialog.core.data.schema" not in g["mmdialog.core.interfaces"]  # TYPE_CHECKING does not


def test_core_and_plugins_never_import_sdk():
    edges = [(a, b) for a, targets in graph().items() for b in targets
             if a.startswith(("mmdialog.core", "mmdialog.plugins")) and b.startswith("mmdialog.sdk")]
    assert edges == []


def test_no_plugin_imports_another_plugin():
    def plugin_of(module: str) -> str | None:
        parts = module.split(".")
        return ".".join(parts[:4]) if parts[:2] == ["mmdialog", "plugins"] and len(parts) >= 4 else None

    shared = {"mmdialog.plugins.generators.latent_diffusion"}  # a base class, not a plugin
    edges = [(a, b) for a, targets in graph().items() for b in targets
             if plugin_of(a) and plugin_of(b) and plugin_of(a) != plugin_of(b) and b not in shared]
    assert edges == []


def test_no_import_cycle():
    g = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
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
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmdialog"):
                bad += [f"{module_name(f)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []
