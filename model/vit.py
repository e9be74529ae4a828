"""The image encoder: a ViT built from timm's blocks, with BLIP's parameter names.

Parameter names (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.*`, `norm`) are the
ones in BLIP's original checkpoints, so an original state dict loads without renaming. A conv stem
(`VisionConfig.stem == "conv"`, ours alone) replaces `patch_embed` with `stem.convs.*`, `stem.proj`.

For inference on a CPU (no autograd, fp32), each block runs as torch's fused encoder layer
(`torch._transformer_encoder_layer_fwd`, what `nn.TransformerEncoderLayer` runs in eval mode):
the same pre-norm block in one C++ call, on the block's own weights. On the 2-core Xeon of
`docs/benchmarks.md`: small 15.9-18.9 -> 15.4-15.9 ms a batch of 32 (timm's time there is
bimodal, the fused one is not), base 802-829 -> 789-813 ms a batch of 8 at 384 px; outputs within
2.4e-6 (small) and 4.3e-6 (base) of timm's.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .config import VisionConfig


class VisionTransformer(nn.Module):
    """Pixels (B, 3, H, W) -> token features (B, 1 + N, width); token 0 is `[CLS]`."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        norm_layer = partial(nn.LayerNorm, eps=config.layer_norm_eps)
        if config.stem == "conv":
            self.stem = ConvStem(config.patch_size, config.width)
        else:
            self.patch_embed = PatchEmbed(
                img_size=config.image_size,
                patch_size=config.patch_size,
                embed_dim=config.width,
                strict_img_size=False,
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.width))
        drop_path = torch.linspace(0, config.drop_path, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                config.width,
                config.heads,
                mlp_ratio=config.mlp_ratio,
                qkv_bias=True,
                drop_path=drop_path[i],
                norm_layer=norm_layer,
            )
            for i in range(config.depth)
        )
        self.norm = norm_layer(config.width)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_vit_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels) if self.config.stem == "conv" else self.patch_embed(pixels)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        x = x + self._pos_embed_for(x.shape[1], pixels.shape[-2:])
        fused = (
            _FUSED_LAYER is not None
            and not self.training
            and not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
        )
        layer_args = [_fused_layer_args(block) if fused else None for block in self.blocks]
        if all(args is not None for args in layer_args):  # chunks measured for the fused layer alone
            chunk = max(1, FUSED_CHUNK_BYTES // (x.shape[1] * x.shape[2] * x.element_size()))
            if x.shape[0] > chunk:  # chunks of equal size, none above `chunk`
                parts = x.tensor_split(-(-x.shape[0] // chunk))
                return torch.cat([self._blocks(part, layer_args) for part in parts])
        return self._blocks(x, layer_args)

    def _blocks(self, x: torch.Tensor, layer_args: list[tuple | None]) -> torch.Tensor:
        for block, args in zip(self.blocks, layer_args):
            if args is not None:
                x = _FUSED_LAYER(x, self.config.width, self.config.heads, *args)
            elif self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def _pos_embed_for(self, num_tokens: int, hw: torch.Size) -> torch.Tensor:
        if num_tokens == self.pos_embed.shape[1]:
            return self.pos_embed
        grid = [hw[0] // self.config.patch_size, hw[1] // self.config.patch_size]
        return resample_abs_pos_embed(self.pos_embed, grid, num_prefix_tokens=1)


_FUSED_LAYER = getattr(torch, "_transformer_encoder_layer_fwd", None)
# On a CPU the fused blocks run fastest on a few images at a time (the layer's attention writes out
# every image's (heads, tokens, tokens) scores, so a call's memory grows with the batch): the blocks
# take the images in chunks whose tokens hold about this many bytes, one core's L2 on the Xeon of
# `docs/benchmarks.md`. There, small (65 tokens of 128 floats) ran 975 images/s at 512 a call and
# 1,524 at 128, against 1,895 in chunks of 64; base at 384 px (577 tokens of 768) 2.01 images/s at
# 32 a call and 2.08 at 8, against 2.43 one image at a time (in a quieter hour: 2.58 against 2.64).
FUSED_CHUNK_BYTES = 2 * 2**20


def _fused_layer_args(block: nn.Module) -> tuple | None:
    """The fused encoder layer's arguments after (x, width, heads) for a plain timm pre-norm block
    (x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU, biases everywhere, nothing else);
    None for anything else (quantised Linears, layer scale, q/k norms, a gate, a timm whose block
    is laid out otherwise), which runs as is."""
    try:
        attn, mlp, n1, n2 = block.attn, block.mlp, block.norm1, block.norm2
        linears = (attn.qkv, attn.proj, mlp.fc1, mlp.fc2)
        extras = (attn.q_norm, attn.k_norm, block.ls1, block.ls2, block.drop_path1, block.drop_path2)
        act = mlp.act
    except AttributeError:
        return None
    extras += (getattr(attn, "norm", None), getattr(mlp, "norm", None))
    if any(type(m) is not nn.Linear or m.bias is None for m in linears):
        return None
    if (
        any(m is not None and type(m) is not nn.Identity for m in extras)
        or getattr(attn, "gate", None) is not None
    ):
        return None
    norms_plain = all(
        isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in (n1, n2)
    )
    if not norms_plain or n1.eps != n2.eps:
        return None
    if type(act) is not nn.GELU or act.approximate != "none":
        return None
    return (
        attn.qkv.weight,
        attn.qkv.bias,
        attn.proj.weight,
        attn.proj.bias,
        True,  # GELU
        True,  # pre-norm
        n1.eps,
        n1.weight,
        n1.bias,
        n2.weight,
        n2.bias,
        mlp.fc1.weight,
        mlp.fc1.bias,
        mlp.fc2.weight,
        mlp.fc2.bias,
        None,  # no mask
        None,
    )


def conv_stem_channels(patch_size: int, width: int) -> list[int]:
    """Output channels of a conv stem's stride-2 convolutions: doubling up to `width`, at least 16."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 2**steps != patch_size:
        raise ValueError(f"a conv stem needs a power-of-two patch size of at least 2, got {patch_size}")
    return [max(16, width >> (steps - 1 - i)) for i in range(steps)]


class ConvStem(nn.Module):
    """Pixels (B, 3, H, W) -> tokens (B, H/p * W/p, D): log2(p) stride-2 3x3 convolutions, each
    followed by GroupNorm(1) and GELU, their channels doubling up to D, then a 1x1 projection.
    For p = 8 and D = 128: 3 -> 32 -> 64 -> 128 channels at H/2, H/4, H/8."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in conv_stem_channels(patch_size, width):
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(1, out),
                nn.GELU(),
            ]
            channels = out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels, width, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(pixels)).flatten(2).transpose(1, 2)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize (1, 1 + g*g, D) position embeddings to a new square grid, bicubically (BLIP's
    `interpolate_pos_embed`, used when a 224 px checkpoint is fine-tuned at 384 px)."""
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], num_prefix_tokens=1, antialias=False)


def _init_vit_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
