"""``train.init_from``: the model settings come from the weights file (ours, converted, upstream on the fly,
``models:/``), conflicting ``model.*`` params are refused before Ray starts, and the fine-tune recipe
(``configs/finetune-general.yaml``) trains from a converted Hugging Face-layout checkpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from birefnet.config import ModelParams, Params, load_params, params_to_dict
from birefnet.models import build_model, save_model
from birefnet.models.convert import convert_state_dict
from birefnet.training.init import (
    InitParamsConflict,
    InitWeightsError,
    initialize_weights,
    resolve_init_model_params,
    with_init_model_params,
)
from tests.helpers.upstream_manifest import decoder_shape, derive_pvt_v2_manifest, random_upstream_state

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
#: A small architecture far from the schema defaults, so inherited settings are visible.
TINY = ModelParams(encoder="test_convnext", attention="aspp", multiscale_input="none", squeeze_depth=2,
                   decoder_block="residual", outward_reference=False)


def manifest(variant: str) -> dict:
    return json.loads((FIXTURES / f"upstream_state_dict_{variant}.json").read_text(encoding="utf-8"))


def write_params(path: Path, doc: dict) -> Path:
    """A params file holding only ``doc`` (everything else at the schema defaults)."""
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(TINY), TINY, tmp_path_factory.mktemp("init") / "tiny.safetensors")


def upstream_meta_pth(path: Path, keys: dict[str, list[int]]) -> Path:
    """An upstream-layout ``torch.save`` file of meta tensors: the shapes of a real checkpoint, no data."""
    torch.save({k: torch.empty(shape, device="meta") for k, shape in keys.items()}, path)
    return path


def test_without_init_from_the_model_block_is_used_as_is() -> None:
    params = Params(model=ModelParams(encoder="resnet10t", attention="none"))
    assert resolve_init_model_params(params) is params.model
    assert with_init_model_params(params) is params


def test_settings_taken_from_our_file(tmp_path: Path, tiny_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A params file without a model block trains the file's architecture, and the log says so."""
    params = load_params(write_params(tmp_path / "params.yaml", {"train": {"init_from": str(tiny_file)}}))
    with caplog.at_level(logging.INFO, logger="birefnet.train"):
        resolved = resolve_init_model_params(params)
    assert resolved == TINY
    message = next(r.getMessage() for r in caplog.records if "model settings taken from" in r.getMessage())
    assert str(tiny_file) in message and "encoder='test_convnext'" in message and "squeeze_depth=2" in message
    # a Ray worker revalidates the resolved params from a dict (every key explicit): the same model, no conflict
    worker = Params.model_validate(params_to_dict(with_init_model_params(params)))
    assert resolve_init_model_params(worker, announce=False) == TINY


def test_runtime_keys_may_differ(tmp_path: Path, tiny_file: Path) -> None:
    layout = {k: v for k, v in TINY.model_dump(mode="json").items()}
    model = {**layout, "deform_impl": "torchvision", "gradient_checkpointing": True, "drop_path_rate": 0.05,
             "encoder_weights": str(tmp_path / "imagenet.pth")}
    params = load_params(write_params(tmp_path / "params.yaml", {"model": model,
                                                                 "train": {"init_from": str(tiny_file)}}))
    resolved = resolve_init_model_params(params)
    assert resolved == TINY.model_copy(update={"deform_impl": "torchvision", "gradient_checkpointing": True,
                                               "drop_path_rate": 0.05})
    assert resolved.encoder_weights is None  # never read: the file sets every weight


def test_conflicting_model_values_are_refused(tmp_path: Path, tiny_file: Path) -> None:
    model = {"encoder": "resnet10t", "attention": "aspp", "squeeze_depth": 1, "decoder_block": "residual"}
    params = load_params(write_params(tmp_path / "params.yaml", {"model": model,
                                                                 "train": {"init_from": str(tiny_file)}}))
    with pytest.raises(InitParamsConflict) as info:
        resolve_init_model_params(params)
    text = str(info.value)
    assert str(tiny_file) in text and "2 model value(s)" in text
    assert "model.encoder: params 'resnet10t', file 'test_convnext'" in text
    assert "model.squeeze_depth: params 1, file 2" in text
    assert "model.attention" not in text and "model.decoder_block" not in text  # equal values are fine


