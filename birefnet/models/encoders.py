"""Encoders (the localization module's backbone) built with timm.

Two kinds, one contract: ``forward(image)`` returns four NCHW feature maps at strides 4, 8, 16 and 32, and
``out_channels`` / ``reductions`` describe them (read from timm's ``feature_info``).

* ``swin_v1_t/s/b/l``: upstream BiRefNet's Swin Transformer (Liu et al., ICCV 2021) expressed with timm's
  ``SwinTransformer`` layers and weight layout, plus the four output LayerNorms (``norms.0..3``) upstream
  puts on its stage outputs. One step of timm's shifted-window attention is changed to upstream's order
  (pad to a multiple of the window, then roll, with the shift mask built over the padded size), and
  ``always_partition`` keeps the shift on stages no larger than the window: that is what makes the
  encoder equal upstream's at any input size, not only at sizes whose stages are window multiples.
  Window attention runs through ``F.scaled_dot_product_attention`` (:class:`SdpaWindowAttention`; timm fuses
  it only behind an experimental switch), with the relative-position bias and the shift mask as one
  ``(nW, heads, N, N)`` additive mask shared by the images of a batch, never copied per image. CPU training
  keeps the stated softmax, which is faster there.
* any other timm model name: ``timm.create_model(name, features_only=True)`` with the levels at strides
  4..32 (e.g. ``pvt_v2_b0``, ``convnext_atto``, ``test_convnext``).

Nothing downloads: timm always gets ``pretrained=False`` unless a local weights file is given, which is
then read through timm's own loader (``weights_only`` torch.load) with timm's checkpoint filter.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention, window_partition, window_reverse
from torch import nn

#: upstream name -> (timm architecture, window size). Depths, widths and heads come with the timm name.
SWIN_VARIANTS: dict[str, tuple[str, int]] = {
    "swin_v1_t": ("swin_tiny_patch4_window7_224", 7),
    "swin_v1_s": ("swin_small_patch4_window7_224", 7),
    "swin_v1_b": ("swin_base_patch4_window12_384", 12),
    "swin_v1_l": ("swin_large_patch4_window12_384", 12),
}
#: Strides the decoder expects, shallow to deep.
REDUCTIONS = (4, 8, 16, 32)
#: Upstream's stochastic depth: 0.2 for Swin, 0.1 for the others (PVT).
SWIN_DROP_PATH_RATE = 0.2
DEFAULT_DROP_PATH_RATE = 0.1
#: Value of masked logits in the shifted-window attention (timm's convention; upstream uses -inf).
MASK_VALUE = -100.0


class SdpaWindowAttention(WindowAttention):
    """timm's window attention computed by ``F.scaled_dot_product_attention``; same parameters and outputs.

    The stated path (``softmax(q k^T * scale + bias + mask) v``, timm's unfused code) gives the same values
    (tests compare both). The additive mask is never copied per image: unshifted blocks pass the
    ``(1, heads, N, N)`` position bias, which broadcasts; shifted blocks build one ``(nW, heads, N, N)``
    bias-plus-shift mask and attend image by image. The calls stay 4-D because PyTorch's fused CPU kernel
    takes 4-D inputs only (a 5-D call falls back to the unfused maths, about 1.5x slower than this).

    ``fused``: True (SDPA), False (stated) or None (the default, "auto"): SDPA except when training on a CPU.
    There the mask carries the learnable position bias and needs a gradient, which PyTorch's fused CPU kernel
    does not give, so SDPA runs its reference maths: 3-4 % slower than the stated path for Swin-T at 512 and
    36 % for Swin-L at 512 (``benchmarks/swin_attention.py``). On CUDA the memory-efficient kernel takes the
    mask gradient, and CPU inference runs the fused kernel (5-15 % faster for Swin-T).
    """

    fused: bool | None = None

    def _use_sdpa(self, x: torch.Tensor) -> bool:
        if self.fused is not None:
            return self.fused
        needs_mask_grad = torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad
        return not (x.device.type == "cpu" and needs_mask_grad)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: ``(B * nW, N, C)`` window tokens, the windows of one image consecutive.
            mask: ``(nW, N, N)`` additive shift mask, or None.

        Returns:
            ``(B * nW, N, C)``.
        """
        if not self._use_sdpa(x):
            return self._stated(x, mask)
        windows, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, d)
        bias = self._get_rel_pos_bias().to(q.dtype)  # (1, heads, N, N)
        dropout = self.attn_drop.p if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        else:
            groups = mask.shape[0]
            attn_mask = bias + mask.to(q.dtype).unsqueeze(1)  # (nW, heads, N, N)
            if torch.jit.is_tracing():  # ONNX export: one call, the mask repeated per image keeps the batch dynamic
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.repeat(windows // groups, 1, 1, 1),
                                                     dropout_p=dropout, scale=self.scale)
            else:
                per_image = zip(q.split(groups), k.split(groups), v.split(groups), strict=True)
                out = torch.cat([F.scaled_dot_product_attention(qi, ki, vi, attn_mask=attn_mask, dropout_p=dropout,
                                                                scale=self.scale) for qi, ki, vi in per_image])
        out = out.transpose(1, 2).reshape(windows, tokens, -1)
        return self.proj_drop(self.proj(out))

    def _stated(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self._get_rel_pos_bias()
        if mask is not None:
            groups = mask.shape[0]
            attn = attn.view(-1, groups, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(windows, tokens, -1)
        return self.proj_drop(self.proj(out))


class PaddedShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block with upstream's window order: pad -> roll -> mask over the padded size.

    Only ``_attn`` differs from timm; parameters, buffers and the rest of the forward are timm's.
    """

    def _shift_mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(nW, N, N) additive mask of the shifted windows over a padded (height, width) map."""
        key = (height, width, device, dtype)
        cache: dict[tuple[int, int, torch.device, torch.dtype], torch.Tensor] = self.__dict__.setdefault(
            "_mask_cache", {}
        )
        if key not in cache:
            window_h, window_w = self.window_size
            shift_h, shift_w = self.shift_size
            labels = torch.zeros((1, height, width, 1), device=device, dtype=dtype)
            count = 0
            for rows in (slice(0, -window_h), slice(-window_h, -shift_h), slice(-shift_h, None)):
                for cols in (slice(0, -window_w), slice(-window_w, -shift_w), slice(-shift_w, None)):
                    labels[:, rows, cols, :] = count
                    count += 1
            windows = window_partition(labels, self.window_size).view(-1, window_h * window_w)
            different = (windows.unsqueeze(1) - windows.unsqueeze(2)) != 0
            cache.clear()
            cache[key] = torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, MASK_VALUE)
        return cache[key]

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention on ``(B, H, W, C)`` features (already normalised)."""
        _, height, width, channels = x.shape
        window_h, window_w = self.window_size
        pad_h = (window_h - height % window_h) % window_h
        pad_w = (window_w - width % window_w) % window_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = height + pad_h, width + pad_w
        has_shift = any(self.shift_size)
        mask = None
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self._shift_mask(padded_h, padded_w, x.device, x.dtype)
        windows = window_partition(x, self.window_size).view(-1, window_h * window_w, channels)
        windows = self.attn(windows, mask=mask).view(-1, window_h, window_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class Encoder(nn.Module):
    """Base class: four NCHW feature maps at strides 4/8/16/32.

    Attributes:
        out_channels: channels of the four maps, shallow to deep.
        reductions: strides of the four maps (always 4, 8, 16, 32).
    """

    out_channels: tuple[int, ...]
    reductions: tuple[int, ...]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder stages in backward to save memory."""
        raise NotImplementedError


class SwinEncoder(Encoder):
    """Upstream BiRefNet's Swin backbone on timm layers.

    Args:
        variant: ``swin_v1_t``, ``swin_v1_s``, ``swin_v1_b`` or ``swin_v1_l``.
        weights: local ImageNet checkpoint (official Swin or timm layout), or None for random init.
        drop_path_rate: stochastic depth over all blocks (upstream 0.2).
    """

    def __init__(self, variant: str, weights: str | Path | None = None, drop_path_rate: float | None = None) -> None:
        super().__init__()
        timm_name, window = SWIN_VARIANTS[variant]
        self.model = timm.create_model(
            timm_name,
            **_pretrained_kwargs(weights),
            num_classes=0,
            window_size=window,
            drop_path_rate=SWIN_DROP_PATH_RATE if drop_path_rate is None else drop_path_rate,
            strict_img_size=False,
            always_partition=True,
        )
        self.model.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        for stage in self.model.layers:
            for block in stage.blocks:
                block.__class__ = PaddedShiftSwinBlock
                block.attn.__class__ = SdpaWindowAttention
        channels = tuple(int(info["num_chs"]) for info in self.model.feature_info)
        self.out_channels = channels
        self.reductions = tuple(int(info["reduction"]) for info in self.model.feature_info)
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def set_fused_attention(self, enable: bool | None = None) -> None:
        """Window attention through SDPA (True), as stated (False), or by device and autograd (None, default)."""
        for stage in self.model.layers:
            for block in stage.blocks:
                block.attn.fused = enable

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encode an image.

        Args:
            image: ``(B, 3, H, W)`` normalised image, H and W multiples of 4 (32 for the decoder).

        Returns:
            Four ``(B, C_i, H/s_i, W/s_i)`` maps for strides s = 4, 8, 16, 32.
        """
        x = self.model.patch_embed(image)
        features = []
        for stage, norm in zip(self.model.layers, self.norms, strict=True):
            x = stage(x)
            features.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return features


class TimmEncoder(Encoder):
    """Any timm backbone through ``features_only``, keeping the levels at strides 4, 8, 16 and 32.

    Args:
        name: timm model name.
        weights: local checkpoint file for timm's loader, or None for random init.
        drop_path_rate: stochastic depth, when the model has it (upstream 0.1 for PVT).
    """

    def __init__(self, name: str, weights: str | Path | None = None, drop_path_rate: float | None = None) -> None:
        super().__init__()
        kwargs = _pretrained_kwargs(weights)
        rate = DEFAULT_DROP_PATH_RATE if drop_path_rate is None else drop_path_rate
        try:
            self.model = timm.create_model(name, features_only=True, drop_path_rate=rate, **kwargs)
        except TypeError:  # models without stochastic depth
            self.model = timm.create_model(name, features_only=True, **kwargs)
        reductions = [int(r) for r in self.model.feature_info.reduction()]
        missing = [r for r in REDUCTIONS if r not in reductions]
        if missing:
            raise ValueError(f"encoder {name!r} has feature strides {reductions}; the decoder needs {list(REDUCTIONS)}")
        self.indices = tuple(reductions.index(r) for r in REDUCTIONS)
        channels = self.model.feature_info.channels()
        self.out_channels = tuple(int(channels[i]) for i in self.indices)
        self.reductions = REDUCTIONS
        self.channels_last_output = str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encode an image.

        Args:
            image: ``(B, 3, H, W)`` normalised image, H and W multiples of 32.

        Returns:
            Four ``(B, C_i, H/s_i, W/s_i)`` maps for strides s = 4, 8, 16, 32.
        """
        maps = self.model(image)
        features = [maps[i] for i in self.indices]
        if self.channels_last_output:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features


def _pretrained_kwargs(weights: str | Path | None) -> dict[str, object]:
    """timm kwargs for random init, or for loading a local file (timm's filter, never a download)."""
    if weights is None:
        return {"pretrained": False}
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path), "hf_hub_id": None, "url": None}}


def create_encoder(name: str, weights: str | Path | None = None, drop_path_rate: float | None = None) -> Encoder:
    """Build an encoder by name: an upstream Swin variant or any timm model.

    Args:
        name: ``swin_v1_t|s|b|l`` or a timm model name.
        weights: local ImageNet weights file, or None for random init.
        drop_path_rate: stochastic depth, or None for upstream's value.
    """
    if name in SWIN_VARIANTS:
        return SwinEncoder(name, weights, drop_path_rate)
    if not timm.is_model(name):
        raise ValueError(f"unknown encoder {name!r}: use one of {sorted(SWIN_VARIANTS)} or a timm model name")
    return TimmEncoder(name, weights, drop_path_rate)

