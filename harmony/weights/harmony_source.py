"""A Harmony run (folder or checkpoint) of any method as a starting point: its architecture, and its student's
or EMA teacher's towers (`--init-weights`; `auto`: the teacher where it holds every tower the student has, as
`harmony.load` chooses), plus the objectives' heads, which start a run of another method where they match."""

from __future__ import annotations

from pathlib import Path

from harmony.config import Config, ConfigError, from_dict, upgrade_keys
from harmony.core import checkpoint as ckpt
from harmony.core.errors import CheckpointError
from harmony.typed import known_only
from harmony.weights.source import CLIP_VOCAB, Source, State


def harmony_run(path: Path, weights: str) -> Source:
    what = f"--init {path}"
    file = ckpt.resolve(path)
    state = ckpt.load(file, lazy=True)
    try:
        cfg = from_dict(Config, known_only(Config, upgrade_keys(state["config"]))[0])
    except ConfigError as exc:
        raise CheckpointError(f"{what}: its config cannot be used here: {exc}") from None
    if cfg.model.cnn_spec() is not None:
        raise CheckpointError(
            f"{what}: its image tower is the CNN {cfg.model.vision}; --init starts ViT towers only (continue that "
            "run with --resume, or export it with --format timm)"
        )
    model: State = state["model"]
    has_text = any(k.startswith("student.text.") for k in model)
    teacher_complete = any(k.startswith("teacher.visual.") for k in model) and (
        not has_text or any(k.startswith("teacher.text.") for k in model)
    )
    chosen = weights if weights != "auto" else ("teacher" if teacher_complete else "student")
    if chosen == "teacher" and not any(k.startswith("teacher.") for k in model):
        raise CheckpointError(f"{what}: the run (method {cfg.name}) has no EMA teacher; use --init-weights student")

    def load() -> State:
        tower = {k[len(f"{chosen}.") :]: v for k, v in model.items() if k.startswith(f"{chosen}.")}
        if chosen == "teacher":  # a teacher without the text tower: the student's text tower and projections
            tower = {**{k[len("student.") :]: v for k, v in model.items() if k.startswith("student.")}, **tower}
        return {**tower, **{k: v for k, v in model.items() if k.startswith("objectives.")}}

    return Source(
        label=str(file),
        weights=load,
        vision=cfg.model.vision_spec(),
        image_size=cfg.data.augment.global_size,
        text=cfg.model.text_spec() if has_text else None,
        context_length=cfg.model.context_length if has_text else None,
        vocab_size=CLIP_VOCAB if has_text else None,
        embed_dim=cfg.model.embed_dim if has_text else None,
        notes=[f"{chosen} weights of a {cfg.name} run at step {int(state.get('step', 0))}"]
        + (
            ["its teacher has no text tower: the text tower and projections are the student's"]
            if chosen == "teacher" and has_text and not teacher_complete
            else []
        ),
    )
