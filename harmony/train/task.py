"""The pre-training task: student, EMA teacher, objectives; its passes return the weighted loss terms.

The task unions what the enabled objectives need and runs each distinct forward pass once per step:

- student, global resolution: every global crop (through iBOT's block masks when they are on) and any clean
  crops (CLIP, SimCLR) in ONE batched call (clean crops carry an all-false mask; without iBOT masks the
  global crops' tokens serve as the clean ones);
- student, local resolution: all local crops in one call;
- student, MAE-dropped: all dropped crops in one call (shared by MAE and MaskCLIP);
- teacher: the clean global crops once, under no_grad (serves iBOT, soft CLIP and MaskCLIP targets);
- student text: clean and masked captions in one call; teacher text: the clean caption once.

A step is one pass (`step_losses`), or, with exact gradient accumulation (`harmony.train.accumulate`), a cache
pass per micro-batch (`cache_outputs`), the batch-coupled losses on the whole batch (`coupled_losses`) and a
graph pass per micro-batch (`micro_losses`). DDP's gradient reducer and FSDP's parameter gathering hook a
module's `forward` only, so `forward(pass, *args)` runs any of them: call a pass through the wrapped task with
`call_pass(model, PretrainTask.<pass>, *args)`, typed as the pass returns. The training loop around it knows
nothing about any single objective.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Sequence
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

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

P = ParamSpec("P")
R = TypeVar("R")


class StepLosses(NamedTuple):
    """The weighted total loss of a pass's objectives and the metrics (each unweighted term as `loss_<name>`).
    Passes return named tuples: DDP finds the tensors of its outputs in them."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class MicroLosses(NamedTuple):
    """A micro-batch's per-sample losses, each weighed by the micro-batch's share of the whole batch (None when
    every objective is batch-coupled), their metrics, and the outputs the coupled pass has gradients for."""

    loss: torch.Tensor | None
    metrics: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def call_pass(
    model: nn.Module, method: Callable[Concatenate[PretrainTask, P], R], *args: P.args, **kwargs: P.kwargs
) -> R:
    """`method(task, *args, **kwargs)` run through `model`'s forward: the task, or DDP around it (module doc)."""
    return cast(R, model(method, *args, **kwargs))


def _with_loss(loss: torch.Tensor | None, metrics: dict[str, torch.Tensor]) -> StepLosses:
    """The losses of a pass that must have an objective."""
    if loss is None:
        raise ValueError("no objective is enabled")
    return StepLosses(loss, metrics)


