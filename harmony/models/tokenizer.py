"""CLIP BPE tokenisation (open_clip's bundled vocabulary, no download) plus one `[MASK]` id.

Truncation keeps the end-of-text token: a caption longer than the context keeps its first
`context_length - 2` word pieces between start and end, so end-of-text pooling always finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD_ID = 0


class CaptionTokenizer:
    """Callable: captions -> LongTensor [N, context_length], padded with 0."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError("context_length must be at least 3")
        self.context_length = context_length
        self._bpe = SimpleTokenizer()
        self.sot_id: int = self._bpe.sot_token_id
        self.eot_id: int = self._bpe.eot_token_id
        self.base_vocab_size = len(self._bpe.encoder)
        self.mask_id = self.base_vocab_size
        self.vocab_size = self.base_vocab_size + 1

    def encode(self, caption: str) -> list[int]:
        words = self._bpe.encode(caption)[: self.context_length - 2]
        return [self.sot_id, *words, self.eot_id]

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        out = torch.full((len(captions), self.context_length), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        keep = [int(i) for i in ids if int(i) not in (PAD_ID, self.sot_id, self.eot_id, self.mask_id)]
        return str(self._bpe.decode(keep)).strip()

    def word_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of maskable positions: real word pieces, not start/end/padding."""
        return (tokens != PAD_ID) & (tokens != self.sot_id) & (tokens != self.eot_id)


def mask_caption(
    tokens: torch.Tensor, maskable: torch.Tensor, prob: float, mask_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking with `[MASK]` only: each maskable token is replaced with probability `prob`.

    Returns (masked tokens, bool mask of replaced positions).
    """
    draw = torch.rand(tokens.shape, generator=generator) < prob
    mask = draw & maskable
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask
