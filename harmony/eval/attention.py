"""Pictures for judging locality, and numbers that summarise them on the built-in data.

- DINO-style maps: the last block's attention from the CLS token to every patch, one per head
  (q and k are taken from the block's qkv projection during the ordinary forward pass).
- Text-image similarity maps: every patch token through the CLIP image projection, cosine similarity
  with a prompt's text embedding (MaskCLIP-style dense read-out).
On `builtin:shapes` the object masks turn these into scores: the Jaccard index of the attention that
holds 60 % of the mass with the foreground (DINO's measure; per head-averaged map and best head), the
attention mass on the foreground (chance: the foreground fraction), and the precision of the most
prompt-similar patches on the prompted object (chance: its area fraction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Attention

from harmony.core.colors import WHITE
from harmony.core.errors import ConfigError
from harmony.data.errors import SampleError
from harmony.data.shapes import ShapesSample
from harmony.eval.datasets import open_labelled, pick, shapes_dataset
from harmony.eval.images import Colour, Skips, require_some
from harmony.eval.metrics import mass_jaccard, topk_precision
from harmony.eval.report import make_result
from harmony.eval.settings import resolve
from harmony.eval.transforms import eval_transform
from harmony.eval.zeroshot import prompt_name
from harmony.loading import Pretrained
from harmony.models.normalize import normalize
from harmony.models.pair import ImageTextModel


@dataclass(frozen=True)
class AttentionSettings:
    num_images: int = field(default=6, metadata={"help": "images drawn in the PNGs"})
    max_eval: int = field(default=200, metadata={"help": "built-in images scored (0 = all)"})
    prompt: str = field(default="a photo of a {}.", metadata={"help": "text prompt; '{}' = the image's class"})
    keep_mass: float = field(default=0.6, metadata={"help": "attention mass kept for the Jaccard index"})


ATTENTION_FULL = AttentionSettings()


@torch.no_grad()
def attention_and_tokens(model: ImageTextModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS->patch attention of the last block [B, heads, gh, gw], output tokens [B, 1 + N, D])."""
    visual = model.vit()
    attn = visual.vit.blocks[-1].attn
    assert isinstance(attn, Attention)
    captured: list[torch.Tensor] = []
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        tokens = visual(images)
    finally:
        handle.remove()
    b, n, _ = captured[0].shape
    qkv = captured[0].reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0, 1:]
    gh, gw = visual.grid(*images.shape[-2:])
    return weights.reshape(b, attn.num_heads, gh, gw), tokens


