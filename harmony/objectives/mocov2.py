"""MoCo v2: the query of one view against the momentum key of the other view and a queue of earlier keys.

With q = normalize(head(CLS_student(x_q))) and k = normalize(key_head(CLS_teacher(x_k))) (no gradient), and the
queue Q of the last K keys [K, E] (no gradient),
    L = mean_b CE([q_b . k_b, q_b Q^T] / tau, 0),
tau = 0.2 (He et al. 2020; Chen et al. 2020). As the authors' code the loss is not symmetrised: one view gives
the query, the other the key. Here the query is crop 1 and the key crop 0 (the preset draws both crops alike),
so the teacher encodes one crop. The key encoder is the task's EMA teacher (momentum from `teacher.*`, the
preset's 0.999) and the EMA copy of the head; the head is the MLP of MoCo v2, Linear(width, width)-ReLU-Linear.

The loss of a sample reads its own query and key and the queue alone, so it is not batch-coupled: with
gradient accumulation each micro-batch computes its share against the same queue. The keys of the step are
kept (`forward`) and enqueued once per optimiser step (`after_step`), gathered over every rank in rank order,
so the queue is that of one process with the whole global batch. The queue and its pointer are buffers: they
are saved with the model and a resumed run continues with them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harmony.core.distributed import gather_no_grad
from harmony.objective_config import MoCoV2Config
from harmony.objectives.base import Batch, Encoded, LossOutput, ModelDims, Needs, Objective, StepInfo, register

QUERY_CROP, KEY_CROP = 1, 0


def mocov2_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """q: normalised queries [B, E]; k: their normalised keys [B, E]; queue: normalised negatives [K, E]; the
    positive is logit 0 of each row. Keys and queue carry no gradient."""
    q = q.float()
    positive = (q * k.detach().float()).sum(dim=-1, keepdim=True)
    negative = q @ queue.detach().float().t()
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@torch.no_grad()
def enqueue(queue: torch.Tensor, pointer: torch.Tensor, keys: torch.Tensor) -> None:
    """Write `keys` [N, E] into the ring `queue` [K, E] from row `pointer` (a 0-d long tensor) on, wrapping at
    K, and advance the pointer by N (mod K), in place; more keys than rows leave the last K."""
    size, count = queue.shape[0], keys.shape[0]
    rows = (pointer + torch.arange(count, device=queue.device)) % size
    queue[rows[-size:]] = keys[-size:].to(queue.dtype)
    pointer.add_(count).remainder_(size)


def mocov2_head(width: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's MLP head: Linear(width, width) - ReLU - Linear(width, out_dim)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, out_dim))


@register
class MoCoV2Objective(Objective):
    """MoCo v2: student queries against the EMA teacher's keys and the queue of earlier keys (module doc)."""

    key = "mocov2"
    queue: torch.Tensor
    queue_pointer: torch.Tensor

    def __init__(self, cfg: MoCoV2Config, embed_dim: int) -> None:
        super().__init__(cfg)
        self.head = mocov2_head(embed_dim, cfg.out_dim)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.out_dim), dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self._step_keys: list[torch.Tensor] = []  # this rank's keys of the current optimiser step

    @classmethod
    def needs_for(cls, section: MoCoV2Config) -> Needs:
        return Needs(num_global=2, clean_crops={QUERY_CROP}, teacher_crops={KEY_CROP})

    @classmethod
    def build(cls, section: MoCoV2Config, dims: ModelDims) -> Objective:
        return cls(section, dims.vision_width)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_head, self.head)]

    def flop_parts(self) -> dict[str, list[nn.Module]]:
        return {"heads": [self.head, self.key_head]}

    def forward(self, enc: Encoded, batch: Batch, step: StepInfo) -> LossOutput:
        q = F.normalize(self.head(enc.clean[QUERY_CROP][:, 0]).float(), dim=-1)
        with torch.no_grad():
            k = F.normalize(self.key_head(enc.teacher[KEY_CROP, :, 0]).float(), dim=-1)
        self._step_keys.append(k)
        return LossOutput(mocov2_loss(q, k, self.queue, self.cfg.temperature))

    @torch.no_grad()
    def after_step(self) -> None:
        """Enqueue the step's keys of every rank (in rank order) once, whatever the micro-batches."""
        if self._step_keys:
            keys, self._step_keys = torch.cat(self._step_keys), []
            enqueue(self.queue, self.queue_pointer, gather_no_grad(keys))
