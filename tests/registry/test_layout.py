"""The registry package's boundaries: no stage-layer imports, the served model's code is complete, and the crash
hook shares the publish format (``BIREFNET_TEST_CRASH_AT=register:<point>``). Quick lane."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import birefnet
from birefnet.registry import GateLockError, RegistryError
from birefnet.registry.pyfunc import PYFUNC_MODULE, model_code_files


def test_registry_does_not_import_the_stage_layer() -> None:
    code = "import sys, birefnet.registry; print(sorted(m for m in sys.modules if m.startswith('birefnet.stages')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_registry_errors_are_not_stage_errors() -> None:
    from birefnet.stages.common import StageInputError

    assert issubclass(GateLockError, RegistryError)
    assert not issubclass(RegistryError, StageInputError)


def test_model_code_holds_every_birefnet_module_it_imports() -> None:
    package = Path(birefnet.__file__).parent
    files = set(model_code_files())
    entry = Path(*PYFUNC_MODULE.split(".")[1:]).with_suffix(".py")
    assert {entry, Path("inference/serving.py"), Path("models/io.py"), Path("__init__.py")} <= files
    for rel in files:
        tree = ast.parse((package / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("birefnet."):
                module = Path(*node.module.split(".")[1:])
                assert {module.with_suffix(".py"), module / "__init__.py"} & files or (package / module).is_dir(), \
                    f"{rel} imports {node.module}, which the model's code does not hold"


def test_crash_hook_uses_the_publish_format() -> None:
    code = "from birefnet.registry.gate import fault_point; fault_point('gate_decided'); print('passed')"
    env = {**os.environ, "BIREFNET_TEST_CRASH_AT": "register:gate_decided"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 137
    env["BIREFNET_TEST_CRASH_AT"] = "gate_decided"  # the registry's former format no longer crashes
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "passed\n"
