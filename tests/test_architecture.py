"""The package's layers only point down: no import cycle, and no library module imports a stage.

The import graph is read from the source (every ``import`` statement, also those inside functions), so
a cycle cannot hide behind a function-level import."""

from __future__ import annotations

import ast
from pathlib import Path

import safety_neurons

PKG = Path(safety_neurons.__file__).resolve().parent
ENTRY_POINTS = {"safety_neurons.__main__", "safety_neurons.callbacks"}  # may run stages


def _module_name(path: Path) -> str:
    parts = ("safety_neurons",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, for every module of the package."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]  # the package a relative import starts in
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1]) if node.level else ""
                stem = ".".join(x for x in (base, node.module or "") if x)
                # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != mod}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_graph_sees_function_level_imports():
    g = import_graph()
    # both are imports inside a function body: a walker that missed them would miss hidden cycles
    assert "safety_neurons.organism" in g["safety_neurons.models"]
    assert "safety_neurons.stages" in g["safety_neurons.__main__"]
    assert "safety_neurons.hub" in g["safety_neurons.data"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_library_never_imports_stages():
    bad = {m: sorted(d for d in deps if d == "safety_neurons.stages" or d.startswith("safety_neurons.stages."))
           for m, deps in import_graph().items()
           if not (m == "safety_neurons.stages" or m.startswith("safety_neurons.stages.")) and m not in ENTRY_POINTS}
    assert {m: d for m, d in bad.items() if d} == {}


# ----------------------------------------------------------------------------------- function sizes
MAX_LINES = 60  # body lines of one function (its docstring not counted)
# functions that stay longer, each with the reason it is one piece
LONG_FUNCTIONS = {
    "safety_neurons.native.perturbed_norms":
        "It checks and marshals every argument of one C call in the order of the kernel's signature, and "
        "its OpenMP and thread-pool branches must hand the kernel the same workspace and pieces.",
    "safety_neurons.data.load_prompts":
        "One dispatch over the dataset kinds, each branch a few lines that read one source format into "
        "the same PromptSet.",
    "safety_neurons.evaluation.Evaluator.evaluate":
        "Generation, judging, utility and degeneration metrics are taken on one set of generations whose "
        "order every later metric relies on.",
    "safety_neurons.training.train_sft":
        "The optimizer loop keeps the micro-batch order, accumulation and schedule in one place, so the "
        "packed, prefix-shared and plain paths take the same steps.",
}


def function_lengths() -> dict[str, int]:
    """{module.[Class.]function: body lines, from the first statement after the docstring to the last
    line} for every function of the package (nested functions count in their parent too)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body
                has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                           and isinstance(body[0].value.value, str))
                first = body[1] if has_doc and len(body) > 1 else body[0]
                out[f"{prefix}.{child.name}"] = child.end_lineno - first.lineno + 1
                walk(child, f"{prefix}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}.{child.name}")

    for path in PKG.rglob("*.py"):
        walk(ast.parse(path.read_text(), str(path)), _module_name(path))
    return out


def test_function_lengths_are_measured():
    got = function_lengths()
    assert got["safety_neurons.importance.plnd.prompt_scores"] > 20  # docstring left out, body counted
    assert "safety_neurons.importance.capture.Layer.specs" in got  # methods are named by their class


def test_no_function_over_60_lines():
    too_long = {name: n for name, n in function_lengths().items() if n > MAX_LINES and name not in LONG_FUNCTIONS}
    assert too_long == {}, f"functions over {MAX_LINES} lines; split them or add a reason to LONG_FUNCTIONS"


def test_every_long_function_says_why():
    for name, why in LONG_FUNCTIONS.items():
        assert why.endswith(".") and len(why.split()) >= 8, name
