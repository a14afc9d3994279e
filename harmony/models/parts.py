"""The named parts of the two towers, by parameter name: what `model.freeze` patterns name and the layer each
parameter sits at for layer-wise learning-rate decay (`optim.layer_decay`). Torch-free: the config checks the
patterns' grammar with it before any model is built.

A pattern is a tower, `image` or `text`, alone (the whole tower) or with one part:

    image | text                      the whole tower
    TOWER.embed                       the embedding stage (layer 0): image patch_embed, pos_embed, cls_token,
                                      mask_token, norm_pre; text token_embedding, positional_embedding
    TOWER.blocks.I | TOWER.blocks.I-J transformer block I, or blocks I to J (inclusive), counted from 0
    TOWER.norm                        the final LayerNorm after the blocks
    image.patch_embed | image.pos_embed | image.cls_token | image.mask_token | image.norm_pre
    text.token_embedding | text.positional_embedding

Layers follow BEiT (and timm's `param_groups_layer_decay`): the embedding stage is layer 0, block i is layer
i + 1, everything after the blocks (final norm, and outside the tower projections, heads, decoders) is layer
depth + 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TowerParts:
    """Parameter-name prefixes (relative to the tower module) of a tower's named parts."""

    blocks: str  # block i is `{blocks}.{i}`
    named: dict[str, tuple[str, ...]]  # part -> prefixes; `embed` is layer 0


TOWERS: dict[str, TowerParts] = {
    # harmony.models.vision.VisionTower: timm's VisionTransformer at `vit`, iBOT's mask token beside it
    "image": TowerParts(
        blocks="vit.blocks",
        named={
            "embed": (
                "vit.patch_embed",
                "vit.pos_embed",
                "vit.cls_token",
                "vit.reg_token",
                "vit.norm_pre",
                "mask_token",
            ),
            "patch_embed": ("vit.patch_embed",),
            "pos_embed": ("vit.pos_embed",),
            "cls_token": ("vit.cls_token",),
            "mask_token": ("mask_token",),
            "norm_pre": ("vit.norm_pre",),
            "norm": ("vit.norm",),
        },
    ),
    # harmony.models.text.TextTower: open_clip's names
    "text": TowerParts(
        blocks="transformer.resblocks",
        named={
            "embed": ("token_embedding", "positional_embedding"),
            "token_embedding": ("token_embedding",),
            "positional_embedding": ("positional_embedding",),
            "norm": ("ln_final",),
        },
    ),
}

_BLOCKS = re.compile(r"blocks\.(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class Pattern:
    """One parsed `model.freeze` pattern: a tower, and a part of it (None: all of it) or a block range."""

    text: str
    tower: str
    part: str | None = None
    first_block: int = 0
    last_block: int = -1

    def covers(self, name: str) -> bool:
        """Whether the parameter `name` (relative to the tower module) belongs to this pattern."""
        if self.part is None:
            return True
        parts = TOWERS[self.tower]
        if self.part == "blocks":
            block = block_index(name, parts.blocks)
            return block is not None and self.first_block <= block <= self.last_block
        return _under(name, parts.named[self.part])


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def block_index(name: str, blocks: str) -> int | None:
    """The block a parameter named `name` belongs to, or None outside the blocks."""
    if not name.startswith(blocks + "."):
        return None
    head = name[len(blocks) + 1 :].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def parse_pattern(text: str, depths: dict[str, int]) -> Pattern:
    """`text` as a pattern, its block range checked against each tower's depth (`depths`: tower -> blocks);
    raises ValueError saying what is wrong (the module doc gives the grammar)."""
    tower, _, part = text.strip().partition(".")
    if tower not in TOWERS:
        raise ValueError(f"'{text}' names no tower: a pattern starts with {' or '.join(TOWERS)}")
    if not part:
        return Pattern(text, tower)
    match = _BLOCKS.fullmatch(part)
    if match:
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        depth = depths[tower]
        if first > last:
            raise ValueError(f"'{text}': the block range {first}-{last} runs backwards")
        if last >= depth:
            raise ValueError(f"'{text}': the {tower} tower has {depth} blocks, 0-{depth - 1}")
        return Pattern(text, tower, "blocks", first, last)
    if part not in TOWERS[tower].named:
        known = ", ".join(["blocks.I", "blocks.I-J", *TOWERS[tower].named])
        raise ValueError(f"'{text}': the {tower} tower has no part '{part}' (parts: {known})")
    return Pattern(text, tower, part)


def layer_id(tower: str, name: str, depth: int) -> int:
    """BEiT's layer of the parameter `name` (relative to the tower module) in a tower of `depth` blocks."""
    parts = TOWERS[tower]
    if _under(name, parts.named["embed"]):
        return 0
    block = block_index(name, parts.blocks)
    return depth + 1 if block is None else block + 1
