"""Which parameters train, and at what learning rate: `model.freeze` (parts of the towers never trained),
`model.freeze_until_step` (both towers held until step N) and `optim.layer_decay` (BEiT's layer-wise lr),
resolved against a task's student (`harmony.models.parts` names the parts and layers).

A frozen parameter has `requires_grad=False`: no gradient, so no graph through it, no clipping, no DDP bucket,
no FSDP reduce-scatter. Locked parameters (`model.freeze`) are also left out of the optimiser (no AdamW state,
no weight decay). Held ones (the towers before `freeze_until_step`) are in it but get no gradient, so fused
AdamW skips them: no update, no weight decay, and their AdamW state starts at step N as that of a new
parameter (bias correction from 1).
"""

from __future__ import annotations

from torch import nn

from harmony.config import Config, ConfigError
from harmony.models.parts import layer_id, parse_pattern
from harmony.objectives.registry import needs_for_config
from harmony.train.task import PretrainTask

# the tower of each pattern word, as the student holds it (`ImageTextModel.visual` / `.text`)
TOWER_MODULES = {"image": "visual", "text": "text"}


def towers_of(task: PretrainTask) -> dict[str, nn.Module]:
    """The student's towers by pattern word (`text` only when the method has a text tower)."""
    student = task.student
    towers: dict[str, nn.Module] = {"image": student.visual}
    if student.text is not None:
        towers["text"] = student.text
    return towers


def depths_of(cfg: Config) -> dict[str, int]:
    """Blocks per tower."""
    return {"image": 0 if cfg.model.cnn_spec() else cfg.model.vision_spec().depth, "text": cfg.model.text_spec().layers}


def check_towers(cfg: Config) -> None:
    """Refuse, before any module is built, a `model.freeze` pattern naming the text tower of a method without one."""
    if needs_for_config(cfg).needs_text:
        return
    for text in cfg.model.freeze:
        if text.strip().partition(".")[0] == "text":
            raise ConfigError(
                f"config key 'model.freeze': '{text}' names the text tower; {cfg.name} has none (no objective "
                "reads captions)"
            )


class Freezing:
    """The frozen parameters of a task. Built on the unwrapped task, before any sharding: locks what
    `model.freeze` names at once, and raises a one-line `ConfigError` for a pattern that names a tower the method
    does not have or matches no trained parameter. `bind` then finds, among the parameters the optimiser holds,
    those of the towers that `freeze_until_step` holds; `update(step)` holds or releases them."""

    def __init__(self, task: PretrainTask, cfg: Config) -> None:
        check_towers(cfg)
        towers, depths = towers_of(task), depths_of(cfg)
        locked: dict[int, nn.Parameter] = {}
        for text in cfg.model.freeze:
            pattern = parse_pattern(text, depths)
            tower = towers[pattern.tower]
            hits = [p for name, p in tower.named_parameters() if p.requires_grad and pattern.covers(name)]
            if not hits:
                raise ConfigError(
                    f"config key 'model.freeze': '{text}' matches no trained parameter of {cfg.name}'s "
                    f"{pattern.tower} tower"
                )
            locked |= {id(p): p for p in hits}
        for param in locked.values():
            param.requires_grad_(False)
        self.until = cfg.model.freeze_until_step
        self.held_names = {
            f"student.{TOWER_MODULES[word]}.{name}"
            for word, tower in towers.items()
            for name, p in tower.named_parameters()
            if p.requires_grad
        }
        self.held: list[nn.Parameter] = []
        self.holding = False

    def bind(self, trainable: nn.Module) -> None:
        """Find the held towers' parameters in `trainable` (the module the optimiser is built on, as it holds
        them after sharding)."""
        if self.until > 0:
            self.held = [p for name, p in trainable.named_parameters() if name in self.held_names]

    def update(self, step: int) -> bool:
        """Hold the towers before `freeze_until_step`, release them from it on; whether this changed anything."""
        hold = step < self.until
        if hold == self.holding:
            return False
        for param in self.held:
            param.requires_grad_(not hold)
        self.holding = hold
        return True


def lr_scales(trainable: nn.Module, cfg: Config) -> dict[str, float]:
    """Each parameter's lr scale under `optim.layer_decay`, by its name in `trainable` (the student modules):
    decay ** (depth + 1 - layer) in each tower (`harmony.models.parts.layer_id`), 1 elsewhere."""
    decay, depths = cfg.optim.layer_decay, depths_of(cfg)
    prefixes = {f"student.{module}.": word for word, module in TOWER_MODULES.items()}
    scales: dict[str, float] = {}
    for name, _ in trainable.named_parameters():
        scale = 1.0
        for prefix, word in prefixes.items():
            if name.startswith(prefix):
                scale = decay ** (depths[word] + 1 - layer_id(word, name[len(prefix) :], depths[word]))
        scales[name] = scale
    return scales
