"""Model weights in safetensors with the resolved ``model`` params embedded.

``save_model`` writes the state dict and, in the file's metadata, the JSON of the ``ModelParams`` it was
built from; ``load_model`` rebuilds the same architecture from the file alone (``birefnet.load_model``).
A file that cannot be used (truncated, not safetensors, not written by ``save_model``, tensors that do not fit
the embedded params) raises :class:`ModelFileError` naming the file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from birefnet.config import ModelParams
from birefnet.errors import ModelFileError
from birefnet.models.birefnet import BiRefNet
from birefnet.models.registry import build_model

#: Metadata key holding the ``ModelParams`` JSON.
PARAMS_KEY = "birefnet.model_params"
FORMAT_KEY = "birefnet.format"
FORMAT_VERSION = "1"


def save_model(
    model: torch.nn.Module, params: ModelParams, path: str | Path, extra: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s state dict and ``params`` to a safetensors file.

    Args:
        model: a ``BiRefNet`` (a DDP/compiled wrapper is unwrapped).
        params: the ``ModelParams`` the model was built from (embedded as JSON metadata).
        path: output ``.safetensors`` path (parent folders are created; written atomically).
        extra: more string metadata (e.g. a git commit).

    Returns:
        The path written.
    """
    model = _unwrap(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The ImageNet file only matters at first build; the checkpoint carries every weight.
    resolved = params.model_copy(update={"encoder_weights": None})
    metadata = {PARAMS_KEY: resolved.model_dump_json(), FORMAT_KEY: FORMAT_VERSION, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    _sort_metadata(tmp)
    tmp.replace(path)
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite the safetensors header in place with its metadata keys sorted.

    The writer serialises the metadata from a hash map, so the key order (and with it the file's bytes and
    its DVC hash) changes from run to run even when every tensor is identical. Sorting makes equal models
    byte-identical files; the header keeps its length, so the tensor data is not touched.
    """
    with path.open("r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        ordered = {"__metadata__": dict(sorted(meta.items())), **tensors}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # never happens for a re-ordering; keep the writer's header rather than break the file
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none).

    Raises:
        ModelFileError: the file cannot be read or is not a complete safetensors file (e.g. truncated).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(_unreadable(path, exc)) from None


def _unreadable(path: str | Path, exc: BaseException) -> str:
    size = Path(path).stat().st_size if Path(path).is_file() else None
    shown = f"{size} bytes" if size is not None else "not a regular file"
    return (f"model file {path} ({shown}) is not a readable safetensors file ({exc}); expected a complete "
            ".safetensors written by `birefnet train`, save_model or `birefnet convert-upstream` (a truncated "
            "download or copy looks like this: fetch it again)")


def read_model_params(path: str | Path) -> ModelParams:
    """The ``ModelParams`` embedded in a file written by ``save_model``.

    Raises:
        ModelFileError: unreadable file, no ``PARAMS_KEY`` metadata, or metadata that is not valid params.
    """
    metadata = read_metadata(path)
    if PARAMS_KEY not in metadata:
        if _has_upstream_keys(path):
            raise ModelFileError(f"{path}: upstream BiRefNet's key layout (bb.*, squeeze_module.*, decoder.*; a "
                                 "Hugging Face model.safetensors): convert it first with `birefnet convert-upstream "
                                 f"{path} OUT.safetensors`, or pass it to train.init_from, which converts it")
        raise ModelFileError(f"{path}: no {PARAMS_KEY!r} metadata; not written by birefnet save_model (an upstream "
                             "BiRefNet .pth or model.safetensors converts with `birefnet convert-upstream`)")
    try:
        return ModelParams.model_validate(json.loads(metadata[PARAMS_KEY]))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelFileError(f"{path}: metadata {PARAMS_KEY!r} is not valid model params: {exc}") from None


def _has_upstream_keys(path: str | Path) -> bool:
    """Whether a readable safetensors file holds upstream BiRefNet's key names (read from the header only)."""
    from birefnet.models.convert import checkpoint_layout

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        return checkpoint_layout(dict.fromkeys(keys), {}) == "upstream"
    except (SafetensorError, OSError, ValueError):
        return False


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> BiRefNet:
    """Rebuild a model from a safetensors file written by ``save_model`` (or ``convert-upstream``).

    Args:
        path: the ``.safetensors`` file.
        device: where to put the model.
        **overrides: ``ModelParams`` fields that do not change the weights layout, e.g.
            ``deform_impl="torchvision"`` or ``gradient_checkpointing=True``.

    Returns:
        The model in eval mode; ``model(image).logits`` is the ``(B, 1, H, W)`` prediction.

    Raises:
        ModelFileError: the file is unreadable, truncated, foreign, or its tensors do not fit its params.
    """
    params = read_model_params(path)
    if overrides:
        params = ModelParams.model_validate({**params.model_dump(), **overrides})
    model = build_model(params)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(_unreadable(path, exc)) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: its tensors do not fit the architecture in its own {PARAMS_KEY!r} metadata "
                             f"(a damaged or hand-edited file): {str(exc)[:500]}") from None
    return model.to(device).eval()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module  # type: ignore[assignment]
        else:
            return model
