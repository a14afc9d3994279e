"""The config of a resumed run: the run's own, changed only where the user says so.

On `--resume` the base is the config stored in the checkpoint being resumed (or the run folder's
`config.yaml` when it holds no checkpoint yet), not the preset's defaults: resuming with the README's
command line must not quietly swap the learning rate or the epochs the run was started with. Only
what is given explicitly (`key=value`, `--epochs`, `--batch-size`, ...) changes it, and only the keys
in `SAFE_ON_RESUME` may change without `--force`: every other key (model, objectives, data and its
augmentations, optimiser, teacher, seed, batch size, precision, strategy, loader workers, which decide
the order of shard data) makes the continued run differ from one that was never interrupted. Among them
`model.freeze`, `model.freeze_until_step` and `optim.layer_decay` change what trains and how fast; with
`--force` the optimiser state is matched by parameter name (`harmony.train.step`), so a tower unlocked on resume
starts its AdamW state fresh.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from harmony.config import Config, ConfigError, set_override, to_dict, upgrade_keys, validate
from harmony.presets import load_preset
from harmony.typed import flatten, from_dict, known_only

# run length, logging and checkpoint cadence, and where/how fast it runs: none changes the numbers
SAFE_ON_RESUME = (
    "name",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.max_bad_steps",
    "train.device",
    "train.threads",
    "train.compile",
    "train.accum_steps",  # exact: the same numbers in fewer or more micro-batches
    "data.pin_memory",
    "data.caption_padding",  # exact: the padding after the longest caption reaches no loss
    "train.eval_every",  # evaluation, the best checkpoint and W&B read the weights and change none
    "train.keep_best",
    "train.keep_best_mode",
    "train.wandb",
)


def safe_on_resume(key: str) -> bool:
    """A dotted key whose change leaves the numbers of a resumed run those of one never interrupted."""
    return key in SAFE_ON_RESUME or key.startswith("eval.")


@dataclass
class ResumePoint:
    """What `--resume` continues: a checkpoint (None: none written yet) and the config it ran with."""

    checkpoint: Path | None
    config: dict[str, Any] | None
    source: str


def resume_point(out: Path, resume: str) -> ResumePoint:
    """The checkpoint `--resume` names ('auto': the newest complete one in `out`) and its config."""
    from harmony.core import checkpoint as ckpt

    path = ckpt.latest(out / "checkpoints") if resume == "auto" else Path(resume)
    unusable = sorted((out / "checkpoints").glob("*.pt")) if path is None else []
    if unusable:  # starting from step 0 here would quietly throw the run away
        try:
            ckpt.load(unusable[-1], lazy=True)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(
                f"--resume auto: no checkpoint in {out / 'checkpoints'} can be read ({exc}); "
                "restore one, or start the run over with --overwrite"
            ) from None
    saved = _read_yaml(out / "config.yaml")
    saved = upgrade_keys(saved) if saved is not None else None
    if path is not None:
        config = ckpt.load(path, lazy=True).get("config")
        config = upgrade_keys(config) if isinstance(config, dict) else config
        if resume == "auto" and saved is not None and saved != config:
            print(
                f"resume: {out / 'config.yaml'} differs from the config stored in {path}; the stored one is "
                "used (edits to config.yaml have no effect: pass changes as key=value)",
                file=sys.stderr,
            )
        return ResumePoint(path, config, f"checkpoint '{path}'")
    if saved is not None:
        return ResumePoint(None, saved, f"'{out / 'config.yaml'}'")
    return ResumePoint(None, None, "")


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose value differs (an objective switched on or off counts as its own key)."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def resumed_config(point: ResumePoint, preset: str | None, overrides: list[str], force: bool) -> Config:
    """The run's stored config with the explicit overrides applied; refuses changes that break
    exactness (and a different preset) unless `force`."""
    assert point.config is not None
    known, dropped = known_only(Config, point.config)
    if dropped:
        print(f"resume: ignoring settings this version does not know: {', '.join(dropped)}", file=sys.stderr)
    try:
        stored: Config = from_dict(Config, known)
    except ConfigError as exc:
        raise ConfigError(f"{point.source} holds a config this version cannot use: {exc}") from None
    base = stored
    if preset is not None:
        wanted = load_preset(preset)
        if wanted.name != stored.name:
            if not force:
                raise ConfigError(
                    f"--resume: {point.source} was trained with preset '{stored.name}', not '{preset}'; leave "
                    f"--preset out to continue it, or add --force to continue it as '{preset}'"
                )
            base = wanted
    cfg = base
    for assignment in overrides:
        cfg = set_override(cfg, assignment)
    validate(cfg)
    locked = [k for k in changed_keys(stored, cfg) if not safe_on_resume(k)]
    if locked and not force:
        shown = ", ".join(locked[:6]) + (", ..." if len(locked) > 6 else "")
        raise ConfigError(
            f"--resume: changing {shown} would make the run differ from one never interrupted ({point.source} "
            "has the settings it ran with); drop the change, start a new run in a new --out, or add --force"
        )
    return cfg
