"""The shape DESIGN.md asks for, checked from the source's imports (``ast``, nothing imported):
no import cycle among phoneagent's modules, and a sans-I/O core that reaches no socket library,
no server state and no route or REST module, however indirectly.

Every import counts: module level, inside functions, and under ``if TYPE_CHECKING:`` (a cycle a
type checker has to break is still a cycle in the design).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "phoneagent"
ROOT = PACKAGE_DIR.parent

# The sans-I/O core: a module is core when its name is one of these or lies under one.
CORE = (
    "phoneagent.call",  # call.py, or the call/ package
    "phoneagent.audio",
    "phoneagent.realtime.base",
    "phoneagent.realtime.stepfun",
    "phoneagent.twilio.wire",
    "phoneagent.handoff",
    "phoneagent.outbound.rules",  # outbound calls' decisions
    "phoneagent.outbound.context",
)
# What the core must never reach: socket libraries, and the shells' modules.
FORBIDDEN_LIBRARIES = ("aiohttp", "websockets")
FORBIDDEN_MODULES = (
    "phoneagent.state",
    "phoneagent.server",
    "phoneagent.twilio.routes",
    "phoneagent.twilio.rest",
)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str  # a phoneagent module, or an outside library's top-level name
    line: int

    def where(self, modules: dict[str, Path]) -> str:
        return f"{modules[self.source].relative_to(ROOT)}:{self.line}"


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """Every import in the module, as edges to phoneagent modules or outside libraries."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = []
    tree = ast.parse(path.read_text(), str(path))
    # Code under `if __name__ == "__main__":` runs only when the module is the program (then it
    # is `__main__`, not itself): its imports cannot close a cycle, so they are not edges.
    as_program = {
        id(inner)
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "__name__ == '__main__'"
        for inner in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in as_program:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from package import module`: that module; `from module import name`: the module.
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                for alias in node.names
            ]
        for target in targets:
            if target.split(".")[0] != "phoneagent":
                target = target.split(".")[0]
            else:
                while target not in modules:  # `import phoneagent.x.y` names a module; trim attrs
                    target = target.rpartition(".")[0]
            if target != name:
                edges.append(Edge(name, target, node.lineno))
    return edges


def import_graph() -> tuple[dict[str, Path], dict[str, list[Edge]]]:
    modules = find_modules()
    return modules, {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle (as its edges) for each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.target not in graph:
                continue
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for group in groups:
        start = min(group)
        # The shortest way back to `start` within the group.
        came_by: dict[str, Edge] = {}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for edge in graph[node]:
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    found.append(path)
                    queue.clear()
                    break
                if edge.target in group and edge.target not in came_by:
                    came_by[edge.target] = edge
                    queue.append(edge.target)
    return found


def forbidden_paths(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """For each core module, the shortest import chain to each forbidden thing it reaches."""
    found = []
    for start in sorted(m for m in graph if under(m, CORE)):
        came_by: dict[str, Edge] = {}
        seen = {start}
        queue = deque([start])
        while queue:
            node = queue.popleft()
            for edge in graph.get(node, []):
                target = edge.target
                if target in seen:
                    continue
                seen.add(target)
                came_by[target] = edge
                if target in FORBIDDEN_LIBRARIES or under(target, FORBIDDEN_MODULES):
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    found.append(path)
                elif target in graph:
                    queue.append(target)
    return found


def describe(path: list[Edge], modules: dict[str, Path]) -> str:
    steps = [path[0].source] + [f"{e.target} ({e.where(modules)})" for e in path]
    return "\n      → ".join(steps)


def test_the_graph_sees_the_package():
    modules, graph = import_graph()
    assert "phoneagent.call" in modules and "phoneagent.server" in modules
    targets = {e.target for edges in graph.values() for e in edges}
    assert {"aiohttp", "websockets", "phoneagent.state"} <= targets


def test_no_import_cycle():
    modules, graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles among phoneagent's modules:\n" + "\n".join(
        f"  {describe(path, modules)}" for path in found
    )


def test_the_core_reaches_no_sockets_state_routes_or_rest():
    modules, graph = import_graph()
    found = forbidden_paths(graph)
    assert not found, "the sans-I/O core imports what it must not:\n" + "\n".join(
        f"  {describe(path, modules)}" for path in found
    )


def test_the_media_shell_takes_protocols_not_sockets():
    """bridge.py moves bytes between a TwilioLine and a ModelChannel: the aiohttp adapters live
    in the route and the model connection, so the shell runs in memory."""
    _, graph = import_graph()
    reached = reached_from(graph, "phoneagent.bridge")
    assert not reached & set(FORBIDDEN_LIBRARIES), sorted(reached & set(FORBIDDEN_LIBRARIES))


def test_the_server_and_doctor_run_without_websockets():
    """The model connection is aiohttp's client WebSocket; only the test kit's fake model servers
    (and so `phoneagent demo`, which runs one) use the websockets library."""
    _, graph = import_graph()
    for start in ("phoneagent.server", "phoneagent.doctor", "phoneagent.realtime.connection"):
        reached = reached_from(graph, start)
        assert "aiohttp" in reached and "websockets" not in reached, start


def reached_from(graph: dict[str, list[Edge]], start: str) -> set[str]:
    """Every module and library ``start`` imports, directly or not."""
    reached, queue = set(), deque([start])
    while queue:
        for edge in graph.get(queue.popleft(), []):
            if edge.target not in reached:
                reached.add(edge.target)
                queue.append(edge.target)
    return reached


def test_cycles_are_reported_with_their_edges():
    graph = {
        "a": [Edge("a", "b", 1)],
        "b": [Edge("b", "c", 2), Edge("b", "aiohttp", 3)],
        "c": [Edge("c", "a", 4)],
        "d": [Edge("d", "a", 5)],
    }
    (path,) = cycles(graph)
    assert [(e.source, e.target) for e in path] == [("a", "b"), ("b", "c"), ("c", "a")]


def test_imports_are_found_wherever_they_are(tmp_path):
    source = tmp_path / "phoneagent" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import other\n"
        "from ..top import thing\n"
        "if TYPE_CHECKING:\n"
        "    from phoneagent.state import ServerState\n"
        "def f():\n"
        "    import aiohttp.web\n"
    )
    modules = {
        "phoneagent": Path(),
        "phoneagent.sub": Path(),
        "phoneagent.sub.other": Path(),
        "phoneagent.sub.mod": source,
        "phoneagent.top": Path(),
        "phoneagent.state": Path(),
    }
    targets = {e.target for e in imports_of("phoneagent.sub.mod", source, modules)}
    assert targets == {
        "typing",
        "phoneagent.sub.other",
        "phoneagent.top",
        "phoneagent.state",
        "aiohttp",
    }


def test_forbidden_reach_is_reported_with_its_chain():
    graph = {
        "phoneagent.call": [Edge("phoneagent.call", "phoneagent.personas", 1)],
        "phoneagent.personas": [
            Edge("phoneagent.personas", "aiohttp", 2),
            Edge("phoneagent.personas", "phoneagent.twilio.rest.calls", 3),
        ],
        "phoneagent.twilio.rest.calls": [],
        "phoneagent.server": [Edge("phoneagent.server", "aiohttp", 4)],  # a shell: allowed
    }
    chains = [[(e.source, e.target) for e in path] for path in forbidden_paths(graph)]
    assert chains == [
        [("phoneagent.call", "phoneagent.personas"), ("phoneagent.personas", "aiohttp")],
        [
            ("phoneagent.call", "phoneagent.personas"),
            ("phoneagent.personas", "phoneagent.twilio.rest.calls"),
        ],
    ]
