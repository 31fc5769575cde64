"""The layout's promises, checked from the source: every module a DVC stage imports (directly or
not, inside the repo) is one of that stage's deps, so changing it makes the stage stale in
`dvc status`; and no import cycle exists inside tasks/ (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(path: Path) -> set[Path]:
    """Repo files that importing ``path`` runs: the modules it names and their packages' __init__."""
    package = path.parent.relative_to(REPO).parts
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    files: set[Path] = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            found = module_path(".".join(parts[:i]))
            if found:
                files.add(found)
    return files


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path) - seen
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage: str) -> None:
    spec = STAGES[stage]
    words = spec["cmd"].split()
    entry = module_path(words[words.index("-m") + 1])
    assert entry is not None, f"{stage}: cannot find the module of {spec['cmd']!r}"
    deps = [REPO / d for d in spec["deps"]]
    uncovered = sorted(
        str(f.relative_to(REPO)) for f in closure(entry) if not any(f == d or d in f.parents for d in deps)
    )
    assert not uncovered, f"dvc.yaml stage {stage!r} runs code it does not list as deps: {uncovered}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_lists_no_code_it_does_not_run(stage: str) -> None:
    # A code dep outside the import closure makes the stage stale (and retrain) on edits that
    # cannot change its outputs; the DVC-level test in tests/flows/test_retrain.py sees the same.
    spec = STAGES[stage]
    words = spec["cmd"].split()
    runs = closure(module_path(words[words.index("-m") + 1]))
    listed = {REPO / d for d in spec["deps"] if d.endswith(".py")}
    unused = sorted(str(f.relative_to(REPO)) for f in listed - runs)
    assert not unused, f"dvc.yaml stage {stage!r} lists code it never imports: {unused}"


def test_the_check_sees_indirect_imports() -> None:
    # evaluate reaches tasks/common/metrics.py only through its own import: the example the
    # code-health review found missing from deps. The closure must include it.
    assert REPO / "tasks/common/metrics.py" in closure(REPO / "tasks/evaluate.py")
    assert REPO / "tasks/data/__init__.py" in closure(REPO / "tasks/prepare.py")


def test_no_import_cycle_in_tasks() -> None:
    modules = sorted((REPO / "tasks").rglob("*.py"))
    graph = {
        m: {f for f in imported_files(m) if f != m and f.name != "__init__.py" and "tasks" in f.parts} for m in modules
    }
    state: dict[Path, str] = {}

    def visit(node: Path, path: list[Path]) -> list[Path] | None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for module in modules:
        if module not in state and (cycle := visit(module, [])):
            pytest.fail("import cycle: " + " -> ".join(str(p.relative_to(REPO)) for p in cycle))
