"""The package's import structure: light modules stay light, and no module imports itself back.

A cycle (a imports b, b imports a, at any level, also inside a function) means neither
module can be read, tested or moved without the other; a function-level import that only
defers a heavy dependency (torch, ray, matplotlib) is fine as long as it closes no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nos_gym"

#: Cycles still in the code, each as the sorted modules of one strongly connected
#: component, with who must break it. Empty this list as they are fixed: the test fails
#: both on a new cycle and on a listed one that is gone.
KNOWN_CYCLES: list[list[str]] = []


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


#: The floors of the package, lowest first: a module imports only from its own floor or lower
#: ones (the package's ``__init__``, for ``__version__``, from anywhere). Data flows one way:
#: the language, the engine that runs it, optimizers, data sources, tasks, the score store,
#: evaluation, the env, agents, the command line. See docs/architecture.md.
FLOORS = ["dsl", "engine", "optim", "data bench", "tasks", "store", "evaluation", "envs", "agents", "cli"]


def floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for level, names in enumerate(FLOORS):
        if top in names.split():
            return level
    raise KeyError(f"{module}: not on any floor of FLOORS; add its package there")


def import_graph(type_checking: bool = False) -> dict[str, dict[str, int]]:
    """Module -> {nos_gym module it imports: line of the first such import}, top level and in functions
    (and under ``if TYPE_CHECKING:`` too, with ``type_checking``)."""
    mods = _modules()

    def known(name: str) -> str | None:  # the module a dotted name lives in ("nos_gym.dsl.parse" -> "nos_gym.dsl")
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = set() if type_checking else _type_checking_only(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # "from pkg import sub" imports the submodule sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                found = known(target) if target.split(".")[0] == "nos_gym" else None
                if found and found != mod:
                    edges.setdefault(found, node.lineno)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [f"    {a} -> {b} (line {graph[a][b]})" for a in component for b in sorted(graph[a]) if b in component]
    return " <-> ".join(component) + "\n" + "\n".join(edges)


def test_no_import_cycles_beyond_the_known_ones():
    graph = import_graph()
    found = cycles(graph)
    new = [c for c in found if c not in KNOWN_CYCLES]
    gone = [c for c in KNOWN_CYCLES if c not in found]
    message = ""
    if new:
        message += "import cycles:\n" + "\n".join(_describe(c, graph) for c in new) + "\n"
    if gone:
        message += f"fixed, remove from KNOWN_CYCLES: {gone}\n"
    assert not message, message


def test_every_import_goes_down_the_floors():
    graph = import_graph(type_checking=True)
    up = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)}) at line {line}"
          for a, bs in sorted(graph.items()) if a != "nos_gym" for b, line in sorted(bs.items())
          if b != "nos_gym" and floor(b) > floor(a)]
    assert not up, "imports up the floors:\n" + "\n".join(up)


def test_no_two_modules_refer_to_each_other_even_for_types():
    graph = import_graph(type_checking=True)
    pairs = sorted({tuple(sorted((a, b))) for a, bs in graph.items() for b in bs if a in graph.get(b, {})})
    assert not pairs, f"modules that import each other (also under TYPE_CHECKING): {pairs}"


def test_the_graph_sees_function_level_imports_and_cycles():
    # the checker itself: a function-level import counts, and a cycle through it is found
    graph = import_graph()
    assert "nos_gym.dsl.tree" in graph["nos_gym.dsl.notation"]
    assert "nos_gym.envs.render" in graph["nos_gym.envs.optimizer_search"]  # imported inside render()
    assert "nos_gym.engine.rules" in graph["nos_gym.optim"]
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
    # and the floors see an upward import, as the test above would report it
    assert floor("nos_gym.engine.rules") < floor("nos_gym.tasks.convnet.task") < floor("nos_gym.cli")
    assert "nos_gym.tasks.convnet.protocol" in import_graph(type_checking=True)["nos_gym.tasks.convnet.fidelity"]


def test_the_language_and_the_task_interface_import_no_torch():
    code = ("import sys, nos_gym.dsl, nos_gym.dsl.table1, nos_gym.engine.step_plan, nos_gym.tasks.base, "
            "nos_gym.tasks.convnet.protocol; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_run_directory_knows_nothing_of_the_search():
    # nos_gym.agents.rundir (lock, log, checkpoints, resume checks, signals) imports no nos_gym module:
    # no agent, settings, task, evaluator or env; nos_gym.agents.runs wires the search to it
    graph = import_graph(type_checking=True)
    assert graph["nos_gym.agents.rundir"] == {}
    assert "nos_gym.agents.rundir" in graph["nos_gym.agents.runs"]
