"""Convert published upstream BiRefNet checkpoints to this package's layout.

Upstream (ZhengPeng7/BiRefNet, Zheng et al., CAAI AIR 2024) publishes its weights twice: ``.pth`` files (GitHub
releases, Google Drive) and a ``model.safetensors`` in each Hugging Face repository (``ZhengPeng7/BiRefNet``,
``BiRefNet_lite``, ...). Both hold the same state dict: upstream's key names (``bb.*``, ``squeeze_module.*``,
``decoder.*``), no prefix, some Hugging Face files in fp16. Files are told apart by their content, never by their
extension: :func:`read_checkpoint` opens the container (zip/pickle ``torch.save`` or safetensors) and
:func:`checkpoint_layout` reads the key names (and our own ``birefnet.model_params`` metadata, which needs no
conversion).

``convert_state_dict`` is a pure function from an upstream state dict to ours (``ENCODER_RULES`` for the
backbone family, then ``DECODER_RULES``); ``infer_model_params`` reads the architecture switches back from tensor
shapes; :func:`convert_checkpoint` converts a file. The ``birefnet convert-upstream IN OUT.safetensors
[--set model.key=value]`` command line is :mod:`birefnet.commands.convert_upstream`.

Upstream keys differ from ours in three ways: names (``decoder.ipt_blk5`` -> ``decoder.image_blocks.0``,
``dec_att`` -> ``attention``, ...); the encoder layout (Swin: upstream's ``layers.i.downsample`` is timm's
``layers.(i+1).downsample`` and its output LayerNorms ``norm0..3`` are our ``encoder.norms.0..3``; PVT-v2:
upstream's ``patch_embed1..4`` / ``block1..4`` / ``norm1..4`` are timm's ``patch_embed`` /
``stages_{i}.downsample`` / ``stages_{i}.blocks`` / ``stages_{i}.norm``, the facts behind timm's own
``pvt_v2.checkpoint_filter_fn``, with ``features_only``'s flattened stage names); and buffers timm does not persist
(``relative_position_index``), which are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from birefnet.models.config import ModelConfig

#: Prefixes added by DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Upstream's top-level modules (state-dict key roots).
UPSTREAM_ROOTS = ("bb.", "squeeze_module.", "decoder.", "cls_head.")
#: Keys present in upstream's state dict that our model does not persist.
DROPPED_SUFFIXES = ("relative_position_index", "attn_mask")
#: Metadata key of our own files (``birefnet.models.io.PARAMS_KEY``; repeated to keep this module import-light).
OUR_PARAMS_KEY = "birefnet.model_params"

Layout = Literal["birefnet", "upstream"]
EncoderFamily = Literal["swin", "pvt_v2"]

_STAGE = {"4": "0", "3": "1", "2": "2"}
_INWARD = {"5": "0", "4": "1", "3": "2", "2": "3", "1": "4"}
_DECODER = {"4": "0", "3": "1", "2": "2", "1": "3"}
_LATERAL = {"4": "0", "3": "1", "2": "2"}

#: Encoder key rules per backbone family: ordered (pattern, replacement), each applied in turn.
ENCODER_RULES: dict[EncoderFamily, tuple[tuple[str, Any], ...]] = {
    "swin": (
        (r"^bb\.layers\.(\d+)\.downsample\.", lambda m: f"encoder.model.layers.{int(m[1]) + 1}.downsample."),
        (r"^bb\.norm(\d)\.", r"encoder.norms.\1."),
        (r"^bb\.", "encoder.model."),
    ),
    "pvt_v2": (
        (r"^bb\.patch_embed1\.", "encoder.model.patch_embed."),
        (r"^bb\.patch_embed([234])\.", lambda m: f"encoder.model.stages_{int(m[1]) - 1}.downsample."),
        (r"^bb\.block([1-4])\.(\d+)\.", lambda m: f"encoder.model.stages_{int(m[1]) - 1}.blocks.{m[2]}."),
        (r"^bb\.norm([1-4])\.", lambda m: f"encoder.model.stages_{int(m[1]) - 1}.norm."),
        (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
    ),
}
#: Localization-module and decoder rules (the same for every backbone).
DECODER_RULES: tuple[tuple[str, Any], ...] = (
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
#: The Swin key map (kept under its historical name).
KEY_RULES: tuple[tuple[str, Any], ...] = ENCODER_RULES["swin"] + DECODER_RULES
_COMPILED = {family: tuple((re.compile(p), r) for p, r in rules + DECODER_RULES)
             for family, rules in ENCODER_RULES.items()}

#: Swin variant by (embed dim, depth of stage 3, window).
_SWIN_BY_SHAPE = {
    (96, 6, 7): "swin_v1_t",
    (96, 18, 7): "swin_v1_s",
    (128, 18, 12): "swin_v1_b",
    (192, 18, 12): "swin_v1_l",
}
#: PVT-v2 variant (timm's name = upstream's) by (embed dims, depths), from upstream's ``pvt_v2_b*`` classes.
_PVT_BY_SHAPE = {
    ((32, 64, 160, 256), (2, 2, 2, 2)): "pvt_v2_b0",
    ((64, 128, 320, 512), (2, 2, 2, 2)): "pvt_v2_b1",
    ((64, 128, 320, 512), (3, 4, 6, 3)): "pvt_v2_b2",
    ((64, 128, 320, 512), (3, 6, 40, 3)): "pvt_v2_b5",
}


@dataclass
class Checkpoint:
    """A weights file as read by :func:`read_checkpoint`.

    Attributes:
        path: the file.
        container: ``"torch"`` (``torch.save``: zip or legacy pickle) or ``"safetensors"``.
        state: key -> tensor (meta tensors with the real shapes when read with ``shapes_only``).
        metadata: the safetensors string metadata (empty for torch files).
    """

    path: Path
    container: Literal["torch", "safetensors"]
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def layout(self) -> Layout:
        """``"birefnet"`` (this package's, needs no conversion) or ``"upstream"``; see :func:`checkpoint_layout`."""
        return checkpoint_layout(self.state, self.metadata, str(self.path))


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


def _shared_prefix(keys: Sequence[str]) -> str:
    """A prefix every key carries before upstream's roots (e.g. ``model.``), or ``""`` when there is none."""
    if not keys or all(k.startswith(UPSTREAM_ROOTS) for k in keys):
        return ""
    first = keys[0]
    for at in [i for i in range(1, len(first)) if first[i - 1] == "."]:
        prefix = first[:at]
        if all(k.startswith(prefix) and k[at:].startswith(UPSTREAM_ROOTS) for k in keys):
            return prefix
    return ""


def normalize_upstream_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream keys without wrapper prefixes (``module.``, ``_orig_mod.``) or a prefix shared by every key."""
    state = strip_wrapper_prefixes(state_dict)
    prefix = _shared_prefix(list(state))
    return {k[len(prefix) :]: v for k, v in state.items()} if prefix else state


def encoder_family(keys: Sequence[str] | Mapping[str, Any]) -> EncoderFamily:
    """The backbone family of an upstream state dict (normalized keys), from its ``bb.*`` names.

    Raises:
        ValueError: a backbone this converter does not map (vgg, resnet, DINOv3), named with its first keys.
    """
    names = list(keys)
    if any(k.startswith("bb.patch_embed1.") for k in names):
        return "pvt_v2"
    if any(k.startswith("bb.layers.") for k in names):
        return "swin"
    backbone = sorted(k for k in names if k.startswith("bb."))[:3]
    raise ValueError(f"unsupported upstream backbone (keys {backbone}): convert-upstream maps Swin (swin_v1_t/s/b/l) "
                     "and PVT-v2 (pvt_v2_b0/b1/b2/b5) checkpoints")


def convert_key(key: str, family: EncoderFamily = "swin") -> str | None:
    """Our name for one upstream key (already without prefixes), or None if it is dropped."""
    if key.endswith(DROPPED_SUFFIXES):
        return None
    for pattern, replacement in _COMPILED[family]:
        key = pattern.sub(replacement, key)
    return key


def convert_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an upstream BiRefNet state dict onto this package's model (pure; tensors are not copied).

    Args:
        state_dict: upstream keys (``bb.*``, ``squeeze_module.*``, ``decoder.*``, ...) of a Swin or PVT-v2
            model, optionally with ``module.`` / ``_orig_mod.`` prefixes or one prefix shared by every key.

    Returns:
        Our keys -> the same tensors; ``relative_position_index`` buffers are dropped.
    """
    state = normalize_upstream_keys(state_dict)
    family = encoder_family(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = convert_key(key, family)
        if new_key is not None:
            if new_key in out:
                raise ValueError(f"two upstream keys map onto {new_key!r}")
            out[new_key] = value
    return out


def _encoder_params(sd: Mapping[str, torch.Tensor], shape: Any) -> tuple[str, list[int]]:
    """(our encoder name, its four output widths shallow to deep) from the ``bb.*`` shapes."""
    keys = list(sd)
    if encoder_family(keys) == "pvt_v2":
        embed = tuple(shape(f"bb.patch_embed{i}.proj.weight")[0] for i in range(1, 5))
        depths = tuple(len({k.split(".")[2] for k in keys if k.startswith(f"bb.block{i}.")}) for i in range(1, 5))
        encoder = _PVT_BY_SHAPE.get((embed, depths))
        if encoder is None:
            known = ", ".join(f"{n} {list(e)}/{list(d)}" for (e, d), n in _PVT_BY_SHAPE.items())
            raise ValueError(f"unknown PVT-v2 encoder: embed dims {list(embed)}, depths {list(depths)}; "
                             f"expected one of {known}")
        return encoder, list(embed)
    embed = shape("bb.patch_embed.proj.weight")[0]
    depth3 = len({k.split(".")[4] for k in keys if k.startswith("bb.layers.2.blocks.")})
    window = int(round((shape("bb.layers.0.blocks.0.attn.relative_position_bias_table")[0] ** 0.5 + 1) / 2))
    encoder = _SWIN_BY_SHAPE.get((embed, depth3, window))
    if encoder is None:
        raise ValueError(f"unknown Swin encoder: embed dim {embed}, stage-3 depth {depth3}, window {window}")
    return encoder, [embed * 2**i for i in range(4)]


def infer_model_params(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture switches read from an upstream state dict's keys and shapes (meta tensors suffice).

    ``multiscale_input`` ``add`` and ``none`` have the same shapes; ``none`` is returned for both (pass
    ``--set model.multiscale_input=add`` when the checkpoint was trained with ``add``).

    Returns:
        A dict of ``ModelParams`` fields.
    """
    sd = normalize_upstream_keys(state_dict)
    keys = set(sd)

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise ValueError(f"not an upstream BiRefNet state dict: {key!r} is missing")
        return tuple(sd[key].shape)

    encoder, levels = _encoder_params(sd, shape)
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


def _container(path: Path) -> Literal["torch", "safetensors"]:
    """The file format from its first bytes: zip or pickle (``torch.save``), or a safetensors JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(f"{path}: neither a torch.save file (zip or pickle) nor a safetensors file (first bytes "
                     f"{head!r}); expected an upstream BiRefNet .pth or Hugging Face model.safetensors")


def read_checkpoint(path: str | Path, *, shapes_only: bool = False) -> Checkpoint:
    """Open a weights file by its content, whatever its extension.

    Args:
        path: a ``torch.save`` file (``.pth``; loaded with ``weights_only=True``) or a safetensors file.
        shapes_only: return meta tensors with the real shapes (reads the safetensors header, or memory-maps a
            zip ``.pth``), enough for :func:`infer_model_params` without reading the weights.

    Raises:
        ValueError: the file is neither format, is truncated or damaged, or holds no state dict (named).
    """
    path = Path(path)
    container = _container(path)
    if container == "safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                if shapes_only:
                    state = {k: torch.empty(handle.get_slice(k).get_shape(), device="meta") for k in handle.keys()}
                    return Checkpoint(path, container, state, metadata)
            return Checkpoint(path, container, load_file(str(path)), metadata)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); a truncated download looks like "
                             "this: fetch it again") from None
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=shapes_only or None)
    except RuntimeError as exc:
        if shapes_only and "mmap" in str(exc):  # a legacy (non-zip) torch.save file cannot be memory-mapped
            return read_checkpoint(path)
        raise ValueError(f"{path}: not a readable torch.save file ({str(exc)[:300]})") from None
    except Exception as exc:  # unpickling errors of a damaged or foreign file
        raise ValueError(f"{path}: not a readable torch.save file ({type(exc).__name__}: {str(exc)[:300]})") from None
    try:
        state = extract_state_dict(loaded)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return Checkpoint(path, container, state, {})