def test_train_stage_exits_2_on_conflict_before_ray(tmp_path: Path, tiny_file: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.stages.train import main

    params = write_params(tmp_path / "params.yaml", {
        "model": {"encoder": "resnet10t"},
        "train": {"init_from": str(tiny_file), "storage_path": str(tmp_path / "checkpoints")},
        "shard": {"out": str(tmp_path / "shards")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })
    assert main(["--params", str(params), "-q"]) == 2
    err = capsys.readouterr().err
    assert "model.encoder: params 'resnet10t', file 'test_convnext'" in err
    # it failed before anything started: no shards were needed, no run was tracked, no checkpoint folder made
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


def test_train_stage_exits_3_for_a_missing_or_foreign_init_file(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from birefnet.stages.train import main

    foreign = tmp_path / "foreign.safetensors"
    save_file({"features.0.weight": torch.zeros(2)}, str(foreign))
    for source, expected in ((tmp_path / "missing.safetensors", "not found"),
                             (foreign, "not a BiRefNet state dict")):
        params = write_params(tmp_path / "params.yaml", {"train": {"init_from": str(source)},
                                                         "tracking": {"uri": f"sqlite:///{tmp_path / 'm.db'}"}})
        assert main(["--params", str(params), "-q"]) == 3
        err = capsys.readouterr().err
        assert str(source) in err and expected in err


def test_upstream_checkpoint_settings_inferred(tmp_path: Path) -> None:
    """An upstream .pth is read by shape; the repository's embedded default (resnet10t) conflicts with it, a
    model block naming the published lite model (or none) takes the rest from the file."""
    source = upstream_meta_pth(tmp_path / "BiRefNet_lite-general-epoch_1.pth", manifest("swin_v1_t")["keys"])
    params = load_params(write_params(tmp_path / "p.yaml", {"model": {"encoder": "swin_v1_t"},
                                                            "train": {"init_from": str(source)}}))
    assert resolve_init_model_params(params) == ModelParams(encoder="swin_v1_t")

    embedded = load_params(REPO / "params.yaml", [f"train.init_from={source}"])
    with pytest.raises(InitParamsConflict) as info:
        resolve_init_model_params(embedded)
    text = str(info.value)
    for line in ("model.encoder: params 'resnet10t', file 'swin_v1_t'", "model.multiscale_input: params 'none', "
                 "file 'cat'", "model.attention: params 'none', file 'aspp_deformable'"):
        assert line in text
    assert "model.deform_impl" not in text and "model.drop_path_rate" not in text  # runtime keys


def test_upstream_multiscale_add_is_accepted_where_the_file_cannot_tell(tmp_path: Path) -> None:
    """Upstream 'add' and 'none' have the same tensors: an explicit 'add' is kept, 'cat' is a conflict."""
    reference = manifest("swin_v1_t")
    single = [768, 384, 192, 96]  # swin_v1_t lateral channels without the 'cat' doubling
    keys = {k: s if k.startswith("bb.") else decoder_shape(k, s, single) for k, s in reference["keys"].items()}
    source = upstream_meta_pth(tmp_path / "add.pth", keys)
    omitted = load_params(write_params(tmp_path / "a.yaml", {"train": {"init_from": str(source)}}))
    assert resolve_init_model_params(omitted).multiscale_input == "none"
    add = load_params(write_params(tmp_path / "b.yaml", {"model": {"multiscale_input": "add"},
                                                         "train": {"init_from": str(source)}}))
    resolved = resolve_init_model_params(add)
    assert resolved == ModelParams(encoder="swin_v1_t", multiscale_input="add")
    worker = Params.model_validate(params_to_dict(with_init_model_params(add)))
    assert resolve_init_model_params(worker, announce=False).multiscale_input == "add"
    with torch.device("meta"):
        model = build_model(resolved)
    converted = convert_state_dict({k: torch.empty(s, device="meta") for k, s in keys.items()})
    model.load_state_dict(converted, strict=True, assign=True)  # the shapes fit 'add'
    cat = load_params(write_params(tmp_path / "c.yaml", {"model": {"multiscale_input": "cat"},
                                                         "train": {"init_from": str(source)}}))
    with pytest.raises(InitParamsConflict, match="model.multiscale_input: params 'cat', file 'none'"):
        resolve_init_model_params(cat)


def test_hugging_face_safetensors_initialises_the_model_on_the_fly(tmp_path: Path) -> None:
    """An upstream-layout model.safetensors (fp16, PVT-v2 b0) as init_from: params inferred, weights converted."""
    doc = derive_pvt_v2_manifest("pvt_v2_b0", manifest("swin_v1_t"))
    generator = torch.Generator().manual_seed(0)
    stored = {}
    for key, shape in doc["keys"].items():
        if key.endswith("num_batches_tracked"):
            stored[key] = torch.tensor(5)
        else:
            stored[key] = (torch.rand(shape, generator=generator) + 0.5).half()
    source = tmp_path / "model.safetensors"
    save_file(stored, str(source), metadata={"format": "pt"})
    params = load_params(write_params(tmp_path / "p.yaml", {"train": {"init_from": str(source)}}))
    resolved = resolve_init_model_params(params)
    assert resolved == ModelParams(encoder="pvt_v2_b0")
    model = build_model(resolved)
    report = initialize_weights(model, str(source))
    assert report.ok and report.loaded == len(model.state_dict())
    expected = convert_state_dict(stored)
    for key, value in model.state_dict().items():
        assert value.dtype == (torch.float32 if expected[key].is_floating_point() else expected[key].dtype), key
        assert torch.equal(value, expected[key].to(value.dtype)), key


def test_initialize_weights_rejects_another_architecture(tmp_path: Path, tiny_file: Path) -> None:
    model = build_model(TINY.model_copy(update={"squeeze_depth": 1}))
    with pytest.raises(InitWeightsError, match=r"not in the model: squeeze\.1\."):
        initialize_weights(model, str(tiny_file))


@pytest.mark.slow
def test_registered_model_source(tmp_path: Path, tiny_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``models:/NAME@champion`` resolves against the params' tracking URI, not the process-wide one (a Ray
    worker's is ``./mlflow.db``)."""
    import mlflow

    from birefnet import registry
    from tests.registry.conftest import make_params, unique_name, workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = unique_name()
    ws = workspace(tmp_path / "ws", tiny_file, "a", sm=0.7)
    (ws / "data" / "shards" / "test").mkdir(parents=True)
    (ws / "data" / "shards" / "test" / "index.json").write_text('{"shards": []}', encoding="utf-8")
    uri = f"sqlite:///{(ws / 'mlflow.db').resolve()}"
    registry.register(make_params(name, uri=uri), base=ws)
    # the process-wide URIs point at another store, as a Ray worker's default ./mlflow.db does
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    other = f"sqlite:///{elsewhere / 'mlflow.db'}"
    mlflow.set_tracking_uri(other)
    mlflow.set_registry_uri(other)
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # set_*_uri export them; they outrank params
        monkeypatch.delenv(variable, raising=False)
    doc = {k: v for k, v in params_to_dict(make_params(name, uri=uri)).items() if k != "model"}  # no model block
    params = Params.model_validate({**doc, "train": {"init_from": f"models:/{name}@champion"}})
    assert resolve_init_model_params(params) == TINY
    model = build_model(resolve_init_model_params(params, announce=False))
    assert initialize_weights(model, f"models:/{name}@champion", uri).ok
    assert not (elsewhere / "mlflow.db").exists()  # the process-wide store was never opened


@pytest.mark.slow
def test_finetune_recipe_one_step_from_a_converted_hugging_face_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README recipe on CPU with a stand-in: an upstream-layout swin_v1_t model.safetensors (random weights,
    the published 'lite' architecture) -> convert-upstream -> configs/finetune-general.yaml with train.init_from
    -> one training step through the train stage (1 Ray worker, 64x64). The result keeps the file's architecture
    and starts from its weights."""
    from safetensors.torch import load_file

    from birefnet.commands.convert_upstream import main as convert
    from birefnet.stages import gradients, ingest, shard, synthesize
    from birefnet.stages.train import run

    upstream = random_upstream_state(manifest("swin_v1_t"))
    hf_file = tmp_path / "hf" / "model.safetensors"
    hf_file.parent.mkdir()
    save_file(upstream, str(hf_file), metadata={"format": "pt"})
    converted = tmp_path / "models" / "upstream" / "birefnet-lite.safetensors"
    assert convert([str(hf_file), str(converted)]) == 0

    preset = REPO / "configs" / "finetune-general.yaml"
    small = {
        "data.root": str(tmp_path / "data" / "synthetic"), "data.synthetic.out": str(tmp_path / "data" / "synthetic"),
        "data.size": "[64, 64]", "data.workers": "1", "data.train_sets": "[DIS-TR]", "data.val_sets": "[DIS-VD]",
        "register.selection_sets": "[DIS-VD]",
        "data.test_sets": "[DIS-TE1]", "data.synthetic.counts": "{DIS-TR: 4, DIS-VD: 2, DIS-TE1: 1}",
        "data.synthetic.min_side": "64", "data.synthetic.max_side": "96", "data.on_bad_sample": "fail",
        "data.prepared": str(tmp_path / "prepared"), "gradients.out": str(tmp_path / "gradients"),
        "shard.out": str(tmp_path / "shards"),
        "loader.batch_size": "2", "loader.workers": "0", "loader.epoch_batches": "1", "loader.shuffle_buffer": "0",
        "train.use_gpu": "false", "train.num_workers": "1", "train.cpus_per_worker": "1",
        "train.threads_per_worker": "2", "train.memory_preset": "none", "train.warmup_epochs": "0",
        "train.stages": "[{name: main, epochs: 1, loss: {bce: 30, iou: 0.5, ssim: 10, mae: 100, ce: 0, "
                        "gradient: 1}}]",
        "train.out": str(tmp_path / "out"), "train.storage_path": str(tmp_path / "checkpoints"),
        "train.run_name": "finetune-recipe", "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.artifact_location": str(tmp_path / "mlartifacts"),
        # the stand-in is the lite model: name its encoder; runtime keys may differ from the file
        "model.encoder": "swin_v1_t", "model.deform_impl": "sampling",
        "train.init_from": str(converted),
    }
    overrides = [f"{k}={v}" for k, v in small.items()]
    args = ["--params", str(preset), "-q"] + [a for o in overrides for a in ("--set", o)]
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(args) == 0, module.__name__
        params = load_params(preset, overrides)
        with caplog.at_level(logging.INFO, logger="birefnet.train"):
            summary = run(params)
    finally:
        os.chdir(old)
    assert any("model settings taken from" in r.getMessage() and str(converted) in r.getMessage()
               for r in caplog.records)
    assert summary["history"][0]["global_step"] == 1
    out = tmp_path / "out" / "model.safetensors"
    from birefnet.models.io import read_model_config

    assert read_model_config(out) == ModelParams(encoder="swin_v1_t", deform_impl="sampling").to_config()
    start, trained = load_file(str(converted)), load_file(str(out))
    assert set(start) == set(trained)
    weights = [k for k in start if start[k].is_floating_point() and "running_" not in k]
    changed = [k for k in weights if not torch.equal(start[k], trained[k])]
    drift = max((start[k] - trained[k]).abs().max().item() for k in weights)
    assert changed and drift < 1e-3  # one small step away from the converted weights, not a fresh model
