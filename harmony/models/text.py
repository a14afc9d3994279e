"""CLIP text transformer (pre-LN, causal) with fused attention and end-of-text pooling, or its bidirectional
variant pooled at the first token (BERT-style, ALIGN's text encoder; `TextSize.causal` / `TextSize.pool`).

Parameter names follow open_clip's CLIP text tower (`token_embedding`, `positional_embedding`,
`transformer.resblocks.*.attn.in_proj_weight`, `ln_final`, ...) so the weights export to open_clip
unchanged. Causal attention runs through `scaled_dot_product_attention(is_causal=True)` (flash/efficient
kernels) instead of an explicit mask: no position sees the padding after it. A bidirectional tower masks the
padding (everything after the first end-of-text) out of the keys, so a caption's features do not depend on how
far its batch is padded. End-of-text pooling takes that position by id, not by `argmax` over ids (which would
pick the `[MASK]` id, the largest in the vocabulary); first-token pooling takes the start-of-text token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.models.sizes import TEXT_SIZES, Activation, TextSize
from harmony.models.tokenizer import real_positions


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = True, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        )
        mask = None if key_padding is None else ~key_padding[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, act: Activation = "gelu", eps: float = 1e-5
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, causal: bool = True, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, key_padding=key_padding)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks; causal for the text tower, bidirectional for decoders."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: Activation = "gelu", eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, act, eps) for _ in range(layers))
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's initialisation (std scaled with width and depth)."""
        layers = len(self.resblocks)
        proj_std = (self.width**-0.5) * ((2 * layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks():
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            fc, proj = block.mlp[0], block.mlp[2]
            assert isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear)
            nn.init.normal_(fc.weight, std=fc_std)
            nn.init.normal_(proj.weight, std=proj_std)

    def blocks(self) -> list[ResidualBlock]:
        return [b for b in self.resblocks if isinstance(b, ResidualBlock)]

    def forward(self, x: torch.Tensor, causal: bool = True, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks():
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, key_padding, use_reentrant=False)
            else:
                x = block(x, causal=causal, key_padding=key_padding)
        return x


class TextTower(nn.Module):
    """Token ids [B, T] -> per-token features [B, T, width] (after the final LayerNorm)."""

    def __init__(self, size: str | TextSize, vocab_size: int, context_length: int, eot_id: int) -> None:
        super().__init__()
        spec = TEXT_SIZES[size] if isinstance(size, str) else size
        self.spec = spec
        self.width = spec.width
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.token_embedding = nn.Embedding(vocab_size, spec.width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, spec.width))
        self.transformer = Transformer(spec.width, spec.layers, spec.heads, spec.mlp_ratio, spec.act, spec.norm_eps)
        self.ln_final = nn.LayerNorm(spec.width, eps=spec.norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"caption of {tokens.shape[1]} tokens exceeds the context length {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        if self.spec.causal:
            return self.ln_final(self.transformer(x, causal=True))
        padding = ~real_positions(tokens, self.eot_id)
        return self.ln_final(self.transformer(x, causal=False, key_padding=padding))

    def pool(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Features at the end-of-text position (or the first token) of each caption: [B, width]."""
        if self.spec.pool == "first":
            return features[:, 0]
        eot = (tokens == self.eot_id).int().argmax(dim=-1)
        return features[torch.arange(features.shape[0], device=features.device), eot]
