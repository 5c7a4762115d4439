"""The import rule of docs/architecture.md: no import circle between lowrank_kit's modules, and imports
point down the layers (at most the few upward arrows listed in ``UPWARD``, each with its reason).

Every import counts, at the top of a file or inside a function: an import moved into a function still
ties the two modules together. Only imports under ``if TYPE_CHECKING:`` are left out (they never run).

Run it as a script to print the layers and any arrow that breaks the rule::

    python tests/test_architecture.py
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_kit"

# Bottom to top. A module belongs to the layer of its longest matching prefix; it may import modules of
# its own layer and of the layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "lowrank_kit",
            "lowrank_kit.errors",
            "lowrank_kit.paths",
            "lowrank_kit.progress",
            "lowrank_kit.hookspecs",
            "lowrank_kit.hf_hook",
            "lowrank_kit.calib_cache",
            "lowrank_kit.placement",
            "lowrank_kit.snapshot",
        ),
    ),
    ("numerics", ("lowrank_kit.quant.primitives", "lowrank_kit.kernels")),
    ("modules", ("lowrank_kit.modules",)),
    ("models", ("lowrank_kit.models",)),
    ("data", ("lowrank_kit.data", "lowrank_kit.data.synthetic")),
    (
        "methods",
        (
            "lowrank_kit.methods",
            "lowrank_kit.quant",
            "lowrank_kit.surgery",
            "lowrank_kit.ratios",
            "lowrank_kit.sequential",
        ),
    ),
    (
        "registry",
        ("lowrank_kit.registry", "lowrank_kit.builtin", "lowrank_kit.recipe", "lowrank_kit.models.tiny"),
    ),
    ("checkpoint format", ("lowrank_kit.checkpoint", "lowrank_kit.hf_config", "lowrank_kit.hf_integration")),
    ("runtime", ("lowrank_kit.runtime",)),
    ("testbed", ("lowrank_kit.testbed",)),
    ("loading", ("lowrank_kit.loading",)),
    ("pipeline", ("lowrank_kit.pipeline",)),
    ("eval", ("lowrank_kit.eval",)),
    ("bench", ("lowrank_kit.bench",)),
    ("cli", ("lowrank_kit.cli",)),
]

# Upward arrows that are allowed, (importer, imported) -> why. At most MAX_UPWARD.
UPWARD: dict[tuple[str, str], str] = {}
MAX_UPWARD = 5


def module_files() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the lowrank_kit modules it imports (anywhere in the file), and the packages whose
    ``__init__`` those imports run."""
    mods = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for name in names:
                if not name.startswith("lowrank_kit"):
                    continue
                target = resolve(name)
                if target and target != mod:
                    graph[mod].add(target)
                    break
    # Importing a.b.c runs the __init__ of a.b first (unless the importer is inside a.b): an arrow to
    # a.b too, where that __init__ imports anything of lowrank_kit itself.
    for mod in list(graph):
        for target in list(graph[mod]):
            parent = target.rpartition(".")[0]
            while parent.count("."):
                if graph.get(parent) and not mod.startswith(parent + "."):
                    graph[mod].add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # The root package ("lowrank_kit") is a layer's member by its exact name only.
            inside = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if inside and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_architecture.py; add it")
    return best


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    arrows = upward_arrows(import_graph())
    unexplained = [a for a in arrows if a not in UPWARD]
    assert unexplained == [], "imports running up the layers (docs/architecture.md): " + "; ".join(
        f"{a} -> {b}" for a, b in unexplained
    )
    assert len(UPWARD) <= MAX_UPWARD
    stale = [a for a in UPWARD if a not in arrows]
    assert stale == [], f"UPWARD lists arrows that no longer exist: {stale}"


def test_the_checker_sees_a_circle_and_an_upward_arrow():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward_arrows({"lowrank_kit.errors": {"lowrank_kit.cli.main"}}) == [
        ("lowrank_kit.errors", "lowrank_kit.cli.main")
    ]


if __name__ == "__main__":
    graph = import_graph()
    for i, (name, prefixes) in enumerate(LAYERS):
        print(f"{i:2d} {name}: {', '.join(prefixes)}")
    arrows = upward_arrows(graph)
    print(f"\n{len(graph)} importing modules, {sum(len(t) for t in graph.values())} arrows")
    print(f"circles: {cycles(graph) or 'none'}")
    print("upward arrows:" if arrows else "upward arrows: none")
    for a, b in arrows:
        print(
            f"  {a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})  {UPWARD.get((a, b), 'NOT ALLOWED')}"
        )
    sys.exit(1 if cycles(graph) or any(a not in UPWARD for a in arrows) else 0)
