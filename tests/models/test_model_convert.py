"""Published-checkpoint compatibility: manifests of upstream's swin_v1_t / swin_v1_l state dicts and the
``convert-upstream`` round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from birefnet.config import ModelParams, ParamsError
from birefnet.models import build_model, load_model
from birefnet.models.convert import convert_key, convert_state_dict, infer_model_params, main, resolve_params
from birefnet.models.io import read_model_params

REPO = Path(__file__).resolve().parents[2]
REFERENCES = (REPO / "shared" / "reference", REPO.parent / "shared" / "reference")


def manifest(variant: str) -> dict:
    for folder in REFERENCES:
        path = folder / f"upstream_state_dict_{variant}.json"
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(f"manifest upstream_state_dict_{variant}.json not found in {[str(f) for f in REFERENCES]}")


def meta_state(doc: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in doc["keys"].items()}


@pytest.mark.parametrize("variant", ["swin_v1_t", "swin_v1_l"])
def test_manifest_loads_without_missing_or_unexpected(variant: str) -> None:
    doc = manifest(variant)
    upstream = meta_state(doc)
    inferred = infer_model_params(upstream)
    assert ModelParams(**inferred) == ModelParams(encoder=variant)  # the published configuration = our defaults
    with torch.device("meta"):
        model = build_model(ModelParams(**inferred))
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


def test_convert_upstream_cli_round_trip(tmp_path: Path) -> None:
    doc = manifest("swin_v1_t")
    generator = torch.Generator().manual_seed(0)
    upstream = {}
    for key, shape in doc["keys"].items():
        if key.endswith("num_batches_tracked"):
            upstream[key] = torch.tensor(3)
        elif key.endswith("relative_position_index"):
            upstream[key] = torch.zeros(shape, dtype=torch.long)
        elif key.endswith("running_var"):
            upstream[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            upstream[key] = torch.randn(shape, generator=generator) * 0.02
    source = tmp_path / "BiRefNet_lite-epoch_1.pth"
    torch.save({"module." + k: v for k, v in upstream.items()}, source)
    target = tmp_path / "converted.safetensors"
    assert main([str(source), str(target), "--set", "model.deform_impl=torchvision"]) == 0

    params = read_model_params(target)
    assert params == ModelParams(encoder="swin_v1_t", deform_impl="torchvision")
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
