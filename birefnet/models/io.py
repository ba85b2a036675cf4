"""Model weights in safetensors with the model's configuration embedded.

``save_model`` writes the state dict and, in the file's metadata, the JSON of the :class:`ModelConfig` the model
was built from (``model.config``); ``load_model`` rebuilds the same architecture from the file alone
(``birefnet.load_model``) and returns a model carrying that config. A file that cannot be used (truncated, not
safetensors, not written by ``save_model``, tensors that do not fit the embedded config) raises
:class:`ModelFileError` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from birefnet.errors import ModelFileError
from birefnet.models.birefnet import BiRefNet
from birefnet.models.config import ModelConfig, ModelConfigError, SupportsToConfig, as_model_config
from birefnet.models.registry import build_model

#: Metadata key holding the ``ModelConfig`` JSON.
PARAMS_KEY = "birefnet.model_params"
FORMAT_KEY = "birefnet.format"
FORMAT_VERSION = "1"


def save_model(
    model: torch.nn.Module,
    path: str | os.PathLike[str] | ModelConfig | SupportsToConfig,
    legacy_path: str | os.PathLike[str] | None = None,
    *,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s state dict and its config to a safetensors file.

    ``save_model(model, path)`` embeds ``model.config`` (set by ``build_model``, ``create_model`` and
    ``load_model``). The older form ``save_model(model, config, path)`` embeds the given config (a
    ``ModelConfig`` or the params' ``model`` group) instead.

    Args:
        model: a ``BiRefNet`` (a DDP/compiled wrapper is unwrapped).
        path: output ``.safetensors`` path (parent folders are created; written atomically); in the older form,
            the config.
        legacy_path: the output path in the older form.
        extra: more string metadata (e.g. a git commit).

    Returns:
        The path written.

    Raises:
        ValueError: no config given and the model carries none.
        TypeError: ``path`` is not a path in the one-path form.
    """
    model = unwrap_model(model)
    if legacy_path is None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"save_model(model, path): path must be a str or path, given {type(path).__name__} "
                            "(the older form is save_model(model, config, path))")
        config, target = model_config_of(model), Path(path)
    else:
        config, target = as_model_config(path), Path(legacy_path)  # type: ignore[arg-type]
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # The ImageNet file only matters at first build; the checkpoint carries every weight.
    resolved = config.replace(encoder_weights=None)
    metadata = {PARAMS_KEY: resolved.to_json(), FORMAT_KEY: FORMAT_VERSION, **(extra or {})}
    tmp = target.with_name(target.name + ".tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file (a full disk) is not left to fill it further
        raise
    return target


def model_config_of(model: torch.nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` a model carries (``model.config``; wrappers are unwrapped).

    Raises:
        ValueError: the model carries none (built without ``build_model``/``create_model``/``load_model``).
    """
    config = getattr(unwrap_model(model), "config", None)
    if not isinstance(config, ModelConfig):
        raise ValueError(f"{type(unwrap_model(model)).__name__} carries no model config (model.config, set by "
                         f"build_model, create_model and load_model; found {type(config).__name__}); pass it: "
                         "save_model(model, config, path)")
    return config


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


def read_model_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` embedded in a file written by ``save_model``.

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
        values = json.loads(metadata[PARAMS_KEY])
        if not isinstance(values, dict):
            raise ModelConfigError(f"expected a JSON object, given {type(values).__name__}")
        return ModelConfig.from_dict(values)
    except (json.JSONDecodeError, ModelConfigError) as exc:
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
        **overrides: ``ModelConfig`` fields that do not change the weights layout, e.g.
            ``deform_impl="torchvision"`` or ``gradient_checkpointing=True``.

    Returns:
        The model in eval mode, carrying its config as ``model.config``; ``model(image).logits`` is the
        ``(B, 1, H, W)`` prediction.

    Raises:
        ModelFileError: the file is unreadable, truncated, foreign, or its tensors do not fit its config.
        ModelConfigError: an override that is not a valid ``ModelConfig`` value.
    """
    config = read_model_config(path)
    if overrides:
        config = config.replace(**overrides)
    model = build_model(config)
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


def unwrap_model(model: torch.nn.Module, *, keep_compiled: bool = False) -> torch.nn.Module:
    """The model inside DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers (any nesting).

    Args:
        model: the model, wrapped or not.
        keep_compiled: strip DDP only, keeping a ``torch.compile`` wrapper, so calling the result still runs the
            compiled forward (the training loop evaluates through it).
    """
    while True:
        if not keep_compiled and hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module  # type: ignore[assignment]
        else:
            return model
