"""Load pre-trained encoders from a checkpoint: `harmony.load(path)` for Python users, eval and export."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from harmony.config import Config, ConfigError, from_dict, upgrade_keys, validate
from harmony.core import checkpoint as ckpt
from harmony.factory import build_pair
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.typed import known_only

Weights = Literal["auto", "student", "teacher"]


@dataclass
class Pretrained:
    """Ready-to-use encoders: `model.encode_image(images)`, `model.encode_text(tokenizer(captions))`."""

    model: ImageTextModel
    tokenizer: CaptionTokenizer | None
    config: Config
    weights: str
    step: int
    path: Path
    logit_bias: float | None = None  # SigLIP's learnt bias b of the logits t <z_img, z_txt> + b, where trained

    @property
    def image_size(self) -> int:
        return self.config.data.augment.global_size

    @property
    def file_identity(self) -> dict[str, int]:
        """Size and modification time of the checkpoint file: they change whenever it is rewritten, so
        results cached under them are never reused for a retrained model."""
        stat = self.path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def model_for(cfg: Config, weights: dict[str, torch.Tensor]) -> tuple[ImageTextModel, CaptionTokenizer | None]:
    """The image-text model the student's or teacher's `weights` (state dict) load into, with its tokenizer when
    they hold a text tower; it has no gradients and is in eval mode, but its weights are still to be loaded."""
    with_text = any(k.startswith("text.") for k in weights)
    tokenizer = CaptionTokenizer(cfg.model.context_length)
    model = build_pair(cfg, tokenizer, with_text=with_text, use_mask_token=False)
    return model.requires_grad_(False).eval(), tokenizer if with_text else None


def load(path: str | Path, weights: Weights = "auto", device: str | torch.device = "cpu") -> Pretrained:
    """Build the image-text model of a checkpoint and load its weights (strictly).

    `weights='auto'` takes the EMA teacher when it holds every tower the student has (DINO/iBOT
    convention: the teacher is the better encoder), else the student. A teacher without a text tower
    (e.g. CLIP + iBOT) loads as a vision-only model.
    """
    path = ckpt.resolve(path)  # a run folder -> its checkpoints/last.pt (file_identity must be the file's)
    state = ckpt.load(path)
    try:
        known, dropped = known_only(Config, upgrade_keys(state["config"]))
        if dropped:
            warnings.warn(
                f"checkpoint '{path}': ignoring settings this version does not know: {', '.join(dropped)}", stacklevel=2
            )
        cfg = from_dict(Config, known)
        validate(cfg)
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint '{path}' holds a config this version cannot use: {exc}") from None
    model_state: dict[str, torch.Tensor] = state["model"]
    student = _sub_state(model_state, "student.")
    teacher = _sub_state(model_state, "teacher.")
    has_text = any(k.startswith("text.") for k in student)
    teacher_complete = bool(teacher) and (not has_text or any(k.startswith("text.") for k in teacher))
    if weights == "auto":
        weights = "teacher" if teacher_complete else "student"
    if weights == "teacher" and not teacher:
        raise ckpt.CheckpointError(f"checkpoint '{path}' has no teacher (method {cfg.name}); use weights=student")
    chosen = teacher if weights == "teacher" else student
    model, tokenizer = model_for(cfg, chosen)
    ckpt.load_state_strict(model, chosen, f"checkpoint '{path}' ({weights})")
    model.to(device)
    bias = model_state.get("objectives.siglip.logit_bias")
    return Pretrained(
        model,
        tokenizer,
        cfg,
        weights,
        int(state.get("step", 0)),
        Path(path),
        float(bias.reshape(())) if bias is not None and tokenizer is not None else None,
    )
