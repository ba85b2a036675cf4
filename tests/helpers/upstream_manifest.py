"""State-dict manifests of upstream BiRefNet for encoders the shared reference does not cover (PVT-v2).

The reference manifests (``tests/fixtures/upstream_state_dict_swin_v1_{t,l}.json``) were written by running
upstream's code. Upstream's PVT-v2 BiRefNet could not be run here (its code needs kornia and einops), so the
PVT-v2 manifest is derived from upstream's source instead (ZhengPeng7/BiRefNet @ 25cb930):

* ``bb.*`` from ``models/backbones/pvt_v2.py``: ``PyramidVisionTransformerImpr`` registers ``patch_embed1..4``
  (``OverlapPatchEmbed``: ``proj`` Conv2d 7x7 stride 4 for the first, 3x3 stride 2 after, then ``norm``), then
  ``block1, norm1, ..., block4, norm4``; each ``Block`` holds ``norm1``, ``attn`` (``q``, ``kv``, ``proj``, and
  ``sr`` Conv2d + ``norm`` only where ``sr_ratio > 1``; ``qkv_bias=True``), ``norm2`` and ``mlp`` (``fc1``,
  ``dwconv.dwconv`` depthwise 3x3, ``fc2``). The variants' widths, depths, MLP ratios and reduction ratios are
  ``PVT_V2`` below (the ``pvt_v2_b0..b5`` classes there).
* ``squeeze_module.*`` and ``decoder.*``: the names and order of the swin_v1_t manifest (the decoder is built the
  same way for every backbone), with every channel-dependent shape recomputed by ``decoder_shape`` from
  ``lateral_channels_in_collection`` (``config.py``: pvt_v2_b1/b2/b5 ``[512, 320, 128, 64]``, b0
  ``[256, 160, 64, 32]``) doubled by ``mul_scl_ipt='cat'``. ``decoder_shape`` reproduces every squeeze and
  decoder shape of both reference manifests (swin_v1_t and swin_v1_l): ``tests/models/test_model_convert.py``
  checks that, so the formulas are tested against upstream's own output, not against this package's model.

``python -m tests.helpers.upstream_manifest`` rewrites ``tests/fixtures/upstream_state_dict_pvt_v2_b2.json``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

#: upstream variant -> (embed dims, depths, MLP ratios, spatial-reduction ratios), from upstream's pvt_v2.py.
PVT_V2: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "pvt_v2_b0": ((32, 64, 160, 256), (2, 2, 2, 2), (8, 8, 4, 4), (8, 4, 2, 1)),
    "pvt_v2_b1": ((64, 128, 320, 512), (2, 2, 2, 2), (8, 8, 4, 4), (8, 4, 2, 1)),
    "pvt_v2_b2": ((64, 128, 320, 512), (3, 4, 6, 3), (8, 8, 4, 4), (8, 4, 2, 1)),
    "pvt_v2_b5": ((64, 128, 320, 512), (3, 6, 40, 3), (4, 4, 4, 4), (8, 4, 2, 1)),
}
#: Buffers (not parameters) among upstream's state-dict entries.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index")


def pvt_v2_encoder_keys(variant: str) -> dict[str, list[int]]:
    """Upstream's ``bb.*`` entries and shapes for a PVT-v2 variant, in upstream's registration order."""
    embed, depths, mlp_ratios, sr_ratios = PVT_V2[variant]
    keys: dict[str, list[int]] = {}
    for i in range(4):
        in_channels, kernel = (3, 7) if i == 0 else (embed[i - 1], 3)
        keys[f"bb.patch_embed{i + 1}.proj.weight"] = [embed[i], in_channels, kernel, kernel]
        keys[f"bb.patch_embed{i + 1}.proj.bias"] = [embed[i]]
        keys[f"bb.patch_embed{i + 1}.norm.weight"] = [embed[i]]
        keys[f"bb.patch_embed{i + 1}.norm.bias"] = [embed[i]]
    for i in range(4):
        dim, hidden, sr = embed[i], embed[i] * mlp_ratios[i], sr_ratios[i]
        for j in range(depths[i]):
            block = f"bb.block{i + 1}.{j}"
            entries: list[tuple[str, list[int]]] = [
                ("norm1.weight", [dim]), ("norm1.bias", [dim]),
                ("attn.q.weight", [dim, dim]), ("attn.q.bias", [dim]),
                ("attn.kv.weight", [2 * dim, dim]), ("attn.kv.bias", [2 * dim]),
                ("attn.proj.weight", [dim, dim]), ("attn.proj.bias", [dim]),
            ]
            if sr > 1:
                entries += [("attn.sr.weight", [dim, dim, sr, sr]), ("attn.sr.bias", [dim]),
                            ("attn.norm.weight", [dim]), ("attn.norm.bias", [dim])]
            entries += [
                ("norm2.weight", [dim]), ("norm2.bias", [dim]),
                ("mlp.fc1.weight", [hidden, dim]), ("mlp.fc1.bias", [hidden]),
                ("mlp.dwconv.dwconv.weight", [hidden, 1, 3, 3]), ("mlp.dwconv.dwconv.bias", [hidden]),
                ("mlp.fc2.weight", [dim, hidden]), ("mlp.fc2.bias", [dim]),
            ]
            keys.update({f"{block}.{name}": shape for name, shape in entries})
        keys[f"bb.norm{i + 1}.weight"] = [dim]
        keys[f"bb.norm{i + 1}.bias"] = [dim]
    return keys


Rule = Callable[[re.Match[str], list[int]], list[int]]


def _rules(c: Sequence[int]) -> list[tuple[str, Rule]]:
    """(key pattern, new shape from the reference shape) for the channel-dependent decoder entries.

    ``c`` is upstream's ``lateral_channels_in_collection`` after the 'cat' doubling, deepest first (C0..C3).
    Inward-reference widths are ``C_i // 8``; decoder block i reads ``C_i`` plus the previous inward output and
    writes ``[C1, C2, C3, C3 // 2]`` (upstream-spec §3.2).
    """
    inward = [c[0] // 8, c[0] // 8, c[1] // 8, c[2] // 8, c[3] // 8]  # ipt_blk5..1
    dec_in = [c[0] + c[0] // 8, c[1] + c[0] // 8, c[2] + c[1] // 8, c[3] + c[2] // 8]  # decoder_block4..1
    dec_out = [c[1], c[2], c[3], c[3] // 2]
    block = {"4": 0, "3": 1, "2": 2, "1": 3}
    side = {"4": c[1], "3": c[2], "2": c[3]}  # lateral / stage-head / gradient widths at stages 4, 3, 2

    def out0(width: Callable[[re.Match[str]], int]) -> Rule:
        return lambda m, ref: [width(m), *ref[1:]]

    return [
        (r"squeeze_module\.0\.conv_in\.weight", lambda m, ref: [ref[0], sum(c), *ref[2:]]),
        (r"squeeze_module\.0\.(conv_out\.|bn_out\.(?!num_batches))", out0(lambda m: c[0])),
        (r"decoder\.ipt_blk(\d)\.conv_out\.", out0(lambda m: inward[5 - int(m[1])])),
        (r"decoder\.decoder_block(\d)\.conv_in\.weight", lambda m, ref: [ref[0], dec_in[block[m[1]]], *ref[2:]]),
        (r"decoder\.decoder_block(\d)\.(conv_out\.|bn_out\.(?!num_batches))", out0(lambda m: dec_out[block[m[1]]])),
        (r"decoder\.conv_out1\.0\.weight", lambda m, ref: [ref[0], c[3] // 2 + c[3] // 8, *ref[2:]]),
        (r"decoder\.lateral_block(\d)\.conv\.weight", lambda m, ref: [side[m[1]], side[m[1]], *ref[2:]]),
        (r"decoder\.lateral_block(\d)\.conv\.bias", lambda m, ref: [side[m[1]]]),
        (r"decoder\.conv_ms_spvn_(\d)\.weight", lambda m, ref: [ref[0], side[m[1]], *ref[2:]]),
        (r"decoder\.gdt_convs_(\d)\.0\.weight", lambda m, ref: [ref[0], side[m[1]], *ref[2:]]),
    ]


def decoder_shape(key: str, reference: list[int], channels: Sequence[int]) -> list[int]:
    """The shape of a ``squeeze_module.*`` / ``decoder.*`` entry for other lateral channels.

    Args:
        key: an upstream key of the reference manifest.
        reference: its shape there.
        channels: the target's lateral channels after 'cat' doubling, deepest first.
    """
    for pattern, rule in _rules(channels):
        match = re.fullmatch(pattern + r".*", key)
        if match:
            return rule(match, reference)
    return list(reference)


def lateral_channels(reference: dict[str, Any]) -> list[int]:
    """``lateral_channels_in_collection`` (doubled) recorded in a reference manifest's config."""
    return list(reference["config"]["lateral_channels_in_collection"])


def derive_pvt_v2_manifest(variant: str, reference: dict[str, Any]) -> dict[str, Any]:
    """An upstream BiRefNet manifest for ``variant`` with the reference's decoder configuration."""
    embed = PVT_V2[variant][0]
    channels = [2 * w for w in reversed(embed)]  # deepest first, doubled by mul_scl_ipt 'cat'
    keys = pvt_v2_encoder_keys(variant)
    for key, shape in reference["keys"].items():
        if not key.startswith("bb."):
            keys[key] = decoder_shape(key, shape, channels)
    config = {**reference["config"], "bb": variant, "lateral_channels_in_collection": channels,
              "cxt": channels[1:][::-1]}
    params = sum(math.prod(s) for k, s in keys.items() if not k.endswith(BUFFER_SUFFIXES))
    return {
        "note": f"derived, not dumped: bb.* from upstream models/backbones/pvt_v2.py ({variant}), squeeze_module.* "
                "and decoder.* from the swin_v1_t manifest's names with shapes recomputed for lateral channels "
                f"{channels}; written by `python -m tests.helpers.upstream_manifest` (see its docstring)",
        "config": config,
        "num_params": params,
        "num_state_dict_entries": len(keys),
        "num_state_dict_elements": sum(math.prod(s) for s in keys.values()),
        "keys": keys,
    }


def random_upstream_state(doc: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Upstream-layout tensors of a manifest's shapes: small random weights, valid BatchNorm statistics."""
    generator = torch.Generator().manual_seed(seed)
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
    return upstream


def main() -> None:
    reference = json.loads((FIXTURES / "upstream_state_dict_swin_v1_t.json").read_text(encoding="utf-8"))
    doc = derive_pvt_v2_manifest("pvt_v2_b2", reference)
    path = FIXTURES / "upstream_state_dict_pvt_v2_b2.json"
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}: {doc['num_state_dict_entries']} entries, {doc['num_params']:,} parameters")


if __name__ == "__main__":
    main()
