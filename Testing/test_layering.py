"""The engine's layers (README, "Layout"): a module imports only from its own layer or the layers below, nothing
imports the command line, and no two modules import each other (directly or round a loop). Imports inside
functions count as much as those at the top of a file."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "BrainDINOLib"

# Lowest first. A module belongs to the first layer with an entry that is the module or a package above it.
LAYERS: list[tuple[str, set[str]]] = [
    ("core", {"BrainDINOLib", "errors", "atomic", "volume", "slices", "resolution", "architecture", "checkpoints",
              "memory", "inference", "precision", "preprocessing", "map_defaults", "encoder", "distributed",
              "volume_files", "upsample", "features", "cache", "embedding", "session", "threads", "atlas", "tissue",
              "synthetic", "manifest", "montage"}),
    ("analysis", {"maps", "heads", "cohort", "training"}),
    ("application", {"logic", "mrml", "worker", "process", "dependencies", "demo"}),
    ("interfaces", {"commands", "web"}),
    ("cli", {"cli"}),
]


def module_files() -> dict[str, Path]:
    """Dotted module name (without the package prefix; "BrainDINOLib" for the package itself) -> file."""
    modules = {}
    for path in (REPO / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(REPO / PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts) or PACKAGE] = path
    return modules


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body (`from .x import y` counts as `x.y` when
    `y` is a module, else as `x`)."""
    package = name.split(".") if path.name == "__init__.py" and name != PACKAGE else name.split(".")[:-1]
    found = set()

    def add(dotted: str) -> None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        if dotted and dotted != name:
            found.add(dotted)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}".strip(".") for alias in node.names]
        else:
            continue
        for target in targets:
            if isinstance(node, ast.Import) or node.level == 0:  # absolute: keep only our own package
                if target.split(".")[0] != PACKAGE:
                    continue
                target = target[len(PACKAGE):].lstrip(".")
            add(target or PACKAGE)
    return found


def layer_of(name: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        if any(name == member or name.startswith(member + ".") for member in members):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name} and to the README")


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def import_loops(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = set()
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                loops.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_every_import_goes_down_or_sideways():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert upward == []


def test_nothing_imports_the_command_line():
    """Front ends run `braindino` as a program; the library, Training/ scripts, Slicer module and benchmarks
    share its error reporting through `errors.report_errors`, never by importing `cli`."""
    modules = module_files()
    importers = [name for name, targets in import_graph().items() if "cli" in targets]
    scripts = [path.relative_to(REPO).as_posix() for folder in ("Training", "BrainDINO", "benchmarks")
               for path in (REPO / folder).rglob("*.py") if "cli" in imported_modules(path, "__main__", modules)]
    assert importers + scripts == []


def test_no_import_loops():
    assert import_loops(import_graph()) == []


def test_no_import_loops_between_packages():
    """Read as packages (`heads/`, `cohort/`, `training/`, top-level modules), the imports form no loop either:
    each package can be read, and changed, knowing only what it imports."""
    packages: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        packages.setdefault(name.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    assert import_loops({name: targets - {name} for name, targets in packages.items()}) == []


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "commands" in graph["cli"]  # `from .commands import COMMAND_MODULES` inside build_parser
    assert "training.shards" in graph["training.export"]  # inside a function as well
