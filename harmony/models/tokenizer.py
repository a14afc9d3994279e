"""CLIP BPE tokenisation (open_clip's bundled vocabulary, no download) plus one `[MASK]` id.

Truncation keeps the end-of-text token: a caption longer than the context keeps its first
`context_length - 2` word pieces between start and end, so end-of-text pooling always finds it, less any
trailing pieces that hold only part of a character (CLIP's BPE splits a Chinese or Japanese character, or
an emoji, into byte pieces: a cut between them would leave a dangling byte).
Padding is whatever follows the first end-of-text token; it is never recognised by its id, because the
fill id 0 is also a real word piece (a bare "!", as in "wow !$").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

PAD_ID = 0  # the fill value only: id 0 is also the BPE id of "!" (see `real_positions`)


def real_positions(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Bool mask [..., T] of the caption's own positions: start, word pieces and the first end-of-text;
    everything after it is padding (a row without end-of-text, e.g. a bare list of word ids, is all real)."""
    is_eot = tokens == eot_id
    last = tokens.shape[-1] - 1
    eot = torch.where(is_eot.any(dim=-1, keepdim=True), is_eot.int().argmax(dim=-1, keepdim=True), last)
    return torch.arange(tokens.shape[-1], device=tokens.device) <= eot


class CaptionTokenizer:
    """Callable: captions -> LongTensor [N, context_length], padded with `PAD_ID` after end-of-text."""

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
        words = self._bpe.encode(caption)
        if len(words) > self.context_length - 2:
            words = self.whole_characters(words[: self.context_length - 2])
        return [self.sot_id, *words, self.eot_id]

    def whole_characters(self, words: list[int]) -> list[int]:
        """`words` (the start of a caption's pieces) without trailing pieces of a character cut short: the
        pieces hold the caption's UTF-8 bytes, so only their end can be incomplete."""
        pieces = [bytes(self._bpe.byte_decoder[c] for c in self._bpe.decoder[i].replace("</w>", "")) for i in words]
        while pieces:
            try:
                b"".join(pieces).decode("utf-8")
                break
            except UnicodeDecodeError:
                pieces.pop()
        return words[: len(pieces)]

    def __call__(self, captions: str | Sequence[str]) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        out = torch.full((len(captions), self.context_length), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            ids = self.encode(caption)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        keep = [i for i in self.words(ids) if i != self.mask_id]
        return str(self._bpe.decode(keep)).strip()

    def words(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        """The word-piece ids of one caption (`[MASK]` included): no start, end-of-text or padding."""
        ids = torch.as_tensor(ids)
        return [int(i) for i in ids[self.word_positions(ids)]]

    def real_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return real_positions(tokens, self.eot_id)

    def word_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool mask of maskable positions: real word pieces, not start/end-of-text/padding."""
        return self.real_positions(tokens) & (tokens != self.sot_id) & (tokens != self.eot_id)


def mask_caption(
    tokens: torch.Tensor, maskable: torch.Tensor, prob: float, mask_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking with `[MASK]` only: each maskable token is replaced with probability `prob`.

    Returns (masked tokens, bool mask of replaced positions).
    """
    draw = torch.rand(tokens.shape, generator=generator) < prob
    mask = draw & maskable
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask
