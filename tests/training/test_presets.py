"""The params presets in configs/: each validates, builds its full-size model on the meta device, and trains one
step of its own configuration (encoder, losses, stages, optimiser) through the real train stage on 2 Ray workers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from birefnet.config import load_params

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
#: What differs for the CPU run: the embedded synthetic data at 64x64, CPU workers, one batch per epoch.
SMALL_RUN = {
    "data.root": "data/synthetic", "data.size": "[64, 64]", "data.workers": "1",
    "data.train_sets": "[DIS-TR]", "data.val_sets": "[DIS-VD]", "data.test_sets": "[DIS-TE1]",
    "register.selection_sets": "[DIS-VD]",
    "data.synthetic.counts": "{DIS-TR: 4, DIS-VD: 2, DIS-TE1: 1}", "data.synthetic.min_side": "64",
    "data.synthetic.max_side": "96", "data.on_bad_sample": "fail",
    "loader.batch_size": "2", "loader.workers": "0", "loader.epoch_batches": "1", "loader.shuffle_buffer": "0",
    "train.use_gpu": "false", "train.num_workers": "2", "train.cpus_per_worker": "1", "train.threads_per_worker": "1",
    "train.memory_preset": "none", "train.checkpoint_every": "1", "train.keep_checkpoints": "1", "train.val_every": "1",
    "train.bn_recalibration": "0", "model.deform_impl": "sampling", "model.encoder_weights": "null",
}


def test_presets_exist() -> None:
    assert {p.name for p in PRESETS} >= {"paper-dis5k.yaml", "general.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_builds_full_model_on_meta(preset: Path) -> None:
    import torch

    from birefnet.models import build_model

    params = load_params(preset)
    assert params.data.size[0] >= 1024 and params.train.use_gpu
    with torch.device("meta"):
        model = build_model(params.model)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 200_000_000  # Swin-L BiRefNet (about 220 M)


def test_paper_preset_states_the_paper_settings() -> None:
    params = load_params(REPO / "configs" / "paper-dis5k.yaml")
    assert (params.model.encoder, tuple(params.data.size)) == ("swin_v1_l", (1024, 1024))
    assert (params.train.optimizer, params.train.lr, tuple(params.train.betas)) == ("adam", 1e-5, (0.9, 0.99))
    assert (params.loader.batch_size, params.train.num_workers, params.loader.augment) == (4, 4, ["flip"])
    assert [(s.name, s.epochs) for s in params.train.stages] == [("main", 780), ("finetune_region", 20)]
    main, finetune = params.train.stages
    assert (main.loss.bce, main.loss.iou, main.loss.ssim, main.loss.ce) == (30, 0.5, 10, 5)
    assert finetune.loss.bce == 0 and finetune.loss.iou > 0
    model = params.model
    assert (model.multiscale_input, model.attention, model.context_levels) == ("cat", "aspp_deformable", 3)
    assert model.inward_reference and model.outward_reference and model.multistage_supervision
    assert model.auxiliary_classification


def _one_step_overrides(preset: Path, workspace: Path) -> list[str]:
    params = load_params(preset)
    stages = [{"name": s.name, "epochs": 1, "loss": s.loss.model_dump(), "decay": dict(s.decay),
               "supervise": s.supervise} for s in params.train.stages]
    overrides = {**SMALL_RUN, "train.stages": yaml.safe_dump(stages, default_flow_style=True).strip(),
                 "train.out": str(workspace / "models"), "train.storage_path": str(workspace / "checkpoints"),
                 "train.run_name": f"preset-{preset.stem}", "data.prepared": str(workspace / "prepared"),
                 "data.synthetic.out": str(workspace / "data" / "synthetic"),
                 "data.root": str(workspace / "data" / "synthetic"),
                 "gradients.out": str(workspace / "gradients"), "shard.out": str(workspace / "shards"),
                 "tracking.uri": f"sqlite:///{workspace / 'mlflow.db'}",
                 "tracking.artifact_location": str(workspace / "mlartifacts")}
    return [f"{k}={v}" for k, v in overrides.items()]


@pytest.fixture
def drop_swin_l_weights(tmp_path: Path) -> Iterator[None]:
    """Remove the run's weights and checkpoints when a test ends: Swin-L weights with their Adam state are 2.6 GB
    a copy, and the CI machine's disk is shared (pytest keeps every test's folder until later runs). The tracking
    database stays: MLflow keeps its connection to it open for the rest of the session."""
    yield
    for name in ("models", "checkpoints"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_trains_one_step_per_stage_on_two_ray_workers(preset: Path, tmp_path: Path,
                                                             drop_swin_l_weights: None) -> None:
    from birefnet.stages import gradients, ingest, shard, synthesize
    from birefnet.stages.train import run

    overrides = _one_step_overrides(preset, tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(preset.read_text(encoding="utf-8"), encoding="utf-8")
    args = ["--params", str(params_file), "-q"] + [a for o in overrides for a in ("--set", o)]
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        for module in (synthesize, ingest, gradients, shard):
            assert module.main(args) == 0, module.__name__
        params = load_params(params_file, overrides)
        summary = run(params)
    finally:
        os.chdir(old)
    preset_params = load_params(preset)
    history = summary["history"]
    assert [h["stage"] for h in history] == [s.name for s in preset_params.train.stages]
    assert all(h["global_step"] == i + 1 for i, h in enumerate(history))  # one step per epoch
    for h in history:
        assert h["train_loss"] == h["train_loss"] and 0.0 <= h["val_Sm"] <= 1.0  # finite loss, valid S-measure
    assert (tmp_path / "models" / "model.safetensors").is_file()
    import birefnet

    model = birefnet.load_model(tmp_path / "models" / "model.safetensors")
    assert model.encoder.out_channels == (192, 384, 768, 1536)  # the preset's Swin-L, not a stand-in


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_has_every_param_dvc_yaml_lists(preset: Path) -> None:
    """DVC refuses to run a stage whose listed param is missing from params.yaml: a preset copied there must
    carry every key dvc.yaml names (the schema default is not enough)."""
    doc = yaml.safe_load(preset.read_text(encoding="utf-8"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    missing = []
    for name, stage in stages.items():
        for key in stage.get("params") or []:
            node = doc
            for part in str(key).split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{key} (stage {name})")
                    break
                node = node[part]
    assert not missing, f"{preset.name} lacks params that dvc.yaml lists: {missing}"
