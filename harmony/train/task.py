"""The pre-training task: student, EMA teacher, objectives; one call returns the weighted loss terms.

The task unions what the enabled objectives need and runs each distinct forward pass once per step:

- student, global resolution: the iBOT-masked global crops and any clean crops (CLIP, SimCLR) in ONE
  batched call (clean crops carry an all-false mask; without iBOT masks the clean pass is reused);
- student, local resolution: all local crops in one call;
- student, MAE-dropped: all dropped crops in one call (shared by MAE and MaskCLIP);
- teacher: the clean global crops once, under no_grad (serves iBOT, soft CLIP and MaskCLIP targets);
- student text: clean and masked captions in one call; teacher text: the clean caption once.

The training loop around it knows nothing about any single objective.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from harmony.config import Config
from harmony.core.distributed import local
from harmony.factory import build_pair
from harmony.models.normalize import normalize
from harmony.models.pair import ImageTextModel
from harmony.models.tokenizer import CaptionTokenizer
from harmony.objectives.base import Batch, Encoded, Needs, Objective, StepInfo
from harmony.objectives.registry import build_objectives


def union_needs(objectives: dict[str, Objective]) -> Needs:
    needs = Needs()
    for objective in objectives.values():
        needs = needs.union(objective.needs())
    return needs


class PretrainTask(nn.Module):
    """Student (and EMA teacher) towers plus the enabled objectives, found through the registry.

    `needs` is the union of what the objectives read; `encode` runs each distinct forward pass once;
    `forward` hands the shared outputs to every objective and sums their weighted losses."""

    def __init__(self, cfg: Config, tokenizer: CaptionTokenizer | None) -> None:
        super().__init__()
        self.cfg = cfg
        vocab = tokenizer.vocab_size if tokenizer is not None else 0
        objectives = build_objectives(cfg, vocab)
        self.needs = needs = union_needs(objectives)
        if needs.needs_text and tokenizer is None:
            raise ValueError("a text objective is enabled but no tokenizer was given")
        self.uses_masks = needs.block_masks is not None
        self.student = build_pair(cfg, tokenizer, with_text=needs.needs_text, use_mask_token=self.uses_masks)
        self.teacher: ImageTextModel | None = None
        if needs.needs_teacher:
            teacher = copy.deepcopy(self.student).requires_grad_(False)
            teacher.visual.disable_drop_path()
            if not needs.teacher_text and teacher.text is not None:
                teacher.text = None
                del teacher.visual_projection, teacher.text_projection, teacher.logit_scale
            self.teacher = teacher
        self.objectives = nn.ModuleDict(objectives)
        # gradient accumulation: what the batch-coupled objectives read (cached for the whole batch), and the
        # passes its caching phase runs (only those, unless the student is stochastic: then every pass, so the
        # random draws match the graph pass)
        coupled = {k: o for k, o in objectives.items() if o.batch_coupled}
        self.has_coupled = bool(coupled)
        self.coupled_needs = union_needs(coupled)
        self.coupled_keys = self.coupled_needs.output_keys()
        self.cache_needs = self.coupled_needs if self.deterministic_student() else needs
        self._ema_cache: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # -- bookkeeping -------------------------------------------------------------------------

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self.cfg.objectives, name).weight) for name in self.objectives}

    def student_modules(self) -> nn.ModuleDict:
        """Everything the optimiser trains (student towers, student heads, decoders)."""
        return nn.ModuleDict({"student": self.student, "objectives": self.objectives})

    def ema_parameter_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, matching student tensors) for every EMA'd module, computed once."""
        if self._ema_cache is None:
            teachers: list[torch.Tensor] = []
            students: list[torch.Tensor] = []
            pairs: list[tuple[nn.Module, nn.Module]] = []
            if self.teacher is not None:
                pairs.append((self.teacher, self.student))
            for objective in self.objectives.values():
                pairs.extend(objective.ema_pairs())  # type: ignore[operator]
            for teacher, student in pairs:
                source = dict(student.named_parameters())
                for name, param in teacher.named_parameters():
                    teachers.append(local(param.data))
                    students.append(local(source[name].data))
            self._ema_cache = (teachers, students)
        return self._ema_cache

    @torch.no_grad()
    def after_step(self, momentum: float) -> None:
        """Once per optimiser step: EMA teachers (theta_t <- m theta_t + (1 - m) theta_s), then centres."""
        teachers, students = self.ema_parameter_pairs()
        if teachers:
            torch._foreach_lerp_(teachers, students, 1.0 - momentum)
        for objective in self.objectives.values():
            objective.after_step()  # type: ignore[operator]

    def frozen_parameters(self, step: StepInfo) -> list[nn.Parameter]:
        return [p for o in self.objectives.values() for p in o.frozen_parameters(step)]  # type: ignore[operator]

    # -- the step ----------------------------------------------------------------------------

    def encode(self, batch: Batch, needs: Needs | None = None) -> Encoded:
        """Every forward pass the objectives' union of needs (or `needs`) asks for, each run once (module doc)."""
        needs = needs or self.needs
        student = self.student
        images = normalize(batch["global"])  # [G, B, 3, H, W]
        num_global, bsz = images.shape[:2]
        enc = Encoded(images=images, grid=student.visual.grid(images.shape[-2], images.shape[-1]))
        masks = batch.get("ibot_mask")
        clean = sorted(needs.clean_crops)

        # Student, global resolution: masked crops (if any) + clean crops, one call.
        inputs, input_masks = [], []
        if needs.masked_crops:
            inputs.append(images.flatten(0, 1))
            input_masks.append(masks.flatten(0, 1) if masks is not None else None)
        separate_clean = clean if (masks is not None or not needs.masked_crops) else []
        if separate_clean:
            inputs.append(images[separate_clean].flatten(0, 1))
            input_masks.append(torch.zeros_like(masks[separate_clean]).flatten(0, 1) if masks is not None else None)
        if inputs:
            mask = torch.cat(input_masks) if input_masks[0] is not None else None  # type: ignore[arg-type]
            tokens = student.visual(torch.cat(inputs), mask=mask)
            if needs.masked_crops:
                enc.masked = tokens[: num_global * bsz].unflatten(0, (num_global, bsz))
                tokens = tokens[num_global * bsz :]
            for i, g in enumerate(separate_clean):
                enc.clean[g] = tokens[i * bsz : (i + 1) * bsz]
            if not separate_clean and enc.has("masked"):
                enc.clean = {g: enc.masked[g] for g in clean}

        if needs.local_crops:
            local = normalize(batch["local"])
            enc.local = student.visual(local.flatten(0, 1)).unflatten(0, local.shape[:2])

        if needs.dropped_crops:
            dropped = sorted(needs.dropped_crops)
            keep = batch["mae_keep"][: len(dropped)].flatten(0, 1)
            tokens = student.visual(images[dropped].flatten(0, 1), keep_index=keep)
            enc.dropped = {g: tokens[i * bsz : (i + 1) * bsz] for i, g in enumerate(dropped)}
            enc.pos_embed = student.visual.position_table(enc.grid)

        if needs.needs_text:
            assert student.text is not None
            captions = [batch["text"]] if needs.text_clean else []
            if needs.text_masked:
                captions.append(batch["text_masked"])
            features = student.text(torch.cat(captions))
            if needs.text_clean:
                enc.text = features[:bsz]
            if needs.text_masked:
                enc.text_masked = features[-bsz:]

        if self.teacher is not None:
            self._encode_teacher(batch, images, enc, needs)

        if needs.embeddings:
            enc.image_embed = student.image_embedding(enc.dropped[0] if needs.embeddings_dropped else enc.clean[0])
            enc.text_embed = student.text_embedding(enc.text, batch["text"])
            enc.logit_scale = student.scale()
        return enc

    @torch.no_grad()
    def _encode_teacher(self, batch: Batch, images: torch.Tensor, enc: Encoded, needs: Needs) -> None:
        teacher = self.teacher
        assert teacher is not None
        if needs.teacher_crops:
            count = max(needs.teacher_crops) + 1
            enc.teacher = teacher.visual(images[:count].flatten(0, 1)).unflatten(0, (count, images.shape[1]))
        if needs.teacher_text:
            assert teacher.text is not None
            enc.teacher_text = teacher.text(batch["text"])
            if enc.has("teacher"):
                enc.teacher_image_embed = teacher.image_embedding(enc.teacher[0])
                enc.teacher_text_embed = teacher.text_embedding(enc.teacher_text, batch["text"])

    def forward(
        self, batch: Batch, step: StepInfo, phase: str = "step", **inputs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | Any:
        """One training step's forward: (weighted total loss, metrics incl. each unweighted loss term as
        `loss_<name>`). The other phases serve exact gradient accumulation (`harmony.train.accumulate`);
        they go through `forward` so DDP/FSDP hooks see every call:

        - "cache": the outputs the batch-coupled objectives read, as flat tensors (`Encoded.batched`);
        - "coupled": those objectives' losses on cached whole-batch outputs (`outputs=`);
        - "micro": a micro-batch's encode and its per-sample losses, each weighed by its share of the whole
          batch (`full=`); returns (loss or None, metrics, the micro-batch's outputs)."""
        if phase == "step":
            return self.losses(self.encode(batch), batch, step)
        if phase == "cache":
            outputs = self.encode(batch, self.cache_needs).batched()
            return {k: v for k, v in outputs.items() if k in self.coupled_keys}
        if phase == "coupled":
            enc = Encoded.from_batched(inputs["outputs"], **self._shared_outputs(inputs["outputs"]["images"]))
            return self.losses(enc, batch, step, coupled=True)
        if phase == "micro":
            enc = self.encode(batch)
            loss, metrics = self.losses(enc, batch, step, coupled=False, full=inputs["full"])
            return loss, metrics, enc.batched()
        raise ValueError(f"unknown task phase {phase!r}")

    def losses(
        self, enc: Encoded, batch: Batch, step: StepInfo, coupled: bool | None = None, full: Batch | None = None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Weighted sum and metrics of the objectives (only the batch-coupled ones, or only the others, when
        `coupled` is given); with `full`, each loss and metric is weighed by the micro-batch's share."""
        weights = self.weights()
        total: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            if coupled is not None and objective.batch_coupled != coupled:
                continue
            out = objective(enc, batch, step)
            loss, extra = out.loss, out.metrics
            if full is not None:
                share = objective.micro_batch_share(batch, full)  # type: ignore[operator]
                loss, extra = share * loss, {k: share * v for k, v in extra.items()}
            term = weights[name] * loss
            total = term if total is None else total + term
            metrics[f"loss_{name}"] = loss.detach()
            metrics.update(extra)
        if total is None and coupled is None:
            raise ValueError("no objective is enabled")
        return total, metrics

    def deterministic_student(self) -> bool:
        """No dropout or stochastic depth in the student: a pass over a subset of its inputs gives the same
        outputs, so the caching pass may run only what the batch-coupled objectives read."""
        for module in self.student.modules():
            if isinstance(module, DropPath) and module.drop_prob > 0:
                return False
            if isinstance(module, nn.Dropout) and module.p > 0:
                return False
        return True

    def _shared_outputs(self, images: torch.Tensor) -> dict[str, Any]:
        """The outputs every sample shares, recomputed with their graph for the whole-batch phase."""
        grid = self.student.visual.grid(images.shape[-2], images.shape[-1])
        shared: dict[str, Any] = {"grid": grid}
        if self.coupled_needs.embeddings:
            shared["logit_scale"] = self.student.scale()
        if self.coupled_needs.dropped_crops:
            shared["pos_embed"] = self.student.visual.position_table(grid)
        return shared
