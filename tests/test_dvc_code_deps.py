"""Every module a stage's code imports is a dependency of that stage in ``dvc.yaml``.

DVC reruns a stage only when a declared dependency changes; a module that a stage imports but does not list (say
``birefnet/imaging.py`` for the gradients stage) could change the stage's output while ``dvc repro`` reports it
up to date. The imports are read statically (every ``import`` anywhere in the module, lazy ones included) and
followed through the package; a ``from birefnet.a.b import c`` counts ``birefnet/a/b.py`` (and ``c`` if it is a
module), not the package ``__init__`` files on the way, which only re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Plumbing every stage runs through that cannot change what a stage computes (errors, logging, the stage runner).
PLUMBING = {"birefnet/__init__.py", "birefnet/errors.py", "birefnet/stages/__init__.py", "birefnet/stages/common.py"}


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _deepest_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:end])) is not None:
            return ".".join(parts[:end])
    return None


def _imports(name: str) -> set[str]:
    path = _module_file(name)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.split(".")[0] == "birefnet" and (module := _deepest_module(target)):
                found.add(module)
    return found


def _closure(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imports(name))
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_lists_every_module_its_code_imports(stage: str) -> None:
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in STAGES[stage].get("deps", [])]
    files = {str(_module_file(m).relative_to(ROOT)) for m in _closure(f"birefnet.stages.{stage}")}
    missing = sorted(
        f for f in files - PLUMBING if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} imports these modules without listing them in deps: {missing}"


def test_the_import_reader_sees_lazy_imports() -> None:
    # the evaluation runner imports the precision helper inside a function: the reader must follow it
    assert "birefnet.precision" in _imports("birefnet.evaluation.runner")
