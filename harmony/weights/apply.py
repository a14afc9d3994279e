"""Starting a run from a `Source`: the source decides the architecture (`configure`, before the model is built)
and its weights initialise the student (`initialise`, after); the preset decides the method. Everything the
source lacks (heads, decoders, the mask token, a tower it does not hold) starts fresh, and the EMA teachers
start as copies of the initialised student."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harmony.config import Config, from_dict, validate
from harmony.core.errors import CheckpointError
from harmony.typed import merge, to_dict
from harmony.weights.source import CLIP_VOCAB, Source, State
from harmony.weights.vit import resample_positions


def configure(cfg: Config, source: Source) -> tuple[Config, list[str]]:
    """`cfg` with the source's architecture, and a line per setting it changed from the preset's."""
    model: dict[str, Any] = {}
    changes: list[str] = []
    if source.vision is not None:
        model |= {"vision": source.label, "vision_arch": dataclasses.asdict(source.vision)}
        changes.append(_tower_change("model.vision", cfg.model.vision, cfg.model.vision_spec(), source.vision))
    if source.text is not None:
        if source.vocab_size not in (CLIP_VOCAB, CLIP_VOCAB + 1):
            raise CheckpointError(
                f"--init {source.label}: its vocabulary is not CLIP's BPE, which Harmony tokenises with"
            )
        model |= {"text": source.label, "text_arch": dataclasses.asdict(source.text)}
        changes.append(_tower_change("model.text", cfg.model.text, cfg.model.text_spec(), source.text))
        model["context_length"] = source.context_length
    if source.embed_dim is not None:
        model["embed_dim"] = source.embed_dim
    for key in ("context_length", "embed_dim"):
        if key in model and model[key] != getattr(cfg.model, key):
            changes.append(f"model.{key}: {getattr(cfg.model, key)} -> {model[key]}")
    augment: dict[str, int] = {}
    if source.vision is not None:  # crops the source's patches tile: the nearest multiple of its patch size
        patch = source.vision.patch_size
        for key in ("global_size", "local_size"):
            size = getattr(cfg.data.augment, key)
            if size % patch:
                augment[key] = max(round(size / patch), 1) * patch
                changes.append(
                    f"data.augment.{key}: {size} -> {augment[key]} (a multiple of the source's patch size {patch})"
                )
    updated = from_dict(Config, merge(to_dict(cfg), {"model": model, "data": {"augment": augment}}))
    validate(updated)
    size = updated.data.augment.global_size
    if source.vision is not None and source.image_size and source.image_size != size:
        patch = source.vision.patch_size
        changes.append(
            f"the position table of {source.image_size // patch}x{source.image_size // patch} patches "
            f"({source.image_size} px) is interpolated to {size // patch}x{size // patch} (data.augment.global_size={size})"
        )
    return updated, changes


def _tower_change(key: str, name: str, old: Any, new: Any) -> str:
    """'model.vision: vit-s16 -> timm:... (embed_dim 384 -> 768, ...)', or '(the same architecture)'."""
    diffs = [
        f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
        for f in dataclasses.fields(new)
        if f.name != "timm_name" and getattr(old, f.name) != getattr(new, f.name)
    ]
    return f"{key}: {name} -> the source's ({', '.join(diffs) if diffs else 'the same architecture'})"


@dataclass
class InitSummary:
    """What `initialise` did, by tensor name (the student's), for the log and the run folder's init.json."""

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        def few(names: list[str]) -> str:
            return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")

        out = [f"init: {len(self.loaded)} tensors loaded from {self.source}" + "".join(f"; {n}" for n in self.notes)]
        if self.adapted:
            out.append(f"init: adapted: {'; '.join(self.adapted)}")
        if self.new:
            out.append(f"init: new (start fresh): {few(self.new)}")
        if self.ignored:
            out.append(f"init: ignored (this method has no place for them): {few(self.ignored)}")
        out.append("init: the EMA teachers start as copies of the initialised student")
        return out


def _fit(key: str, value: torch.Tensor, own: torch.Tensor, summary: InitSummary) -> torch.Tensor:
    """A source tensor shaped for the student: the position table resampled, the vocabulary's [MASK] row kept."""
    if value.shape == own.shape:
        return value
    if key == "visual.vit.pos_embed":
        grid = int((own.shape[1] - 1) ** 0.5)
        summary.adapted.append(f"{key} resampled from {tuple(value.shape)} to {tuple(own.shape)}")
        return resample_positions(value.float(), grid).to(own.dtype)
    if key == "text.token_embedding.weight" and value.shape[0] == own.shape[0] - 1:
        summary.adapted.append(f"{key}: the source's {value.shape[0]} rows, the [MASK] row starts fresh")
        return torch.cat([value.to(own.dtype), own[-1:].cpu()])
    if key == "logit_scale" and value.numel() == own.numel():
        return value.reshape(own.shape)
    raise CheckpointError(
        f"--init {summary.source}: {key} has shape {tuple(value.shape)} where this model has {tuple(own.shape)}"
    )


def _load_into(module: nn.Module, state: State, prefix: str, summary: InitSummary) -> None:
    own = module.state_dict()
    chosen = {k: _fit(prefix + k, state[prefix + k], own[k], summary) for k in own if prefix + k in state}
    module.load_state_dict(chosen, strict=False)
    summary.loaded += [prefix + k for k in chosen]
    summary.new += [prefix + k for k in own if k not in chosen]


@torch.no_grad()
def initialise(task: Any, source: Source) -> InitSummary:
    """Load `source` into the task's student (towers, projections, logit scale; the objectives' modules where
    a Harmony run has the same), then make every EMA teacher a copy of the student it follows."""
    summary = InitSummary(source.label, notes=list(source.notes))
    state = source.weights()
    _load_into(task.student, state, "", summary)
    _load_into(task.objectives, state, "objectives.", summary)
    used = set(summary.loaded)
    summary.ignored = sorted(k for k in state if k not in used)
    module_names = {id(module): name for name, module in task.objectives.named_modules()}
    copies = tuple(f"objectives.{module_names[id(t)]}." for o in task.objectives.values() for t, _ in o.ema_pairs())
    summary.new = [k for k in summary.new if not k.startswith(copies)]
    if task.teacher is not None:
        task.teacher.load_state_dict(
            {k: v for k, v in task.student.state_dict().items() if k in task.teacher.state_dict()}
        )
    for teacher, student in (pair for o in task.objectives.values() for pair in o.ema_pairs()):
        teacher.load_state_dict(student.state_dict())
    return summary
