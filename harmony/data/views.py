"""From one (image, caption) to every tensor the enabled objectives read, and batching them.

`ViewMaker` is configured by the task's `Needs`: how many global/local crops, whether iBOT masks,
MAE keep indices or a masked caption are needed. All randomness comes from the per-sample seed.
Crops are planned from the image size, then rendered from one decode (see `augment`).
`collate` stacks samples crop-major ([G, B, ...]), cuts the captions after the batch's longest one
(`trim_captions`) and precomputes flat token indices and weights so the training step indexes tensors
without host-device synchronisation.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from harmony.config import Config
from harmony.core.colors import parse_background
from harmony.data.augment import CropPlan, plan_global, plan_local, render_crops
from harmony.data.decode import decode_pixels, upright_size
from harmony.data.masking import (
    block_mask,
    flat_index,
    ibot_ratio,
    num_kept,
    patch_loss_weights,
    random_split,
)
from harmony.models.tokenizer import CaptionTokenizer, mask_caption
from harmony.objectives.base import Needs

CROP_MAJOR = ("global", "local", "ibot_mask", "mae_keep", "mae_remove", "global_plan", "local_plan")
TEXT_KEYS = ("text", "text_real", "text_masked", "text_mask")  # the [B, T] caption tensors
CAPTION_MULTIPLE = 8  # trimmed caption lengths are multiples of this: few distinct shapes, aligned kernels
DERIVED = ("ibot_index", "ibot_weight", "text_real_index", "mlm_index", "mlm_in_real", "text_distill_weight")


class ViewMaker:
    """One sample's views, as the union of the objectives' `Needs` asks: global/local crops, iBOT block
    masks (`needs.block_masks`), MAE keep/remove indices, the tokenised and the masked caption."""

    def __init__(self, cfg: Config, needs: Needs, tokenizer: CaptionTokenizer | None, patch_size: int) -> None:
        self.aug = cfg.data.augment
        self.background = parse_background(cfg.data.alpha_background)
        self.needs = needs
        self.tokenizer = tokenizer
        self.grid = (self.aug.global_size // patch_size, self.aug.global_size // patch_size)
        self.dropped = sorted(needs.dropped_crops)
        self.keep = num_kept(self.grid[0] * self.grid[1], needs.keep_ratio) if self.dropped else 0

    def __call__(self, image: Image.Image, caption: str, seed: int) -> dict[str, torch.Tensor]:
        """Every view of one sample; `image` may be opened lazily (decoded here, at a reduced scale when the
        crops allow). Raises `SampleError` for unreadable pixels."""
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        out = self.crops(image, rng)
        out.update(self.masks(rng, gen))
        out.update(self.text(caption, gen))
        return out

    def plans(self, width: int, height: int, rng: random.Random) -> tuple[list[CropPlan], list[CropPlan]]:
        """(global, local) crop plans, drawn from the image size alone."""
        glob = [plan_global(height, width, i, self.aug, rng) for i in range(self.needs.num_global)]
        local = [plan_local(height, width, self.aug, rng) for _ in range(self.needs.local_crops)]
        return glob, local

    def crops(self, image: Image.Image, rng: random.Random) -> dict[str, torch.Tensor]:
        glob, local = self.plans(*upright_size(image), rng)
        pixels, factor = decode_pixels(image, glob + local, self.background)
        out = {"global": render_crops(pixels, glob, factor)}
        if local:
            out["local"] = render_crops(pixels, local, factor)
        return out

    def masks(self, rng: random.Random, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        recipe = self.needs.block_masks
        if recipe is not None:
            out["ibot_mask"] = torch.stack(
                [
                    block_mask(
                        self.grid,
                        ibot_ratio(rng, recipe.probability, recipe.ratio_min, recipe.ratio_max),
                        rng,
                        recipe.min_patches,
                        recipe.aspect_min,
                    )
                    for _ in range(self.needs.num_global)
                ]
            )
        if self.dropped:
            n = self.grid[0] * self.grid[1]
            splits = [random_split(n, self.keep, gen) for _ in self.dropped]
            out["mae_keep"] = torch.stack([keep for keep, _ in splits])
            out["mae_remove"] = torch.stack([remove for _, remove in splits])
        return out

    def text(self, caption: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.needs.needs_text:
            assert self.tokenizer is not None
            tokens = self.tokenizer(caption)[0]
            out["text"] = tokens
            out["text_real"] = self.tokenizer.real_positions(tokens)
            if self.needs.text_masked:
                maskable = self.tokenizer.word_positions(tokens)
                masked, where = mask_caption(tokens, maskable, self.needs.text_mask_prob, self.tokenizer.mask_id, gen)
                out["text_masked"], out["text_mask"] = masked, where
        return out


def collate(samples: list[dict[str, Any]], trim: bool = True) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts (one contiguous copy); crop tensors become crop-major [G, B, ...]; captions are
    cut after the batch's longest (`trim`: `data.caption_padding=batch`); add flat indices.
    The device path's variable-length `payload` (image bytes) is concatenated, with `payload_offsets` [B + 1]."""
    batch: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        if key == "payload":
            parts = [s[key] for s in samples]
            batch[key] = torch.cat(parts)
            batch["payload_offsets"] = torch.tensor([0, *itertools.accumulate(len(p) for p in parts)])
            continue
        dim = 1 if key in CROP_MAJOR else 0
        batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples], dim=dim)
    return add_indices(trim_captions(batch) if trim else batch)


