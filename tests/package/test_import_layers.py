"""Imports inside segcli point down the layers (cli -> engine -> backends -> models/memory -> ops), never in a circle.

Every `import` / `from ... import` of a segcli module, at module level or inside a function (not under
`if TYPE_CHECKING:`), is an arrow from the importing module's layer to the imported one's; an arrow may
point to the same layer or a lower one.
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
    ("ops", "errors", "files", "__init__"),
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


def imports(path: Path) -> set[str]:
    """Every segcli module `path` imports (relative imports resolved)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):  # annotations only: `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
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


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_area_has_a_layer():
    areas = {area(m) for m in graph()}
    assert areas <= set(RANK), f"give these a layer: {sorted(areas - set(RANK))}"


def test_imports_point_down_the_layers():
    upward = [(m, t) for m, targets in graph().items() for t in targets
              if t != "segcli" and RANK[area(t)] > RANK[area(m)]]
    assert not upward, "imports pointing up the layers: " + ", ".join(f"{m} -> {t}" for m, t in upward)


def test_no_import_circle():
    g = graph()
    modules = set(g)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g.get(m, ())):
            if t not in modules or t == m or m.startswith(t + "."):  # a package's own __init__ is its parent
                continue
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
