"""The package's import graph has no cycles, and the algorithm core and the rewards never reach a policy or
generation implementation.

Edges are read with ``ast`` from every module of ``nemo_igrpo/``: imports at module level and inside functions
(both run), but not those under ``if TYPE_CHECKING:`` (they never run). Importing ``a.b.c`` also runs the
``__init__`` of ``a`` and ``a.b``, so those count too, except for the importer's own enclosing packages (which are
already being imported when it runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import nemo_igrpo

PACKAGE = Path(nemo_igrpo.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # ``from pkg import submodule``
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in _imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the target and every package above it runs
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in own_packages and prefix != name:
                    edges.add(prefix)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for child in graph[todo.pop()]:
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (each line: modules that import each other):\n" + "\n".join(
        " ↔ ".join(component) for component in found)


# Interfaces the core may name; everything else under policy/ and generation/ is an implementation.
INTERFACES = {"nemo_igrpo.policy", "nemo_igrpo.policy.base", "nemo_igrpo.generation", "nemo_igrpo.generation.base",
              "nemo_igrpo.generation.keys"}
# The layers above the core: the config schema, the assembly and the loop.
ABOVE_THE_CORE = {"nemo_igrpo.config", "nemo_igrpo.assembly", "nemo_igrpo.trainer", "nemo_igrpo.cli"}


def test_the_core_and_the_rewards_never_reach_an_implementation():
    graph = import_graph()
    for name in graph:
        if not name.startswith(("nemo_igrpo.algorithms", "nemo_igrpo.rewards")):
            continue
        reached = reachable(graph, name)
        implementations = {m for m in reached if m.startswith(("nemo_igrpo.policy", "nemo_igrpo.generation"))
                           and m not in INTERFACES}
        assert not implementations, f"{name} reaches {sorted(implementations)}"
        assert not reached & ABOVE_THE_CORE, f"{name} reaches {sorted(reached & ABOVE_THE_CORE)}"


def test_config_error_lives_in_a_module_that_imports_nothing_from_the_package():
    from nemo_igrpo.config import ConfigError
    from nemo_igrpo.errors import ConfigError as Same

    assert ConfigError is Same
    assert import_graph()["nemo_igrpo.errors"] == set()


def test_the_graph_reader_sees_function_level_imports_and_skips_type_checking_blocks():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nemo_igrpo import config\n"
              "def f():\n    from nemo_igrpo.models import load_model\n")
    names = _imported_names(ast.parse(source), "nemo_igrpo.x", False)
    assert "nemo_igrpo.models" in names and "nemo_igrpo.config" not in names
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_every_import_of_the_package_resolves():
    """Every ``from nemo_igrpo.… import name`` and ``import nemo_igrpo.…`` in the package, the scripts, the examples
    and the tests names a module and attribute that exist, including imports inside functions, which only fail
    when the function runs (a script's rarely used path after a refactor moved the name: this happened to
    ``study_igrpo_vs_grpo.py --two-pass``). A module whose optional dependency is not installed is skipped."""
    import importlib

    root = PACKAGE.parent
    files = [p for folder in ("nemo_igrpo", "scripts", "examples", "tests") for p in (root / folder).rglob("*.py")]
    wanted: dict[str, set[str]] = {}  # module → names imported from it (empty: the module itself)
    for path in files:
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative: only inside the package
                    base = module.split(".")[: -node.level]
                    source = ".".join(base + ([source] if source else []))
                if source.split(".")[0] == "nemo_igrpo":
                    wanted.setdefault(source, set()).update(a.name for a in node.names if a.name != "*")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "nemo_igrpo":
                        wanted.setdefault(alias.name, set())
    missing = []
    for source, names in sorted(wanted.items()):
        try:
            imported = importlib.import_module(source)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] == "nemo_igrpo":
                missing.append(f"{source} (no such module)")
            continue  # an optional dependency of that module is not installed here
        except ImportError:
            continue
        for name in sorted(names):
            submodule = hasattr(imported, "__path__") and importlib.util.find_spec(f"{source}.{name}") is not None
            if not hasattr(imported, name) and not submodule:
                missing.append(f"{source}.{name}")
    assert not missing, f"imports that no longer resolve: {missing}"
    assert len(wanted) > 50  # the scan found the package's imports at all


# The loop: it sees the policy only through its interface (the assembly builds the backends, the producer and
# sharding hold the rest).
LOOP = {"nemo_igrpo.trainer", "nemo_igrpo.rollout_producer", "nemo_igrpo.sharding", "nemo_igrpo.lifecycle"}


def test_the_loop_imports_only_the_policy_interface():
    graph = import_graph()
    for name in LOOP:
        policy = {m for m in graph[name] if m.startswith("nemo_igrpo.policy")}
        assert policy <= {"nemo_igrpo.policy", "nemo_igrpo.policy.base"}, f"{name} imports {sorted(policy)}"
    assert "nemo_igrpo.policy.base" in graph["nemo_igrpo.trainer"]  # the rule reads the loop's real edges


def test_the_schema_never_imports_the_assembly():
    """Validation reads the backends' capabilities from the light registry module, not from the assembly (nor through
    any module it imports); loading a config in a fresh interpreter does not import the assembly either."""
    import subprocess
    import sys

    graph = import_graph()
    for name in ("nemo_igrpo.validation", "nemo_igrpo.config", "nemo_igrpo.backends"):
        reached = reachable(graph, name)
        assert "nemo_igrpo.assembly" not in reached, f"{name} reaches the assembly"
    assert "nemo_igrpo.backends" in graph["nemo_igrpo.validation"]
    assert reachable(graph, "nemo_igrpo.backends") <= {"nemo_igrpo.registry", "nemo_igrpo.errors"}
    code = ("import sys\nfrom nemo_igrpo.config import load_config\n"
            f"load_config({str(PACKAGE.parent / 'conf' / 'quickstart.yaml')!r}, ['rollout.draft_ahead=true', "
            "'generation.backend=server'])\nprint(sorted(m for m in sys.modules if m.startswith('nemo_igrpo.assembly')"
            " or m.startswith('nemo_igrpo.policy.') or m.startswith('nemo_igrpo.generation.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split("\n")[-2] == "['nemo_igrpo.generation.base']", out.stdout[-2000:] + out.stderr[-2000:]


def test_two_pass_evaluation_runs_the_algorithms_two_stage_flow():
    """Draft → select → refine is written once (``algorithms.two_stage``): training's batch and two-pass evaluation
    both import it, and neither samples or selects on its own."""
    graph = import_graph()
    for name in ("nemo_igrpo.evaluation.two_pass", "nemo_igrpo.algorithms.igrpo"):
        assert "nemo_igrpo.algorithms.two_stage" in graph[name], f"{name} does not use the two-stage flow"
        tree = ast.parse(_modules()[name].read_text())
        calls = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert not calls & {"generate", "generate_chained", "refinement_ids"}, f"{name} runs a stage itself"
        assert "nemo_igrpo.algorithms.selection" not in graph[name], f"{name} selects drafts itself"
