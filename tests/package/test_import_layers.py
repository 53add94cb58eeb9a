"""Imports inside segcli point down the layers (cli -> engine -> backends -> models/memory -> ops), never in a circle.

Every `import` / `from ... import` of a segcli module, at module level or inside a function (not under
`if TYPE_CHECKING:`), is an arrow from the importing module's layer to the imported one's; an arrow may
point to the same layer or a lower one. No circle either among every module's imports, nor among those that run
while a module is itself being imported (module level, not inside functions), nor when the `if TYPE_CHECKING:`
imports of annotations are added to those. A module importing a package it belongs to closes no circle: that
package's `__init__` is already being imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import segcli

PACKAGE = Path(segcli.__file__).parent

# Highest first: a module may import modules of its own layer or below, never above.
LAYERS = [
    ("cli", "__main__"),
    ("train", "probe", "eval"),  # training, the probes and the lm-eval model stream through the engine
    ("engine",),
    ("state", "plot"),
    ("backends",),
    ("hf", "models", "reader"),
    ("memory", "config", "corpus", "documents", "distributed"),
    ("ops", "errors", "files", "cache", "__init__"),
]
RANK = {name: len(LAYERS) - i for i, names in enumerate(LAYERS) for name in names}


def area(module: str) -> str:
    """The top-level part of segcli a dotted module name belongs to (segcli.engine.run -> engine)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path) -> str:
    """The package relative imports in `path` start from."""
    me = module_name(path)
    return me if path.name == "__init__.py" else me.rsplit(".", 1)[0]


def type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def targets(node: ast.AST, package: str) -> set[str]:
    """The segcli modules one import statement names (relative imports resolved against `package`)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        out |= {a.name for a in node.names if a.name.startswith("segcli")}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.startswith("segcli"):
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names
                    if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{target}.{a.name}".replace(".", "/") + ".py")).exists()}
    return out


def imports(path: Path) -> set[str]:
    """Every segcli module `path` imports (relative imports resolved)."""
    package = package_of(path)
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # annotations only: `if TYPE_CHECKING:` imports never run
        if type_checking(node):
            node.body = []
    for node in ast.walk(tree):
        out |= targets(node, package)
    return out


def module_level_imports(path: Path, annotations: bool = False) -> set[str]:
    """The segcli modules `path` imports while it is itself being imported: its statements at module level (inside
    if, try, with and class bodies too), not those inside functions, which run later; with `annotations`, also
    those under `if TYPE_CHECKING:`."""
    package = package_of(path)
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            out.update(targets(node, package))
            if type_checking(node) and not annotations:
                visit(node.orelse)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit([n for n in getattr(node, field, []) if isinstance(n, (ast.stmt, ast.excepthandler))])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return out


def graph(imported=imports) -> dict[str, set[str]]:
    return {module_name(p): imported(p) for p in PACKAGE.rglob("*.py")}


def circle(g: dict[str, set[str]]) -> list[str] | None:
    """An import circle in `g` (module -> the modules it imports), as the modules around it; None: there is none."""
    modules = set(g)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if t not in modules or t == m or m.startswith(t + "."):  # a package's own __init__ is its parent
                continue
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t, path + [t])
                if found:
                    return found
        state[m] = 2
        return None

    for m in sorted(modules):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_every_area_has_a_layer():
    areas = {area(m) for m in graph()}
    assert areas <= set(RANK), f"give these a layer: {sorted(areas - set(RANK))}"


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, targets in graph().items() for t in targets
              if t != "segcli" and RANK[area(t)] > RANK[area(m)]]
    assert not upward, "imports pointing up the layers: " + ", ".join(f"{m} -> {t}" for m, t in upward)


def test_no_import_circle():
    found = circle(graph())
    assert found is None, "import circle: " + " -> ".join(found)


def test_no_import_circle_at_import_time():
    """Among the imports that run while a module is being imported (module level; those inside functions run later,
    those under `if TYPE_CHECKING:` never)."""
    found = circle(graph(module_level_imports))
    assert found is None, "import circle at import time: " + " -> ".join(found)


def test_no_import_circle_through_annotations():
    """The same with the `if TYPE_CHECKING:` imports added: a module that another imports does not name it back,
    not even for an annotation (segcli.train.tasks reads the sizes it needs through its own `TrainSizes`)."""
    found = circle(graph(lambda p: module_level_imports(p, annotations=True)))
    assert found is None, "import circle through annotations: " + " -> ".join(found)
