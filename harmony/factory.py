"""Models from a config: the one place that maps config keys to the plain arguments of `harmony.models`
(so the model package never imports the config)."""

from __future__ import annotations

from harmony.config import Config
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer


def build_pair(
    cfg: Config, tokenizer: CaptionTokenizer | None, with_text: bool, use_mask_token: bool
) -> ImageTextModel:
    """The student/teacher pair for a config (the text tower only when a text objective is on)."""
    if with_text and tokenizer is None:
        raise ValueError("a text tower needs a tokenizer")
    # the contrastive section that owns the learnable temperature (CLIP, FLIP, SigLIP), if any
    scale_owner = next((s for s in cfg.objectives.sections().values() if hasattr(s, "logit_scale_init")), None)
    model = ImageTextModel(
        vision_size=cfg.model.image_tower(),
        text_size=cfg.model.text_spec() if with_text else None,
        embed_dim=cfg.model.embed_dim,
        img_size=cfg.data.augment.global_size,
        vocab_size=tokenizer.vocab_size if tokenizer else 0,
        context_length=cfg.model.context_length,
        eot_id=tokenizer.eot_id if tokenizer else -1,
        drop_path_rate=cfg.model.drop_path_rate,
        use_mask_token=use_mask_token,
        vision_init=cfg.model.vision_init,
        logit_scale_init=getattr(scale_owner, "logit_scale_init", 1 / 0.07),
        logit_scale_max=getattr(scale_owner, "logit_scale_max", 100.0),
    )
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
