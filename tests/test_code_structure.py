"""The shape of the code, checked: mmcl's modules import each other without cycles, imports sit at the
top of each module (bar a few heavy optional dependencies, each with its reason), and the training
code reads in functions short enough to hold at once."""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from conftest import REPO

PACKAGE = REPO / "mmcl"
# Imported inside the functions that need them, each with a comment saying why: slow to import and
# needed by one path only (DeepSpeed also reads DS_ACCELERATOR at import; matplotlib must be switched
# to its file backend before pyplot loads; wandb is an optional dependency).
DEFERRED = {"deepspeed", "transformers", "matplotlib", "librosa", "wandb"}
LONGEST_TRAIN_FUNCTION = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(node: ast.AST, known: Set[str]) -> List[str]:
    """The mmcl modules an import statement loads (a name imported from a package may be a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
        if len(targets) < len(node.names) and node.module in known:
            targets.append(node.module)  # the other names come from the module (or package) itself
        return targets
    return []


def import_graph() -> Dict[str, Set[str]]:
    """module -> the mmcl modules it imports, wherever in the module the import stands (an import inside
    a function or under `if TYPE_CHECKING:` is an edge all the same)."""
    known = set(modules())
    return {
        name: {target for node in ast.walk(ast.parse(path.read_text())) for target in imported_modules(node, known)}
        for name, path in modules().items()
    }


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle as a path of module names, or []."""
    done: Set[str] = set()

    def visit(path: List[str]) -> List[str]:
        for target in sorted(graph[path[-1]]):
            if target in path:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(path + [target])
                if cycle:
                    return cycle
        done.add(path[-1])
        return []

    for start in sorted(graph):
        cycle = [] if start in done else visit([start])
        if cycle:
            return cycle
    return []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert "mmcl.losses.base" in graph["mmcl.losses.infonce"] and "mmcl.config" in graph["mmcl.cli"]
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def function_local_imports() -> List[Tuple[str, int, str, str]]:
    """(file, line, imported module, the comment on or just above the line) of every import that is not
    at a module's top level."""
    found = []
    for path in modules().values():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level:
                name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                comment = here.split("#", 1)[1] if "#" in here else above if above.startswith("#") else ""
                found.append((str(path.relative_to(REPO)), node.lineno, name, comment.strip()))
    return found


def test_function_local_imports_are_only_heavy_optional_dependencies_with_a_reason():
    local = function_local_imports()
    for file, line, name, comment in local:
        assert name.split(".")[0] in DEFERRED, f"{file}:{line} imports {name} inside a function"
        assert comment, f"{file}:{line} defers importing {name} without a comment saying why"


def test_no_training_function_is_longer_than_a_screen():
    for path in sorted((PACKAGE / "train").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= LONGEST_TRAIN_FUNCTION, f"{path.name}:{node.name} is {length} lines"
