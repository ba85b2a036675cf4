"""Published-checkpoint compatibility: manifests of upstream's swin_v1_t / swin_v1_l state dicts (dumped by running
upstream) and pvt_v2_b2 (derived from upstream's source, ``tests/helpers/upstream_manifest.py``), and the
``convert-upstream`` round trip from a release ``.pth`` and from a Hugging Face ``model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from birefnet.commands.convert_upstream import main, resolve_params
from birefnet.config import ParamsError
from birefnet.models import build_model, load_model, save_model
from birefnet.models.config import ModelConfig
from birefnet.models.convert import (
    convert_key,
    convert_state_dict,
    infer_model_params,
    read_checkpoint,
)
from birefnet.models.io import read_model_config
from tests.helpers.upstream_manifest import (
    PVT_V2,
    decoder_shape,
    derive_pvt_v2_manifest,
    lateral_channels,
    random_upstream_state,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def manifest(variant: str) -> dict:
    """An upstream state-dict manifest from tests/fixtures (copied from ../shared/reference, plus pvt_v2_b2)."""
    return json.loads((FIXTURES / f"upstream_state_dict_{variant}.json").read_text(encoding="utf-8"))


def meta_state(doc: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in doc["keys"].items()}


@pytest.fixture(scope="module")
def swin_t_upstream() -> dict[str, torch.Tensor]:
    return random_upstream_state(manifest("swin_v1_t"))


@pytest.mark.parametrize("variant", ["swin_v1_t", "swin_v1_l"])
def test_manifest_loads_without_missing_or_unexpected(variant: str) -> None:
    doc = manifest(variant)
    upstream = meta_state(doc)
    inferred = infer_model_params(upstream)
    assert ModelConfig(**inferred) == ModelConfig(encoder=variant)  # the published configuration = our defaults
    with torch.device("meta"):
        model = build_model(ModelConfig(**inferred))
    converted = convert_state_dict(upstream)
    ours = model.state_dict()
    assert sorted(set(ours) - set(converted)) == []
    assert sorted(set(converted) - set(ours)) == []
    assert [k for k in ours if tuple(ours[k].shape) != tuple(converted[k].shape)] == []
    model.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == doc["num_params"]
    dropped = [k for k in upstream if k.endswith("relative_position_index")]
    assert len(converted) == len(upstream) - len(dropped)


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("module.bb.layers.0.downsample.reduction.weight", "encoder.model.layers.1.downsample.reduction.weight"),
        ("_orig_mod.bb.norm3.bias", "encoder.norms.3.bias"),
        ("bb.layers.2.blocks.5.attn.qkv.weight", "encoder.model.layers.2.blocks.5.attn.qkv.weight"),
        ("bb.layers.0.blocks.0.attn.relative_position_index", None),
        ("decoder.ipt_blk5.conv1.weight", "decoder.image_blocks.0.conv_in.weight"),
        ("decoder.ipt_blk1.conv_out.bias", "decoder.image_blocks.4.conv_out.bias"),
        (
            "decoder.decoder_block1.dec_att.aspp_deforms.2.atrous_conv.offset_conv.weight",
            "decoder.blocks.3.attention.branches.3.conv.offset.weight",
        ),
        (
            "squeeze_module.0.dec_att.aspp1.atrous_conv.regular_conv.weight",
            "squeeze.0.attention.branches.0.conv.conv.weight",
        ),
        (
            "decoder.decoder_block4.dec_att.global_avg_pool.2.running_var",
            "decoder.blocks.0.attention.pool.bn.running_var",
        ),
        (
            "decoder.decoder_block4.dec_att.aspp3.atrous_conv.weight",
            "decoder.blocks.0.attention.branches.2.conv.weight",
        ),
        ("decoder.decoder_block3.conv_resi.weight", "decoder.blocks.1.conv_residual.weight"),
        ("decoder.gdt_convs_2.1.running_mean", "decoder.gradient_heads.2.trunk.1.running_mean"),
        ("decoder.gdt_convs_attn_4.0.weight", "decoder.gradient_heads.0.attention.weight"),
        ("decoder.conv_out1.0.weight", "decoder.final_head.weight"),
        ("decoder.conv_ms_spvn_3.bias", "decoder.stage_heads.1.bias"),
        ("decoder.lateral_block2.conv.weight", "decoder.laterals.2.conv.weight"),
        ("cls_head.0.weight", "classifier.fc.weight"),
    ],
)
def test_convert_key(upstream: str, ours: str | None) -> None:
    from birefnet.models.convert import strip_wrapper_prefixes

    key = next(iter(strip_wrapper_prefixes({upstream: torch.zeros(1)})))
    assert convert_key(key) == ours


def test_convert_upstream_cli_round_trip(tmp_path: Path, swin_t_upstream: dict[str, torch.Tensor]) -> None:
    upstream = swin_t_upstream
    source = tmp_path / "BiRefNet_lite-epoch_1.pth"
    torch.save({"module." + k: v for k, v in upstream.items()}, source)
    target = tmp_path / "converted.safetensors"
    assert main([str(source), str(target), "--set", "model.deform_impl=torchvision"]) == 0

    config = read_model_config(target)
    assert config == ModelConfig(encoder="swin_v1_t", deform_impl="torchvision")
    model = load_model(target)
    expected = convert_state_dict(upstream)
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 1, 64, 64) and torch.isfinite(out.logits).all()


def test_overrides_must_be_model_keys() -> None:
    with pytest.raises(ParamsError, match="model"):
        resolve_params({"encoder": "swin_v1_t"}, ["train.lr=1"])
    with pytest.raises(ParamsError, match="attention"):
        resolve_params({"encoder": "swin_v1_t"}, ["model.attention=bogus"])


def test_cli_missing_file(tmp_path: Path) -> None:
    assert main([str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors")]) == 2


@pytest.mark.parametrize(
    ("upstream", "ours"),
    [
        ("bb.patch_embed1.proj.weight", "encoder.model.patch_embed.proj.weight"),
        ("bb.patch_embed2.norm.bias", "encoder.model.stages_1.downsample.norm.bias"),
        ("bb.patch_embed4.proj.weight", "encoder.model.stages_3.downsample.proj.weight"),
        ("bb.block1.0.attn.sr.weight", "encoder.model.stages_0.blocks.0.attn.sr.weight"),
        ("bb.block3.5.attn.kv.bias", "encoder.model.stages_2.blocks.5.attn.kv.bias"),
        ("bb.block4.2.mlp.dwconv.dwconv.weight", "encoder.model.stages_3.blocks.2.mlp.dwconv.weight"),
        ("bb.norm1.weight", "encoder.model.stages_0.norm.weight"),
        ("bb.norm4.bias", "encoder.model.stages_3.norm.bias"),
        ("decoder.ipt_blk5.conv1.weight", "decoder.image_blocks.0.conv_in.weight"),
    ],
)
def test_convert_key_pvt_v2(upstream: str, ours: str) -> None:
    assert convert_key(upstream, "pvt_v2") == ours


def test_swin_and_pvt_output_norms_differ() -> None:
    """Swin's bb.norm0..3 are the extra output norms; PVT's bb.norm1..4 are the stage norms timm keeps."""
    assert convert_key("bb.norm1.weight", "swin") == "encoder.norms.1.weight"
    assert convert_key("bb.norm1.weight", "pvt_v2") == "encoder.model.stages_0.norm.weight"


@pytest.mark.parametrize("variant", ["swin_v1_t", "swin_v1_l"])
def test_decoder_shape_formulas_reproduce_the_reference_manifests(variant: str) -> None:
    """The formulas the pvt_v2_b2 manifest is derived with give upstream's own decoder shapes for both Swin
    manifests, starting from swin_v1_t's (so they are checked against upstream's output, not our model)."""
    reference, target = manifest("swin_v1_t"), manifest(variant)
    channels = lateral_channels(target)
    decoder = {k: s for k, s in target["keys"].items() if not k.startswith("bb.")}
    assert list(decoder) == [k for k in reference["keys"] if not k.startswith("bb.")]
    assert {k: decoder_shape(k, reference["keys"][k], channels) for k in decoder} == decoder


def test_pvt_v2_b2_fixture_is_the_derived_manifest() -> None:
    doc = manifest("pvt_v2_b2")
    assert doc == json.loads(json.dumps(derive_pvt_v2_manifest("pvt_v2_b2", manifest("swin_v1_t"))))
    assert doc["config"]["lateral_channels_in_collection"] == [1024, 640, 256, 128]  # [512, 320, 128, 64] x2 (cat)
    assert round(doc["num_params"] / 1e6, 1) == 39.7  # upstream-spec §2: pvt_v2_b2 BiRefNet, 39.7M parameters


def test_pvt_v2_b2_manifest_converts_strictly_on_meta() -> None:
    doc = manifest("pvt_v2_b2")
    upstream = meta_state(doc)
    inferred = infer_model_params(upstream)
    assert ModelConfig(**inferred) == ModelConfig(encoder="pvt_v2_b2")  # upstream's default decoder config
    with torch.device("meta"):
        model = build_model(ModelConfig(**inferred))
    converted = convert_state_dict(upstream)
    ours = model.state_dict()
    assert sorted(set(ours) - set(converted)) == []
    assert sorted(set(converted) - set(ours)) == []
    assert [k for k in ours if tuple(ours[k].shape) != tuple(converted[k].shape)] == []
    model.load_state_dict(converted, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == doc["num_params"]
    assert len(converted) == len(upstream)  # PVT-v2 has no buffer that timm drops


@pytest.mark.parametrize("variant", sorted(PVT_V2))
def test_infer_model_params_pvt_v2_variants(variant: str) -> None:
    doc = derive_pvt_v2_manifest(variant, manifest("swin_v1_t"))
    upstream = meta_state(doc)
    assert infer_model_params(upstream)["encoder"] == variant
    with torch.device("meta"):
        model = build_model(ModelConfig(encoder=variant))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in convert_state_dict(upstream).items()} == ours


def test_infer_rejects_unknown_pvt_depths() -> None:
    doc = derive_pvt_v2_manifest("pvt_v2_b2", manifest("swin_v1_t"))
    upstream = {k: v for k, v in meta_state(doc).items() if not k.startswith("bb.block3.5.")}
    with pytest.raises(ValueError, match=r"depths \[3, 4, 5, 3\]"):
        infer_model_params(upstream)


@pytest.mark.parametrize(
    ("name", "prefix", "dtype"),
    [("model.safetensors", "", torch.float16), ("weights.bin", "birefnet.", torch.float32)],
    ids=["hugging-face-fp16", "other-extension-shared-prefix"],
)
def test_convert_upstream_reads_safetensors_by_content(
    tmp_path: Path, swin_t_upstream: dict[str, torch.Tensor], name: str, prefix: str, dtype: torch.dtype
) -> None:
    """A Hugging Face model.safetensors (upstream key names, fp16 here) converts like the .pth; the format is read
    from the file, so another extension or a prefix shared by every key does not matter."""
    stored = {prefix + k: v.to(dtype) if v.is_floating_point() else v for k, v in swin_t_upstream.items()}
    source = tmp_path / name
    save_file(stored, str(source), metadata={"format": "pt"})
    target = tmp_path / "converted.safetensors"
    assert main([str(source), str(target)]) == 0

    assert read_model_config(target) == ModelConfig(encoder="swin_v1_t")
    with safe_open(str(target), framework="pt") as handle:
        assert handle.metadata()["birefnet.source_format"] == "upstream-safetensors"
        stored_dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert stored_dtypes == {"F32", "I64"}  # fp16 weights are widened: training keeps float32 master weights
    state = load_model(target).state_dict()
    expected = convert_state_dict({k: v for k, v in stored.items()})
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype), key
        assert torch.equal(state[key], value.float() if value.is_floating_point() else value), key


def test_convert_upstream_refuses_our_own_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ModelConfig(encoder="test_convnext", attention="none", multiscale_input="none")
    ours = save_model(build_model(config), tmp_path / "ours.safetensors")
    assert read_checkpoint(ours, shapes_only=True).layout == "birefnet"
    assert main([str(ours), str(tmp_path / "again.safetensors")]) == 3
    err = capsys.readouterr().err
    assert "already a birefnet checkpoint" in err and "needs no conversion" in err
    assert not (tmp_path / "again.safetensors").exists()


def test_convert_upstream_rejects_foreign_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not weights", encoding="utf-8")
    assert main([str(text), str(tmp_path / "a.safetensors")]) == 3
    assert "neither a torch.save file" in capsys.readouterr().err
    other = tmp_path / "model.safetensors"
    save_file({"features.0.weight": torch.zeros(2, 2)}, str(other))
    assert main([str(other), str(tmp_path / "b.safetensors")]) == 3
    assert "not a BiRefNet state dict" in capsys.readouterr().err
