"""``train.init_from`` loads the same tensors from each kind of source: our ``.safetensors``, an upstream-layout
``.pth`` (keys renamed through ``birefnet.models.convert``'s map) and a ``models:/`` URI of a local MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from birefnet.config import ModelParams, load_params
from birefnet.models import build_model, save_model
from birefnet.models.convert import convert_key
from birefnet.training.init import initialize_weights, resolve_init_model_params
from tests.helpers.upstream_manifest import derive_pvt_v2_manifest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = ModelParams(encoder="test_convnext", attention="aspp", multiscale_input="none", squeeze_depth=2,
                   decoder_block="residual", outward_reference=False)


def built(params: ModelParams, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(params)


def assert_same_tensors(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(built(TINY, seed=0), TINY, tmp_path_factory.mktemp("init") / "tiny.safetensors")


def test_from_our_safetensors(tiny_file: Path) -> None:
    model = built(TINY, seed=1)
    saved = load_file(str(tiny_file))
    assert any(not torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # another init to start
    report = initialize_weights(model, str(tiny_file))
    assert report.ok and report.loaded == len(saved)
    assert_same_tensors(model, saved)


def test_from_an_upstream_layout_pth(tmp_path: Path) -> None:
    """Our model's tensors under upstream's names (the converter's key map, inverted) in a ``torch.save`` file."""
    upstream_names = derive_pvt_v2_manifest("pvt_v2_b0", json.loads(
        (FIXTURES / "upstream_state_dict_swin_v1_t.json").read_text(encoding="utf-8")))["keys"]
    ours_to_upstream = {convert_key(name, "pvt_v2"): name for name in upstream_names}
    source_params = ModelParams(encoder="pvt_v2_b0")
    original = built(source_params, seed=0).state_dict()
    assert set(original) <= set(ours_to_upstream)
    source = tmp_path / "BiRefNet-pvt_v2_b0-epoch_1.pth"
    torch.save({ours_to_upstream[k]: v for k, v in original.items()}, source)

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"init_from": str(source)}}), encoding="utf-8")
    resolved = resolve_init_model_params(load_params(params_file), announce=False)
    assert resolved == source_params  # the architecture read from the upstream tensors' names and shapes
    model = built(resolved, seed=1)
    report = initialize_weights(model, str(source))
    assert report.ok and report.loaded == len(original)
    assert_same_tensors(model, original)


def test_from_a_registered_model_uri(tmp_path: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` against a throwaway SQLite store (no server)."""
    import mlflow

    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(variable, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("init", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifact(run.info.run_id, str(tiny_file), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("tiny", "champion", version.version)

    saved = load_file(str(tiny_file))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"train": {"init_from": "models:/tiny@champion"},
                                           "tracking": {"uri": uri}}), encoding="utf-8")
    assert resolve_init_model_params(load_params(params_file), announce=False) == TINY
    for source in ("models:/tiny@champion", f"models:/tiny/{version.version}"):
        model = built(TINY, seed=1)
        assert initialize_weights(model, source, uri).ok
        assert_same_tensors(model, saved)
