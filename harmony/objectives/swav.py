"""SwAV (Caron et al. 2020): swapped prediction of online cluster codes over multi-crop views.

Views: the two clean global crops and the first `local_crops` local crops, V in all. The student's CLS tokens of
every view go through one projection head (Linear-BN-ReLU-Linear, BN over all views of the global batch), are
L2-normalised (z) and scored against the prototypes, c_k unit rows: s = z C^T [V, B, K]. For each global crop g the
codes q_g come from Sinkhorn-Knopp on exp(s_g / eps) (no gradient), its sums over every rank (all-reduced, as the
authors' `distributed_sinkhorn`), `sinkhorn_iterations` (3) alternations of prototype rows (1/K each) and sample
columns (1/N each), then columns scaled to sum 1. The loss predicts each global crop's codes from every other view:
    L = 1/2 sum_g 1/(V - 1) sum_{v != g} mean_b CE(q_{g,b}, softmax(s_{v,b} / tau)),   tau = 0.1, eps = 0.05.
The prototypes are re-normalised after every optimiser step (and at start) and get no update for the first
`freeze_prototypes_epochs` (1). With `queue_length` L > 0 the embeddings of the global crops of the global batch
(no gradient) are queued after each step from `queue_start_epochs` on, newest first; once L are held, each rank
adds its share of the queue's rows (scored by the current prototypes) to Sinkhorn's columns, as the authors do
once their queue is full. The queue is the same on every rank and a buffer, so it is in checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import all_reduce_sum, gather_no_grad, local, rank, world_size
from harmony.models.heads import batchnorm_mlp
from harmony.objective_config import SwAVConfig
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, Objective, StepInfo, register


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Codes [M, K] (rows sum to 1) of this rank's rows `scores` [M, K]; the sums run over the rows of every rank."""
    q = torch.exp(scores.float() / epsilon).t()  # [K, M]
    columns = all_reduce_sum(q.new_tensor(float(q.shape[1])))  # the samples of every rank
    prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype's total weight 1/K
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)  # each sample's total weight 1/N
        q /= columns
    return (q * columns).t()


def swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores [V, B, K] of every view (global crops first), codes [G, B, K] of the global crops: the mean over the
    (g, v != g) pairs of mean_b CE(codes_g, softmax(scores_v / tau))."""
    num_views, batch = scores.shape[:2]
    num_global = codes.shape[0]
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)
    cross = -torch.einsum("gbk,vbk->gv", codes.float(), log_p) / batch
    same_view = torch.zeros(num_global, num_views, dtype=torch.bool, device=cross.device)
    same_view[:, :num_global] = torch.eye(num_global, dtype=torch.bool, device=cross.device)
    return cross[~same_view].mean()


@register
class SwAVObjective(Objective):
    """SwAV on the student's two clean global crops and its local crops (no teacher)."""

    key = "swav"
    batch_coupled = True
    queue: torch.Tensor
    queue_filled: torch.Tensor

    def __init__(self, cfg: SwAVConfig, embed_dim: int) -> None:
        super().__init__(cfg)
        self.projector = batchnorm_mlp(embed_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2, output_norm="none")
        self.prototypes = nn.Linear(cfg.out_dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        if cfg.queue_length:
            self.register_buffer("queue", torch.zeros(2, cfg.queue_length, cfg.out_dim))
            self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None  # this step's global-crop embeddings of every rank [2, N, D]

    @classmethod
    def needs_for(cls, section: SwAVConfig) -> Needs:
        return Needs(num_global=2, clean_crops={0, 1}, local_crops=section.local_crops)

    @classmethod
    def build(cls, section: SwAVConfig, dims: ModelDims) -> Objective:
        return cls(section, dims.vision_width)

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.projector, self.prototypes]}

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Each prototype back to unit length (rows are whole on every shard, so a sharded one is normalised too)."""
        weight = local(self.prototypes.weight.data)
        weight.copy_(F.normalize(weight, dim=1))

    def frozen_parameters(self, step: StepInfo) -> list[nn.Parameter]:
        return list(self.prototypes.parameters()) if step.epoch < self.cfg.freeze_prototypes_epochs else []

    def after_step(self) -> None:
        """Once per optimiser step: the prototypes back on the sphere, this step's embeddings into the queue."""
        self.normalize_prototypes()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with torch.no_grad():
                self.queue.copy_(torch.cat([pending, self.queue], dim=1)[:, : self.cfg.queue_length])
                self.queue_filled.add_(pending.shape[1]).clamp_(max=self.cfg.queue_length)

    def queue_share(self) -> torch.Tensor | None:
        """This rank's rows of the full queue [2, L / ranks, D] (every rank holds the whole queue, each adds a
        different part to Sinkhorn's columns); None while the queue is off or not yet full."""
        if not self.cfg.queue_length or int(self.queue_filled) < self.cfg.queue_length:
            return None
        return torch.tensor_split(self.queue, world_size(), dim=1)[rank()]

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        views = [enc.clean[0][:, 0], enc.clean[1][:, 0]]
        if self.cfg.local_crops:
            views += list(enc.local[: self.cfg.local_crops, :, 0])
        bsz = views[0].shape[0]
        z = F.normalize(self.projector(torch.cat(views)), dim=-1)  # one head call: BN over every view
        scores = self.prototypes(z).unflatten(0, (len(views), bsz))  # [V, B, K]
        queued = self.queue_share()
        with torch.no_grad():
            codes = []
            for g in range(2):
                columns = scores[g] if queued is None else torch.cat([self.prototypes(queued[g]), scores[g]])
                codes.append(sinkhorn(columns, self.cfg.epsilon, self.cfg.sinkhorn_iterations)[-bsz:])
        loss = swapped_prediction(scores, torch.stack(codes), self.cfg.temperature)
        if not self.cfg.queue_length:
            return LossOutput(loss)
        if step.epoch >= self.cfg.queue_start_epochs:  # every rank's rows, crop-major [2, N, D]
            rows = z[: 2 * bsz].detach().float().unflatten(0, (2, bsz)).transpose(0, 1)
            self._pending = gather_no_grad(rows).transpose(0, 1)
        return LossOutput(loss, {"swav_queue_used": torch.tensor(float(queued is not None))})