def checkpoint_layout(state: Mapping[str, Any], metadata: Mapping[str, str], name: str = "checkpoint") -> Layout:
    """Whose key names a state dict uses: ``"birefnet"`` (ours, with or without metadata) or ``"upstream"``.

    Raises:
        ValueError: neither (names the first keys).
    """
    if OUR_PARAMS_KEY in metadata:
        return "birefnet"
    keys = list(normalize_upstream_keys(dict.fromkeys(state)))  # type: ignore[arg-type]
    roots = {k.split(".", 1)[0] for k in keys}
    if {"bb", "decoder"} <= roots and any(k.startswith("decoder.decoder_block") for k in keys):
        return "upstream"
    if {"encoder", "decoder"} <= roots and any(k.startswith("decoder.blocks.") for k in keys):
        return "birefnet"
    raise ValueError(f"{name}: not a BiRefNet state dict (first keys {sorted(keys)[:4]}); expected upstream's "
                     "bb.* / squeeze_module.* / decoder.decoder_block* keys or this package's encoder.* / decoder.*")


class AlreadyConvertedError(ValueError):
    """The file is in this package's layout already: it needs no conversion."""


def to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float32 (Hugging Face files may hold fp16); integer buffers unchanged."""
    return {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v for k, v in state.items()}


def resolve_config(inferred: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of inferred fields with ``overrides`` (field name -> value) applied.

    Raises:
        ModelConfigError: an unknown key or an invalid value.
    """
    return ModelConfig.from_dict({**inferred, **(overrides or {})})


