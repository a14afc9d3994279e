"""MAE pixel reconstruction on every global crop.

The student encodes the visible 25 % of patches (+ CLS); the decoder sees all positions and predicts
pixels; the loss is the MSE against per-patch normalised target pixels over removed patches only,
averaged per crop and summed over the crops, as the code behind the paper's numbers does (so weight 1
means what it means there; the `mae` baseline preset uses weight 0.5, i.e. the single-view MAE loss
averaged over the two crops).
"""

from __future__ import annotations

import torch

from harmony.config import MAEConfig
from harmony.models.decoders import MAEDecoder
from harmony.objectives.base import Encoded, LossOutput, Needs, Objective, StepInfo


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


class MAEObjective(Objective):
    name = "mae"

    def __init__(self, cfg: MAEConfig, encoder_dim: int, patch_size: int, num_global: int = 2) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = patch_size
        self.num_global = num_global
        d = cfg.decoder
        self.decoder = MAEDecoder(encoder_dim, patch_size, width=d.width, depth=d.depth, heads=d.heads)

    def needs(self) -> Needs:
        crops = set(range(self.num_global))
        return Needs(num_global=self.num_global, dropped_crops=crops, keep_ratio=1.0 - self.cfg.mask_ratio)

    def forward(self, enc: Encoded, batch: dict[str, torch.Tensor], step: StepInfo) -> LossOutput:
        assert enc.images is not None
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