@torch.no_grad()
def similarity_map(
    model: ImageTextModel, tokens: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity [B, gh, gw] of projected patch tokens with one text embedding per image [B, E]."""
    patches = F.normalize(model.visual_projection(tokens[:, 1:]), dim=-1)
    return (patches @ text.unsqueeze(-1)).squeeze(-1).reshape(-1, *grid)


def patch_mask(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask pooled to the patch grid: a patch counts when at least half of it is inside."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], grid)[0, 0]
    return pooled >= 0.5


def save_grid(path: Path, images: list[np.ndarray], maps: list[list[np.ndarray]], titles: list[str]) -> None:
    """One row per image: the image, then each map as a heat map over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), 1 + len(titles)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for r, (image, row) in enumerate(zip(images, maps)):
        axes[r][0].imshow(image)
        for c, heat in enumerate(row, start=1):
            axes[r][c].imshow(image)
            axes[r][c].imshow(heat, cmap="inferno", alpha=0.7, extent=(0, image.shape[1], image.shape[0], 0))
    for c, title in enumerate(["image", *titles]):
        axes[0][c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class AttentionTally:
    """What the images of one run add up to: the pictures' rows, and the built-in scores per image."""

    pictures: list[np.ndarray] = field(default_factory=list)
    attn_rows: list[list[np.ndarray]] = field(default_factory=list)
    sim_rows: list[list[np.ndarray]] = field(default_factory=list)
    head_jaccard: list[list[float]] = field(default_factory=list)
    scores: dict[str, list[float]] = field(
        default_factory=lambda: {
            name: [] for name in ("jaccard", "fg_mass", "fg_fraction", "text_precision", "text_chance")
        }
    )
    heads: int = 0

    def add_picture(self, pixels: torch.Tensor, attention: torch.Tensor, sim: torch.Tensor | None) -> None:
        """One row of each PNG: every head's attention and their mean; the similarity map with a text tower."""
        self.pictures.append(pixels.permute(1, 2, 0).numpy())
        self.attn_rows.append([*(a.numpy() for a in attention), attention.mean(0).numpy()])
        if sim is not None:
            self.sim_rows.append([sim.numpy()])

    def add_scores(
        self, sample: ShapesSample, label: int, attention: torch.Tensor, sim: torch.Tensor | None, s: AttentionSettings
    ) -> None:
        """Scores of one built-in image against its object masks."""
        grid = (attention.shape[-2], attention.shape[-1])
        fg = patch_mask(sample.instances > 0, grid)
        self.head_jaccard.append([mass_jaccard(a, fg, s.keep_mass) for a in attention])
        self.scores["jaccard"].append(mass_jaccard(attention.mean(0), fg, s.keep_mass))
        self.scores["fg_mass"].append(float((attention * fg).sum() / attention.sum()))
        self.scores["fg_fraction"].append(float(fg.float().mean()))
        if sim is not None:
            target = patch_mask(sample.semantic == label + 1, grid)
            if target.any():
                self.scores["text_precision"].append(topk_precision(sim, target))
                self.scores["text_chance"].append(float(target.float().mean()))

    def metrics(self) -> dict[str, float]:
        """The means over the scored images (none on data without masks)."""
        metrics: dict[str, float] = {}
        if self.head_jaccard:
            metrics["attn_jaccard"] = float(np.mean(self.scores["jaccard"]))
            metrics["attn_jaccard_best_head"] = float(np.max(np.mean(self.head_jaccard, axis=0)))
            metrics["attn_fg_mass"] = float(np.mean(self.scores["fg_mass"]))
            metrics["fg_fraction"] = float(np.mean(self.scores["fg_fraction"]))
        if self.scores["text_precision"]:
            metrics["text_precision"] = float(np.mean(self.scores["text_precision"]))
            metrics["text_chance"] = float(np.mean(self.scores["text_chance"]))
        return metrics

    def write(self, out_dir: Path, prompt: str) -> list[Path]:
        """attention.png, and similarity.png when a text tower drew similarity maps."""
        files = [out_dir / "attention.png"]
        save_grid(files[0], self.pictures, self.attn_rows, [f"head {h}" for h in range(self.heads)] + ["mean"])
        if self.sim_rows:
            files.append(out_dir / "similarity.png")
            save_grid(files[1], self.pictures, self.sim_rows, [f"'{prompt}'"])
        return files


def maps_of(
    pretrained: Pretrained, pixels: torch.Tensor, prompt: str | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CLS attention [heads, gh, gw], the similarity map [gh, gw] with `prompt`, None without one) of one image."""
    model = pretrained.model
    attention, tokens = attention_and_tokens(model, normalize(pixels[None].to(device)))
    attention = attention[0].float().cpu()
    if prompt is None or pretrained.tokenizer is None:
        return attention, None
    text = model.encode_text(pretrained.tokenizer([prompt]).to(device))
    grid = (attention.shape[-2], attention.shape[-1])
    return attention, similarity_map(model, tokens, text, grid)[0].float().cpu()


def run_attention(
    pretrained: Pretrained,
    data_spec: str,
    device: torch.device,
    out_dir: Path = Path("attention_maps"),
    background: Colour = WHITE,
    **overrides: Any,
) -> dict[str, Any]:
    """Writes attention.png (and similarity.png with a text tower) to `out_dir`; scores on built-in data."""
    started = time.perf_counter()
    s = resolve(AttentionSettings(), ATTENTION_FULL, data_spec, overrides)
    if s.num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {s.num_images}")
    builtin = data_spec.startswith("builtin:")
    labelled = open_labelled(data_spec, pretrained.config, background)
    shapes = shapes_dataset(data_spec, pretrained.config) if builtin else None
    index = pick(len(labelled), max(s.max_eval, s.num_images) if builtin else s.num_images)
    has_text = pretrained.model.has_text and pretrained.tokenizer is not None
    names = labelled.class_names if builtin else [prompt_name(n) for n in labelled.class_names]
    tally, skips, used = AttentionTally(), Skips(), 0
    for i in index:
        try:
            image, label = labelled.get(i)
        except SampleError as exc:
            skips.add(exc)
            continue
        used += 1
        pixels = eval_transform(image, pretrained.image_size)
        attention, sim = maps_of(pretrained, pixels, s.prompt.format(names[label]) if has_text else None, device)
        tally.heads = attention.shape[0]
        if len(tally.pictures) < s.num_images:
            tally.add_picture(pixels, attention, sim)
        if shapes is not None:
            tally.add_scores(shapes[i], label, attention, sim, s)
    require_some(used, skips, labelled.name)
    files = tally.write(Path(out_dir), s.prompt)
    dataset = {
        "spec": data_spec,
        "num_images": used,
        "num_pictures": len(tally.pictures),
        "prompts": [s.prompt.format(n) for n in names] if has_text else [],
        "skipped": skips.as_dict(),
    }
    return make_result(
        "attention", pretrained, dataset, s, tally.metrics(), started, background, files=[str(f) for f in files]
    )
