"""Decoders for the generative objectives: MAE pixels, MLM words, MaskCLIP features."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from harmony.models.text import Transformer


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [grid_h * grid_w, dim] (MAE's), rows in raster order."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    out_w = xs.reshape(-1, 1) * omega
    out_h = ys.reshape(-1, 1) * omega
    table = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return table.float()


def scatter_visible(
    visible: torch.Tensor, keep_index: torch.Tensor, num_patches: int, fill: torch.Tensor
) -> torch.Tensor:
    """Place visible patch tokens [B, K, D] at `keep_index` in a full [B, N, D] sequence of `fill`."""
    b, _, d = visible.shape
    full = fill.to(visible.dtype).expand(b, num_patches, d).clone()
    return full.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, d), visible)


class MAEDecoder(nn.Module):
    """Visible encoder tokens -> pixels of every patch (the caller selects the removed ones).

    The position table is a fixed 2-D sin-cos table computed here, for the grid of the input; it is
    never left uninitialised (a defect of the authors' code).
    """

    def __init__(self, encoder_dim: int, patch_size: int, width: int = 512, depth: int = 8, heads: int = 16) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Linear(encoder_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_size * patch_size * 3)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)
        self._tables: dict[tuple[int, int, str], torch.Tensor] = {}

    def position_table(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """[1 + N, width]: zeros for CLS, then the sin-cos rows; cached per grid and device."""
        key = (grid_h, grid_w, str(device))
        if key not in self._tables:
            cls = torch.zeros(1, self.width)
            self._tables[key] = torch.cat([cls, sincos_2d(self.width, grid_h, grid_w)]).to(device)
        return self._tables[key]

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(
        self, tokens: torch.Tensor, keep_index: torch.Tensor, grid: tuple[int, int], predict_index: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, 1 + K, D] (CLS + visible); returns pixels [B, P, patch*patch*3] at `predict_index`."""
        x = self.embed(tokens)
        num_patches = grid[0] * grid[1]
        patches = scatter_visible(x[:, 1:], keep_index, num_patches, self.mask_token)
        x = torch.cat([x[:, :1], patches], dim=1) + self.position_table(*grid, x.device).to(x.dtype)
        x = self.norm(self.blocks(x))[:, 1:]
        x = x.gather(1, predict_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.pred(x)


class MLMDecoder(nn.Module):
    """Bidirectional transformer over the (causal) text tower's token features, then a vocabulary
    projection applied only to the positions that are scored."""

    def __init__(self, text_width: int, vocab_size: int, width: int = 512, depth: int = 4, heads: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        self.transformer = Transformer(width, depth, heads)
        self.norm = nn.LayerNorm(width)
        self.vocab = nn.Linear(width, vocab_size)
        nn.init.normal_(self.vocab.weight, std=width**-0.5)
        nn.init.zeros_(self.vocab.bias)

    def forward(self, features: torch.Tensor, padding: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """features [B, T, W], padding bool [B, T], positions: flat indices into B*T -> logits [M, V]."""
        x = self.transformer(self.embed(features), causal=False, key_padding=padding)
        x = self.norm(x).flatten(0, 1)[positions]
        return self.vocab(x)


class MaskedFeatureDecoder(nn.Module):
    """MaskCLIP's light decoder: visible tokens plus mask tokens at removed positions -> one or more
    transformer blocks at the encoder's width -> features of every patch."""

    def __init__(self, dim: int, depth: int = 1, heads: int = 16) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(
        self, tokens: torch.Tensor, keep_index: torch.Tensor, num_patches: int, pos_embed: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, 1 + K, D]; pos_embed [1, 1 + N, D] (the encoder's table). Returns [B, N, D]."""
        patches = scatter_visible(tokens[:, 1:], keep_index, num_patches, self.mask_token)
        x = torch.cat([tokens[:, :1], patches], dim=1) + pos_embed.to(tokens.dtype)
        return self.norm(self.blocks(x))[:, 1:]


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
