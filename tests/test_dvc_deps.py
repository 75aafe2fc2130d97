"""Every stage of dvc.yaml depends on exactly the project modules its entry
point runs: the transitive closure of its ``stages`` imports (those inside
functions too), read from the source. A module missing from a stage's deps
would let a change to it leave the stage's results stale; an extra one would
re-run the stage for nothing."""

import ast
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "stages"


def imported_modules(path: Path) -> set[str]:
    """The ``stages`` modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(f"{PACKAGE}.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == PACKAGE:  # from stages import a, b: submodules
                found |= {f"{PACKAGE}.{alias.name}" for alias in node.names}
            elif node.module.startswith(f"{PACKAGE}."):
                found.add(node.module)
    return found


def module_file(module: str) -> Path:
    return REPO / (module.replace(".", "/") + ".py")


def closure(entry: str) -> set[str]:
    """The files of ``entry`` and of every project module it imports, directly or not,
    with the package's ``__init__.py`` (run by any of those imports)."""
    seen, todo = set(), [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        assert module_file(module).is_file(), f"{module} is imported but {module_file(module)} does not exist"
        todo += sorted(imported_modules(module_file(module)) - seen)
    return {f"{PACKAGE}/__init__.py"} | {module_file(m).relative_to(REPO).as_posix() for m in seen}


def stage_code_deps() -> dict[str, tuple[str, set[str]]]:
    """{stage: (entry module, the code files its deps list)} for every stage of dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        entry = re.search(r"python -m (\S+)", body["cmd"]).group(1)
        deps = {d for d in body.get("deps", []) if isinstance(d, str) and d.endswith(".py")}
        found[name] = (entry, deps)
    return found


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    problems = []
    for name, (entry, deps) in stage_code_deps().items():
        wanted = closure(entry)
        if missing := sorted(wanted - deps):
            problems.append(f"{name}: deps miss {missing}")
        if extra := sorted(deps - wanted):
            problems.append(f"{name}: deps list {extra}, which {entry} does not import")
    assert not problems, "\n".join(problems)


def test_the_closure_follows_imports_inside_functions_and_from_package_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom stages import a, b as c\nfrom stages.d import e\n"
                      "def f():\n    import stages.g\n    from . import h\n")
    assert imported_modules(source) == {"stages.a", "stages.b", "stages.d", "stages.g"}


def test_no_module_imports_a_stage_entry_point():
    """Layering: a stage module (one dvc.yaml runs) is imported by nothing in the package."""
    entries = {entry for entry, _ in stage_code_deps().values()}
    offenders = [f"{path.name} imports {sorted(imported_modules(path) & entries)}"
                 for path in sorted((REPO / PACKAGE).glob("*.py")) if imported_modules(path) & entries]
    assert not offenders, offenders


def test_the_params_schema_imports_no_model_code_and_no_function_grows_past_60_lines():
    """The pydantic schema stays importable without Keras (the data stages
    validate params.yaml with it), and the code stays in small functions."""
    assert imported_modules(REPO / PACKAGE / "experiment_params.py") == set()
    long = []
    for path in sorted((REPO / PACKAGE).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
