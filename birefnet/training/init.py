"""``train.init_from``: start training from existing weights, with a strict key check and a clear report.

Sources: our ``.safetensors`` (from ``save_model`` or ``convert-upstream``), a published upstream ``.pth``
(converted on the fly), or a registered MLflow model ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


class InitWeightsError(ValueError):
    """The weights do not fit the model; the message lists what did not match."""


@dataclass
class InitReport:
    """What matched between a weights source and the model."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        parts = [f"{self.loaded} tensors loaded"]
        for label, keys in (("missing in the weights", self.missing), ("not in the model", self.unexpected),
                            ("shape mismatch", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f" ... (+{len(keys) - limit})" if len(keys) > limit else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts)


def _resolve_registered(uri: str) -> Path:
    """Download a registered model's files and return the safetensors inside."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    found = sorted(local.rglob("*.safetensors"))
    if not found:
        raise InitWeightsError(f"{uri}: no .safetensors file in the registered model's artifacts ({local})")
    return found[0]


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Load a state dict in our key layout from any supported source."""
    if source.startswith("models:/"):
        return load_file(str(_resolve_registered(source)))
    path = Path(source)
    if not path.is_file():
        raise InitWeightsError(f"train.init_from: {path} not found")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        from birefnet.models.convert import convert_state_dict, extract_state_dict

        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        return convert_state_dict(extract_state_dict(checkpoint))
    raise InitWeightsError(f"train.init_from: {path} has an unsupported extension (.safetensors, .pth, .pt)")


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> InitReport:
    """Compare keys and shapes of ``state`` with ``model``'s."""
    own = model.state_dict()
    report = InitReport(source=source)
    report.missing = sorted(k for k in own if k not in state)
    report.unexpected = sorted(k for k in state if k not in own)
    report.mismatched = sorted(f"{k} (weights {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                               for k in own if k in state and state[k].shape != own[k].shape)
    report.loaded = sum(1 for k in own if k in state and state[k].shape == own[k].shape)
    return report


def initialize_weights(model: torch.nn.Module, source: str) -> InitReport:
    """Load ``source`` into ``model`` strictly.

    Raises:
        InitWeightsError: any key missing, unexpected or of another shape (all listed).
    """
    state = read_state_dict(source)
    report = check_state_dict(model, state, source)
    if not report.ok:
        raise InitWeightsError(f"train.init_from {source} does not match the model built from params.model: "
                               f"{report.summary()}")
    model.load_state_dict(state, strict=True)
    return report
