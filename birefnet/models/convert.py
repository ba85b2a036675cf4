"""Convert published upstream BiRefNet checkpoints (``.pth``) to this package's layout.

``convert_state_dict`` is a pure function from an upstream state dict to ours (the key map is
``KEY_RULES``); ``infer_model_params`` reads the architecture switches back from tensor shapes;
``main`` is the ``birefnet convert-upstream IN.pth OUT.safetensors [--set model.key=value]`` command.

Upstream (ZhengPeng7/BiRefNet, Zheng et al., CAAI AIR 2024) keys differ from ours in three ways: names
(``decoder.ipt_blk5`` -> ``decoder.image_blocks.0``, ``dec_att`` -> ``attention``, ...), the Swin
encoder's layout (upstream's ``layers.i.downsample`` is timm's ``layers.(i+1).downsample``; upstream's
output LayerNorms ``norm0..3`` are our ``encoder.norms.0..3``), and buffers timm does not persist
(``relative_position_index``), which are dropped. Only Swin encoders are supported (every published
checkpoint uses one).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from birefnet.config import ModelParams, ParamsError, apply_overrides, format_validation_error

#: Prefixes added by DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Keys present in upstream's state dict that our model does not persist.
DROPPED_SUFFIXES = ("relative_position_index", "attn_mask")

_STAGE = {"4": "0", "3": "1", "2": "2"}
_INWARD = {"5": "0", "4": "1", "3": "2", "2": "3", "1": "4"}
_DECODER = {"4": "0", "3": "1", "2": "2", "1": "3"}
_LATERAL = {"4": "0", "3": "1", "2": "2"}

#: Ordered (pattern, replacement) rules; each key is rewritten by every matching rule in turn.
KEY_RULES: tuple[tuple[str, Any], ...] = (
    # encoder (Swin)
    (r"^bb\.layers\.(\d+)\.downsample\.", lambda m: f"encoder.model.layers.{int(m[1]) + 1}.downsample."),
    (r"^bb\.norm(\d)\.", r"encoder.norms.\1."),
    (r"^bb\.", "encoder.model."),
    # localization module
    (r"^squeeze_module\.", "squeeze."),
    (r"^cls_head\.0\.", "classifier.fc."),
    # decoder stages
    (r"^decoder\.ipt_blk(\d)\.conv1\.", lambda m: f"decoder.image_blocks.{_INWARD[m[1]]}.conv_in."),
    (r"^decoder\.ipt_blk(\d)\.", lambda m: f"decoder.image_blocks.{_INWARD[m[1]]}."),
    (r"^decoder\.decoder_block(\d)\.", lambda m: f"decoder.blocks.{_DECODER[m[1]]}."),
    (r"^decoder\.lateral_block(\d)\.", lambda m: f"decoder.laterals.{_LATERAL[m[1]]}."),
    (r"^decoder\.conv_out1\.0\.", "decoder.final_head."),
    (r"^decoder\.conv_ms_spvn_(\d)\.", lambda m: f"decoder.stage_heads.{_STAGE[m[1]]}."),
    (r"^decoder\.gdt_convs_pred_(\d)\.0\.", lambda m: f"decoder.gradient_heads.{_STAGE[m[1]]}.prediction."),
    (r"^decoder\.gdt_convs_attn_(\d)\.0\.", lambda m: f"decoder.gradient_heads.{_STAGE[m[1]]}.attention."),
    (r"^decoder\.gdt_convs_(\d)\.", lambda m: f"decoder.gradient_heads.{_STAGE[m[1]]}.trunk."),
    # inside decoder / squeeze blocks
    (r"\.conv_resi\.", ".conv_residual."),
    (r"\.dec_att\.aspp_deforms\.(\d+)\.", lambda m: f".attention.branches.{int(m[1]) + 1}."),
    (r"\.dec_att\.aspp(\d)\.", lambda m: f".attention.branches.{int(m[1]) - 1}."),
    (r"\.dec_att\.global_avg_pool\.1\.", ".attention.pool.conv."),
    (r"\.dec_att\.global_avg_pool\.2\.", ".attention.pool.bn."),
    (r"\.dec_att\.conv1\.", ".attention.project."),
    (r"\.dec_att\.bn1\.", ".attention.project_bn."),
    (r"\.atrous_conv\.offset_conv\.", ".conv.offset."),
    (r"\.atrous_conv\.modulator_conv\.", ".conv.modulator."),
    (r"\.atrous_conv\.regular_conv\.", ".conv.conv."),
    (r"\.atrous_conv\.", ".conv."),
)
_COMPILED = tuple((re.compile(p), r) for p, r in KEY_RULES)

#: Swin variant by (embed dim, depth of stage 3, window).
_SWIN_BY_SHAPE = {
    (96, 6, 7): "swin_v1_t",
    (96, 18, 7): "swin_v1_s",
    (128, 18, 12): "swin_v1_b",
    (192, 18, 12): "swin_v1_l",
}


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def convert_key(key: str) -> str | None:
    """Our name for one upstream key (already without wrapper prefixes), or None if it is dropped."""
    if key.endswith(DROPPED_SUFFIXES):
        return None
    for pattern, replacement in _COMPILED:
        key = pattern.sub(replacement, key)
    return key


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an upstream BiRefNet state dict onto this package's model (pure; tensors are not copied).

    Args:
        state_dict: upstream keys (``bb.*``, ``squeeze_module.*``, ``decoder.*``, ...), optionally with
            ``module.`` / ``_orig_mod.`` prefixes.

    Returns:
        Our keys -> the same tensors; ``relative_position_index`` buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        new_key = convert_key(key)
        if new_key is not None:
            if new_key in out:
                raise ValueError(f"two upstream keys map onto {new_key!r}")
            out[new_key] = value
    return out


def infer_model_params(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture switches read from an upstream state dict's keys and shapes.

    ``multiscale_input`` ``add`` and ``none`` have the same shapes; ``none`` is returned for both (pass
    ``--set model.multiscale_input=add`` when the checkpoint was trained with ``add``).

    Returns:
        A dict of ``ModelParams`` fields.
    """
    sd = strip_wrapper_prefixes(state_dict)
    keys = set(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not an upstream BiRefNet Swin state dict: {key!r} is missing")
        return tuple(sd[key].shape)

    embed = shape("bb.patch_embed.proj.weight")[0]
    depth3 = len({k.split(".")[4] for k in keys if k.startswith("bb.layers.2.blocks.")})
    window = int(round((shape("bb.layers.0.blocks.0.attn.relative_position_bias_table")[0] ** 0.5 + 1) / 2))
    encoder = _SWIN_BY_SHAPE.get((embed, depth3, window))
    if encoder is None:
        raise ValueError(f"unknown Swin encoder: embed dim {embed}, stage-3 depth {depth3}, window {window}")
    levels = [embed * 2**i for i in range(4)]
    shallow = shape("decoder.lateral_block2.conv.weight")[0]
    multiscale = "cat" if shallow == 2 * levels[0] else "none"
    levels = [c * (2 if multiscale == "cat" else 1) for c in levels]

    params: dict[str, Any] = {"encoder": encoder, "multiscale_input": multiscale}
    squeeze_ids = sorted({int(k.split(".")[1]) for k in keys if k.startswith("squeeze_module.")})
    if squeeze_ids:
        params["squeeze_depth"] = len(squeeze_ids)
        params["squeeze_block"] = "residual" if "squeeze_module.0.conv_resi.weight" in keys else "basic"
        fused = shape("squeeze_module.0.conv_in.weight")[1]
        context = [n for n in range(4) if levels[3] + sum(levels[3 - n : 3]) == fused]
        if not context:
            raise ValueError(f"squeeze input width {fused} matches no context_levels for levels {levels}")
        params["context_levels"] = context[0]
    else:
        params["squeeze_block"], params["context_levels"] = "none", 0
    params["decoder_block"] = "residual" if "decoder.decoder_block4.conv_resi.weight" in keys else "basic"
    if any(".dec_att.aspp_deforms." in k for k in keys):
        params["attention"] = "aspp_deformable"
    elif any(".dec_att.aspp2." in k for k in keys):
        params["attention"] = "aspp"
    else:
        params["attention"] = "none"
    inter = shape("decoder.decoder_block4.conv_in.weight")
    params["decoder_inter_channels"] = "fixed" if inter[0] == 64 else "adaptive"
    params["inward_reference"] = "decoder.ipt_blk1.conv1.weight" in keys
    if params["inward_reference"]:
        params["inward_reference_mode"] = (
            "split" if shape("decoder.ipt_blk5.conv1.weight")[1] == 3 * 32 * 32 else "resize"
        )
    params["multistage_supervision"] = "decoder.conv_ms_spvn_4.weight" in keys
    params["outward_reference"] = "decoder.gdt_convs_4.0.weight" in keys
    params["auxiliary_classification"] = "cls_head.0.weight" in keys
    if params["auxiliary_classification"]:
        params["num_classes"] = shape("cls_head.0.weight")[0]
    return params


def extract_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded ``.pth``: the mapping itself or its single ``model``/``state_dict`` entry."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a state dict, got {type(checkpoint).__name__}")
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    for key in ("state_dict", "model", "model_state_dict"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    raise ValueError("no state dict found (expected a mapping of tensors, or one under 'state_dict'/'model')")


def resolve_params(inferred: Mapping[str, Any], overrides: Sequence[str] = ()) -> ModelParams:
    """``ModelParams`` from inferred fields plus ``model.key=value`` overrides (validated)."""
    keys = []
    for text in overrides:
        if not text.split("=", 1)[0].strip().startswith("model."):
            raise ParamsError(f"override {text!r}: convert-upstream only accepts model.* keys")
        keys.append(text)
    doc = apply_overrides({"model": dict(inferred)}, keys)
    try:
        return ModelParams.model_validate(doc["model"])
    except Exception as exc:  # pydantic.ValidationError
        if hasattr(exc, "errors"):
            raise ParamsError(format_validation_error(exc, "convert-upstream")) from None  # type: ignore[arg-type]
        raise


def convert_checkpoint(
    source: str | Path, target: str | Path, overrides: Sequence[str] = ()
) -> tuple[ModelParams, Path]:
    """Read an upstream ``.pth``, convert, check it loads strictly, and write our safetensors.

    Returns:
        The resolved params and the written path.
    """
    from birefnet.models.io import save_model
    from birefnet.models.registry import build_model

    checkpoint = torch.load(str(source), map_location="cpu", weights_only=True)
    upstream = extract_state_dict(checkpoint)
    params = resolve_params(infer_model_params(upstream), overrides)
    converted = convert_state_dict(upstream)
    with torch.device("meta"):
        model = build_model(params)
    model.load_state_dict(converted, strict=True, assign=True)
    return params, save_model(model, params, target, extra={"birefnet.source": Path(source).name})


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="birefnet convert-upstream",
        description="Convert a published BiRefNet .pth (upstream layout) to a birefnet safetensors checkpoint.",
    )
    parser.add_argument("source", type=Path, help="upstream checkpoint (.pth, loaded with weights_only=True)")
    parser.add_argument("target", type=Path, help="output .safetensors")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="override an inferred model param (repeatable), e.g. --set model.deform_impl=torchvision",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.source.is_file():
        print(f"convert-upstream: {args.source}: no such file", file=sys.stderr)
        return 2
    try:
        params, path = convert_checkpoint(args.source, args.target, args.overrides)
    except (ParamsError, ValueError, RuntimeError) as exc:
        print(f"convert-upstream: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({params.encoder}, {params.model_dump_json()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
