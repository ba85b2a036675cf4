"""The registered model's MLflow packaging: a pickle-free pyfunc logged as "models from code".

:func:`log_pyfunc_model` logs :mod:`birefnet.inference.pyfunc_model` as the model's code, with the safetensors
weights as an artifact, a copy of the ``birefnet`` modules that serving imports (:func:`model_code_files`), the
working size and the serving limits in the model config, pinned requirements and an input example.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The module MLflow runs to load a served model; what it imports decides the code shipped with the model.
PYFUNC_MODULE = "birefnet.inference.pyfunc_model"
#: The distributions pinned in the model's requirements.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "opencv-python-headless",
                         "pydantic", "pyyaml")


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (given explicitly: inferring them costs 7-17 s per log)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in SERVING_DISTRIBUTIONS:
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def _module_file(root: Path, module: str) -> Path | None:
    """The file of ``birefnet`` module ``module`` under ``root`` (the folder holding ``birefnet``), or None."""
    path = root.joinpath(*module.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(source: str) -> set[str]:
    """The ``birefnet`` modules (and imported names that may be modules) a source imports, at any depth."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("birefnet"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("birefnet"))
    return found


def model_code_files(entry: str = PYFUNC_MODULE) -> list[Path]:
    """The files of the ``birefnet`` package a served model imports, relative to the package folder.

    Follows every ``birefnet`` import of ``entry``, also those inside functions, and adds each package's
    ``__init__.py``: the code a model needs where ``birefnet`` is not installed, and no more (fewer files to
    upload than the whole package).
    """
    import birefnet

    package = Path(birefnet.__file__).parent
    root = package.parent
    files: set[Path] = set()
    todo, seen = [entry], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        path = _module_file(root, module)
        if path is not None:
            files.add(path.relative_to(package))
            todo += sorted(_imported_modules(path.read_text(encoding="utf-8")))
    return sorted(files)


def package_copy(dst: Path) -> Path:
    """A copy of the parts of ``birefnet`` that serving needs (:func:`model_code_files`), to ship as the model's
    code; returns the copy's ``birefnet`` folder."""
    import shutil

    import birefnet

    src = Path(birefnet.__file__).parent
    target = dst / "birefnet"
    for rel in model_code_files():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target / rel)
    return target


def example_image(size: int = 64) -> Any:
    """A deterministic ``(1, size, size, 3)`` uint8 batch: the logged input example."""
    import numpy as np

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                      np.full((size, size), 128, np.float32)], axis=2)
    return image.astype(np.uint8)[None]


def example_request(size: int = 64) -> list[str]:
    """The logged input example: :func:`example_image` as a one-item list of base64 PNG strings.

    The encoded form is what HTTP clients should send (a few KB instead of JSON pixel lists), and it makes the
    model's ``serving_input_example.json`` a ready ``/invocations`` body.
    """
    import base64

    import cv2

    ok, png = cv2.imencode(".png", example_image(size)[0][:, :, ::-1])  # OpenCV writes BGR
    if not ok:
        raise RuntimeError("OpenCV could not encode the example image as PNG")
    return [base64.b64encode(png.tobytes()).decode("ascii")]


def serving_signature() -> Any:
    """The model signature: no input schema, the ``mask_format`` inference param.

    A tensor schema would make MLflow refuse base64 strings before the model sees them (and a column schema
    raw pixel arrays), so the model takes every form in its ``predict`` and checks it there
    (:class:`birefnet.inference.serving.BiRefNetPyfunc`); an explicit signature also stops MLflow inferring one
    from the input example (which would fix the example's 64x64 size).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    from birefnet.inference.serving import MASK_FORMATS

    return ModelSignature(params=ParamSchema([ParamSpec("mask_format", "string", MASK_FORMATS[0])]))


def log_pyfunc_model(model_path: Path, size: Sequence[int], max_image_pixels: int | None = None) -> Any:
    """Log the safetensors model as a pickle-free pyfunc (models from code) in the active run.

    ``max_image_pixels`` (``serving.max_image_pixels``) goes into the model config: the served model refuses
    bigger request images (the serving module's default without it).

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/m-<id>``).
    """
    import tempfile

    import mlflow

    from birefnet.inference.serving import WEIGHTS_ARTIFACT

    entry = Path(*PYFUNC_MODULE.split(".")[1:]).with_suffix(".py")
    with tempfile.TemporaryDirectory(prefix="birefnet-model-") as tmp:
        code = package_copy(Path(tmp))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code / entry),
            artifacts={WEIGHTS_ARTIFACT: str(model_path)},
            code_paths=[str(code)],
            model_config={"size": [int(v) for v in size], "batch_size": 4,
                          **({"max_image_pixels": int(max_image_pixels)} if max_image_pixels else {})},
            signature=serving_signature(),
            input_example=example_request(),
            pip_requirements=pip_requirements(),
        )
