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
        # plugins/bases/ holds the base classes plugins share (not plugins themselves).
        parts = module.split(".")
        is_plugin = parts[:2] == ["mmdialog", "plugins"] and len(parts) >= 4 and parts[2] != "bases"
        return ".".join(parts[:4]) if is_plugin else None

    edges = [(a, b) for a, targets in graph().items() for b in targets
             if plugin_of(a) and plugin_of(b) and plugin_of(a) != plugin_of(b)]
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


# -- core names no built-in -----------------------------------------------------------------------
#: Plugin names that are also words of core's own vocabulary, in another sense: a text perceiver's
#: ``kind`` and a message's ``text`` field; a photo's ``caption`` (a library photo's, a record's).
CORE_WORDS = {"text", "caption"}


def builtin_plugins() -> dict[str, tuple[str, str]]:
    """name → (kind, "module:Class"), read from the table in ``plugins/__init__.py``."""
    tree = ast.parse((PACKAGE / "plugins" / "__init__.py").read_text(encoding="utf-8"))
    return {call.args[1].value: (call.args[0].value, call.args[2].value) for call in ast.walk(tree)
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Plugin"}


def parameter_groups(module: str) -> set[str]:
    """The group names a plugin module (and any base module it imports from plugins/) spells
    out: keys of the dicts ``parameter_groups`` builds, and ``trainable_by_default`` entries."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "parameter_groups":
            for n in ast.walk(node):
                if isinstance(n, ast.Dict):
                    out |= {k.value for k in n.keys if isinstance(k, ast.Constant)}
                if isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and isinstance(n.slice, ast.Constant):
                    out.add(n.slice.value)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "trainable_by_default"
                                                for t in node.targets):
            out |= {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmdialog.plugins."):
            out |= parameter_groups(node.module)
    return out


def builtin_names() -> set[str]:
    """What core may not spell: every built-in plugin's name, every parameter group of one,
    bare and as the freeze policy's ``component.group`` key."""
    plugins = builtin_plugins()
    names = set(plugins) - CORE_WORDS
    for kind, factory in plugins.values():
        groups = parameter_groups(factory.split(":")[0])
        slots = (kind, "retriever") if kind == "generator" else (kind,)  # a generator may stand as the retriever
        names |= groups | {f"{slot}.{g}" for slot in slots for g in groups}
    return names


def string_constants(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module (f-string parts included), docstrings aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_builtin_names_are_read():
    names = builtin_names()
    assert {"hf", "qformer", "gumbel", "sd", "sdxl", "library"} <= names           # the table
    assert {"lora", "new_token_rows", "projection", "unet", "vae", "embedder"} <= names  # their groups
    assert {"llm.lora", "perceiver.projection", "generator.unet"} <= names
    assert not names & {"llm", "generator", "pixels", "name"}


def test_core_names_no_builtin_plugin_or_group():
    """Core holds the contract; which built-in trains what, or how the reference recipe sets
    one, lives in the plugin or in a preset file (``core/presets``)."""
    names = builtin_names()
    found = [f"{f.relative_to(PACKAGE.parent)}:{line}: {value!r}" for f in sorted((PACKAGE / "core").rglob("*.py"))
             for line, value in string_constants(f) if value in names]
    assert found == []


def test_one_docstring_dialect():
    """Prose with ``names`` (docs/design.md §4): no Sphinx roles, no Google-style blocks."""
    import re

    found = [f"{path.relative_to(PACKAGE)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r":(func|class|data|meth|attr|mod|obj):`", line)
             or re.fullmatch(r"\s*(Args|Returns|Raises|Parameters):\s*", line)]
    assert found == []

