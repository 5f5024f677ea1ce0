"""The package layout: stage packages without import cycles (imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minicompress"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: {imported minicompress modules}}`` from every import statement, nested ones too."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps.add(target)
                deps.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in paths and d != name and d != "minicompress"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for dep in sorted(graph[node]):
            if (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_nested_relative_imports():
    graph = import_graph()
    assert "minicompress.data.sources" in graph["minicompress.data.token_store"]  # `from . import sources` in a function
    assert "minicompress.distillation.losses" in graph["minicompress.distillation.loop"]


def test_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_stage_packages_hold_the_pipeline():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {"data", "pruning", "distillation", "evaluation", "recipes"} <= stages
    # the packages' __init__ import nothing: a submodule import never drags in its siblings
    for stage in stages:
        tree = ast.parse((PACKAGE / stage / "__init__.py").read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], stage


#: what one recipe may import from another: the other command's function (run composes
#: generate or correct -> score/prune -> recover, prune scores), never a helper used as a library
COMMANDS = {"info", "run_eval", "score", "prune", "recover", "correct", "write_teacher_cache", "generate", "quantize",
            "run"}
#: recipe helpers another recipe may use, each with its reason
RECIPE_HELPERS = {
    ("minicompress.recipes.run", "minicompress.recipes.generate", "TEXT_FILE"): "run trains on generate's output file",
    ("minicompress.recipes.run", "minicompress.recipes.generate", "interrupted"):
        "run resumes generate only when its working folder holds an interrupted run",
    ("minicompress.recipes.run", "minicompress.recipes.generate", "same_generation"):
        "run reuses a finished generation only with the same settings",
}


def recipe_imports() -> list[tuple[str, str, str]]:
    """``(importer, recipe module, name)`` for every import of a recipe module anywhere in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                for alias in node.names:
                    if target == "minicompress.recipes":
                        found.append((name, f"{target}.{alias.name}", "*"))
                    elif target.startswith("minicompress.recipes."):
                        found.append((name, target, alias.name))
            elif isinstance(node, ast.Import):
                found += [(name, a.name, "*") for a in node.names if a.name.startswith("minicompress.recipes")]
    return found


def test_components_never_import_recipes_and_recipes_import_only_commands():
    imports = recipe_imports()
    assert imports, "the scan found no recipe import at all"
    for importer, module, name in imports:
        if not importer.startswith("minicompress.recipes"):  # the command line drives the recipes
            assert importer in ("minicompress.cli", "minicompress.reports"), (importer, module, name)
        elif importer != module:
            assert name in COMMANDS or (importer, module, name) in RECIPE_HELPERS, (importer, module, name)


#: The most parameters a function of the package takes (``self``/``cls`` not counted, ``*args``
#: and ``**kwargs`` one each); longer lists are grouped into small frozen dataclasses (issue 28).
MAX_PARAMETERS = 10
#: ``{"module:function": reason}``: the only functions allowed more.
PARAMETER_ALLOW_LIST = {
    "minicompress.evaluation.perplexity:evaluate_model": "the public Python API (mc.evaluate): one keyword per "
                                                "EvalConfig setting, documented in the README",
}


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args]
    bound = 1 if names and names[0] in ("self", "cls") else 0
    return len(names) - bound + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def long_parameter_lists() -> dict[str, int]:
    """``{"module:function": parameters}`` of every function (nested ones too) over :data:`MAX_PARAMETERS`."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > MAX_PARAMETERS:
                out[f"{module_name(path)}:{node.name}"] = parameter_count(node)
    return out


def test_parameter_count_counts_every_kind_of_parameter():
    tree = ast.parse("def f(a, /, b, *c, d, **e): pass\n"
                     "class K:\n    def m(self, a, *, b): pass\n    @classmethod\n    def k(cls, a): pass\n")
    counts = {n.name: parameter_count(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert counts == {"f": 5, "m": 2, "k": 1}


def test_no_function_takes_more_than_ten_parameters():
    """Long parameter lists are grouped into small config objects (TeacherTargets, LogitLoss and
    LossNumerics of chunked_distill_loss, SamplingConfig, StepRuntime ...); the allow-list names the
    exceptions, each with its reason, and holds no stale entry."""
    long = long_parameter_lists()
    assert set(long) - set(PARAMETER_ALLOW_LIST) == set(), long
    assert set(PARAMETER_ALLOW_LIST) <= set(long), "an allow-list entry no longer needs it: drop it"