def collate_for(cfg: Config) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """`collate` as `data.caption_padding` asks: captions cut after the batch's longest (`batch`) or not."""
    return functools.partial(collate, trim=cfg.data.caption_padding == "batch")


def trim_captions(batch: dict[str, torch.Tensor], multiple: int = CAPTION_MULTIPLE) -> dict[str, torch.Tensor]:
    """`batch` with its caption tensors (`TEXT_KEYS`, [B, T]) cut after the longest caption's end-of-text,
    rounded up to `multiple` (never beyond T). The text tower is causal, so its features at a caption's real
    positions, the only ones a loss reads, do not depend on the padding after them: every loss keeps its
    value while the tower skips the padding's compute (on short captions most of the 77 positions).
    Computed here, on the host, so the step never synchronises to learn the length."""
    if "text_real" not in batch:
        return batch
    real = batch["text_real"]
    longest = int(real.sum(dim=1).max())
    length = min(real.shape[1], max(multiple, -(-longest // multiple) * multiple))
    if length < real.shape[1]:
        for key in TEXT_KEYS:
            if key in batch:
                batch[key] = batch[key][:, :length].contiguous()
    return batch


def add_indices(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The flat token indices and weights (`DERIVED`) of a batch's masks and captions."""
    if "ibot_mask" in batch:
        masks = batch["ibot_mask"]
        batch["ibot_index"], batch["ibot_weight"] = patch_loss_weights(masks.flatten(2))
    if "text" in batch:
        real = batch["text_real"]  # padding is what follows end-of-text, never found by token id
        batch["text_real_index"] = flat_index(real)
        if "text_mask" in batch:
            # per masked token 1 / (masked tokens in its caption x B): text self-distillation averages per
            # caption, then over captions, as iBOT's patch loss does per image
            mlm_index, batch["text_distill_weight"] = patch_loss_weights(batch["text_mask"].unsqueeze(0))
            batch["mlm_index"] = mlm_index
            batch["mlm_in_real"] = (real.flatten().long().cumsum(0) - 1)[mlm_index]
    return batch


def split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into `parts` equal micro-batches of consecutive samples (gradient accumulation), each with
    its own flat indices and weights (`DERIVED`, recomputed for its samples, as `collate` would make them)."""
    size = batch["global"].shape[1]
    if size % parts:
        raise ValueError(f"a batch of {size} samples does not split into {parts} equal micro-batches")
    step = size // parts
    micro: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for key, value in batch.items():
        if key in DERIVED:
            continue
        dim = 1 if key in CROP_MAJOR else 0
        if value.dim() <= dim or value.shape[dim] != size:
            raise ValueError(f"batch entry {key!r} {list(value.shape)} has no sample dimension of {size} to split")
        for i, piece in enumerate(value.split(step, dim=dim)):
            micro[i][key] = piece
    return [add_indices(m) for m in micro]


def view_maker_for(cfg: Config) -> ViewMaker:
    """The views a training run of `cfg` makes (its objectives' needs), without building the model."""
    from harmony.objectives.registry import make_tokenizer, needs_for_config

    return ViewMaker(cfg, needs_for_config(cfg), make_tokenizer(cfg), cfg.model.patch_size())
