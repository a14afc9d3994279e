"""MAE pixel reconstruction on every global crop.

The student encodes the visible 25 % of patches (+ CLS); the decoder sees all positions and predicts
pixels; the loss is the MSE against per-patch normalised target pixels over removed patches only,
averaged per crop and summed over the crops, as the code behind the paper's numbers does (so weight 1
means what it means there; the `mae` baseline preset uses weight 0.5, i.e. the single-view MAE loss
averaged over the two crops).
"""

from __future__ import annotations

import torch

from harmony.models.decoders import MAEDecoder
from harmony.objective_config import MAEConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, Objective, StepInfo, register


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, patch * patch * 3] in raster order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalized_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation (mean 0, unit variance over the patch's pixels; MAE's norm_pix_loss)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(predicted: torch.Tensor, target: torch.Tensor, num_crops: int = 1) -> torch.Tensor:
    """Per-patch mean squared error, averaged over each crop's removed patches and summed over crops.

    predicted/target [num_crops * B, P, D], crop-major (every crop removes the same P patches)."""
    per_patch = (predicted.float() - target.float()).pow(2).mean(dim=-1)
    return per_patch.view(num_crops, -1).mean(dim=1).sum()


@register
class MAEObjective(Objective):
    """MAE on both global crops: the student encodes the kept patches, a decoder predicts the pixels of
    the removed ones."""

    key = "mae"

    def __init__(self, cfg: MAEConfig, encoder_dim: int, patch_size: int) -> None:
        super().__init__(cfg)
        self.patch_size = patch_size
        d = cfg.decoder
        self.decoder = MAEDecoder(encoder_dim, patch_size, width=d.width, depth=d.depth, heads=d.heads)

    @classmethod
    def needs_for(cls, section: MAEConfig) -> Needs:
        return Needs(num_global=2, dropped_crops={0, 1}, keep_ratio=1.0 - section.mask_ratio)

    @classmethod
    def build(cls, section: MAEConfig, dims: ModelDims) -> MAEObjective:
        return cls(section, dims.vision_width, dims.patch_size)

    def flop_parts(self) -> dict[str, list[torch.nn.Module]]:
        return {"MAE decoder": [self.decoder]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        crops = sorted(enc.dropped)
        tokens = torch.cat([enc.dropped[g] for g in crops])
        keep = batch["mae_keep"][: len(crops)].flatten(0, 1)
        remove = batch["mae_remove"][: len(crops)].flatten(0, 1)
        predicted = self.decoder(tokens, keep, enc.grid, remove)
        with torch.no_grad():
            images = enc.images[crops].flatten(0, 1).float()
            target = patchify(images, self.patch_size)
            target = target.gather(1, remove.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
            if self.cfg.norm_pix_loss:
                target = normalized_patches(target)
        return LossOutput(mae_loss(predicted, target, len(crops)))