#: Turns the fields :func:`infer_model_params` read into the config to build (e.g. with overrides applied).
Resolver = Callable[[Mapping[str, Any]], ModelConfig]


def upstream_config_and_state(
    checkpoint: Checkpoint, resolve: Resolver = resolve_config
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Inferred config and the converted (float32) state dict of an upstream checkpoint.

    Args:
        checkpoint: from :func:`read_checkpoint`.
        resolve: inferred fields -> config; ``functools.partial(resolve_config, overrides={...})`` overrides
            some (e.g. ``multiscale_input="add"``, which the shapes cannot tell from ``none``).

    Raises:
        AlreadyConvertedError: the file is in this package's layout.
        ValueError: not a BiRefNet checkpoint this converter maps (``ModelConfigError``: an invalid override).
    """
    if checkpoint.layout == "birefnet":
        has_params = OUR_PARAMS_KEY in checkpoint.metadata
        raise AlreadyConvertedError(
            f"{checkpoint.path} is already a birefnet checkpoint (this package's encoder.*/decoder.* keys"
            + (f" and {OUR_PARAMS_KEY!r} metadata" if has_params else "")
            + "): it needs no conversion; use it as it is (train.init_from, birefnet.load_model, predict --model)")
    config = resolve(infer_model_params(checkpoint.state))
    return config, to_float32(convert_state_dict(checkpoint.state))


def convert_checkpoint(
    source: str | Path, target: str | Path, resolve: Resolver = resolve_config
) -> tuple[ModelConfig, Path]:
    """Read an upstream checkpoint (``.pth`` or Hugging Face ``model.safetensors``), convert, check it loads
    strictly, and write our safetensors (float32, with the model config embedded).

    Args:
        source: the upstream file.
        target: the ``.safetensors`` to write.
        resolve: inferred fields -> config (see :func:`upstream_config_and_state`).

    Returns:
        The resolved config and the written path.
    """
    from birefnet.models.io import save_model
    from birefnet.models.registry import build_model

    checkpoint = read_checkpoint(source)
    config, converted = upstream_config_and_state(checkpoint, resolve)
    with torch.device("meta"):
        model = build_model(config)
    model.load_state_dict(converted, strict=True, assign=True)
    extra = {"birefnet.source": Path(source).name, "birefnet.source_format": f"upstream-{checkpoint.container}"}
    return config, save_model(model, target, extra=extra)