class PretrainTask(nn.Module):
    """Student (and EMA teacher) towers plus the enabled objectives, found through the registry.

    `needs` is the union of what the objectives read; `encode` runs each distinct forward pass once; the passes
    (module doc) hand the shared outputs to the objectives and sum their weighted losses."""

    def __init__(self, cfg: Config, tokenizer: CaptionTokenizer | None) -> None:
        super().__init__()
        self.cfg = cfg
        vocab = tokenizer.vocab_size if tokenizer is not None else 0
        objectives = build_objectives(cfg, vocab)
        self.needs = needs = Needs.union_of(objective.needs() for objective in objectives.values())
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
        self._ema_cache: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # -- bookkeeping -------------------------------------------------------------------------

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self.cfg.objectives, name).weight) for name in self.objectives}

    def enabled(self) -> dict[str, Objective]:
        """The objectives by config key, typed (`objectives` is their `ModuleDict`: parameters, state)."""
        return cast(dict[str, Objective], dict(self.objectives.items()))

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
            for objective in self.enabled().values():
                pairs.extend(objective.ema_pairs())
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
        for objective in self.enabled().values():
            objective.after_step()

    def frozen_parameters(self, step: StepInfo) -> list[nn.Parameter]:
        return [p for o in self.enabled().values() for p in o.frozen_parameters(step)]

    # -- the step ----------------------------------------------------------------------------

    def encode(self, batch: Batch, needs: Needs | None = None, given: dict[str, torch.Tensor] | None = None) -> Encoded:
        """Every forward pass the objectives' union of needs (or `needs`) asks for, each run once (module doc). A
        student tower pass whose every output is in `given` (flat names, `Encoded.batched`: the outputs of a frozen
        tower that gradient accumulation computed in its caching pass) is not run again."""
        needs = needs or self.needs
        student = self.student
        images = normalize(batch["global"])  # [G, B, 3, H, W]
        num_global, bsz = images.shape[:2]
        grid = student.visual.grid(images.shape[-2], images.shape[-1])
        enc = Encoded.from_batched(given or {}, images=images, grid=grid)
        masks = batch.get("ibot_mask")
        clean = sorted(needs.clean_crops)

        # Student, global resolution: every global crop (iBOT-masked if masks) + clean crops, one call.
        inputs, input_masks = [], []
        run_global = needs.global_crops and not enc.has("global_crops")
        if run_global:
            inputs.append(images.flatten(0, 1))
            input_masks.append(masks.flatten(0, 1) if masks is not None else None)
        separate_clean = clean if (masks is not None or not needs.global_crops) else []
        run_clean = [] if set(separate_clean) <= set(enc.clean) else separate_clean
        if run_clean:
            inputs.append(images[run_clean].flatten(0, 1))
            input_masks.append(torch.zeros_like(masks[run_clean]).flatten(0, 1) if masks is not None else None)
        if inputs:
            mask = torch.cat(input_masks) if input_masks[0] is not None else None  # type: ignore[arg-type]
            tokens = student.visual(torch.cat(inputs), mask=mask)
            if run_global:
                enc.global_crops = tokens[: num_global * bsz].unflatten(0, (num_global, bsz))
                tokens = tokens[num_global * bsz :]
            for i, g in enumerate(run_clean):
                enc.clean[g] = tokens[i * bsz : (i + 1) * bsz]
        if not separate_clean and enc.has("global_crops"):
            enc.clean = {g: enc.global_crops[g] for g in clean}

        if needs.local_crops and not enc.has("local"):
            local = normalize(batch["local"])
            enc.local = student.visual(local.flatten(0, 1)).unflatten(0, local.shape[:2])

        if needs.dropped_crops:
            dropped = sorted(needs.dropped_crops)
            if not set(dropped) <= set(enc.dropped):
                keep = batch["mae_keep"][: len(dropped)].flatten(0, 1)
                tokens = student.visual(images[dropped].flatten(0, 1), keep_index=keep)
                enc.dropped = {g: tokens[i * bsz : (i + 1) * bsz] for i, g in enumerate(dropped)}
            enc.pos_embed = student.vit().position_table(enc.grid)

        text_keys = [key for key, wanted in (("text", needs.text_clean), ("text_masked", needs.text_masked)) if wanted]
        if text_keys and not all(enc.has(key) for key in text_keys):
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
        if needs.token_embeddings:
            enc.image_token_embed = student.image_token_embedding(enc.clean[0])
            enc.text_token_embed = student.text_token_embedding(enc.text)
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

    def forward(self, method: Callable[Concatenate[PretrainTask, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the pass `method` of this task: the one entry the DDP and FSDP wrappers hook (module doc)."""
        return method(self, *args, **kwargs)

    def step_losses(self, batch: Batch, step: StepInfo) -> StepLosses:
        """One training step's forward on the whole batch, every objective."""
        return _with_loss(*self.losses(self.encode(batch), batch, step))

    def cache_outputs(self, batch: Batch, needs: Needs, keys: Collection[str]) -> dict[str, torch.Tensor]:
        """The flat outputs `keys` (`Encoded.batched`) of the passes serving `needs`: what gradient accumulation
        caches of each micro-batch, without a graph, for the batch-coupled objectives."""
        return {key: value for key, value in self.encode(batch, needs).batched().items() if key in keys}

    def coupled_losses(
        self, batch: Batch, step: StepInfo, outputs: dict[str, torch.Tensor], needs: Needs
    ) -> StepLosses:
        """The batch-coupled objectives' losses on the whole batch's cached `outputs`; the outputs every sample
        shares that their `needs` ask for are recomputed here, with their graph."""
        enc = Encoded.from_batched(outputs, **self._shared_outputs(outputs["images"], needs))
        return _with_loss(*self.losses(enc, batch, step, coupled=True))

    def micro_losses(
        self, micro: Batch, full: Batch, step: StepInfo, keys: Sequence[str], given: dict[str, torch.Tensor]
    ) -> MicroLosses:
        """A micro-batch's encode (reusing the `given` outputs of frozen towers) and its per-sample objectives'
        losses, each weighed by its share of the whole batch `full`, with its outputs `keys` (those the coupled pass
        has gradients for), in that order."""
        enc = self.encode(micro, given=given)
        loss, metrics = self.losses(enc, micro, step, coupled=False, full=full)
        outputs = enc.batched()
        return MicroLosses(loss, metrics, {key: outputs[key] for key in keys})

    def losses(
        self, enc: Encoded, batch: Batch, step: StepInfo, coupled: bool | None = None, full: Batch | None = None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Weighted sum (None without objectives) and metrics of the objectives (only the batch-coupled ones, or
        only the others, when `coupled` is given); with `full`, each loss and metric is weighed by the micro-batch's
        share."""
        weights = self.weights()
        total: torch.Tensor | None = None
        metrics: dict[str, torch.Tensor] = {}
        for name, objective in self.enabled().items():
            if coupled is not None and objective.batch_coupled != coupled:
                continue
            out = objective(enc, batch, step)
            loss, extra = out.loss, out.metrics
            if full is not None:
                share = objective.micro_batch_share(batch, full)
                loss, extra = share * loss, {k: share * v for k, v in extra.items()}
            term = weights[name] * loss
            total = term if total is None else total + term
            metrics[f"loss_{name}"] = loss.detach()
            metrics.update(extra)
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

    def _shared_outputs(self, images: torch.Tensor, needs: Needs) -> dict[str, Any]:
        """The outputs every sample shares that `needs` ask for, recomputed with their graph."""
        grid = self.student.visual.grid(images.shape[-2], images.shape[-1])
        shared: dict[str, Any] = {"grid": grid}
        if needs.embeddings:
            shared["logit_scale"] = self.student.scale()
        if needs.dropped_crops:
            shared["pos_embed"] = self.student.vit().position_table(grid)
        return shared
