"""`harmony train`: a preset plus overrides into a run folder, or the continuation of a run (`--resume`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from harmony.config import Config, ConfigError, dump_yaml
from harmony.presets import build_config, load_preset
from harmony.train.runfolder import continues_in

if TYPE_CHECKING:
    from harmony.weights.source import Source

# flag (argparse dest) -> config key: every flag of `harmony train` that sets a config value
FLAG_KEYS = {
    "data": "data_spec",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "accum_steps": "train.accum_steps",
    "device": "train.device",
    "precision": "train.precision",
    "seed": "train.seed",
    "workers": "data.num_workers",
    "image_key": "data.csv_image_key",
    "caption_key": "data.csv_caption_key",
    "init": "model.init",
    "init_weights": "model.init_weights",
}


def explicit_overrides(args: argparse.Namespace) -> list[str]:
    """`key=value` for every flag the user gave, then the positional overrides (which win)."""
    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(
            f"--max-steps must be positive, got {args.max_steps} (leave it out to train for --epochs instead)"
        )
    flags = [f"{key}={getattr(args, dest)}" for dest, key in FLAG_KEYS.items() if getattr(args, dest) is not None]
    return flags + list(args.overrides)


def _run_folder(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.preset is None:
        raise ConfigError("give --out (the run folder) or --preset (default folder runs/<preset>)")
    return Path("runs") / load_preset(args.preset).name


def with_init(cfg: Config) -> tuple[Config, Source | None]:
    """A new run's config with the architecture of its `model.init` source (printed, setting by setting)."""
    if not cfg.model.init:
        return cfg, None
    if cfg.model.cnn_spec() is not None:
        raise ConfigError(
            f"--init starts ViT and CLIP text towers; model.vision={cfg.model.vision} is a CNN, which starts from "
            "random weights (leave out --init, or the CNN)"
        )
    from harmony.weights.apply import configure
    from harmony.weights.resolve import open_init_source

    source = open_init_source(cfg.model.init, cfg.model.init_weights)
    cfg, changes = configure(cfg, source)
    if int(os.environ.get("RANK", "0")) == 0:
        for line in changes:
            print(f"--init {cfg.model.init}: {line}")
    return cfg, source


def resolve_config(args: argparse.Namespace, out: Path) -> tuple[Config, str | None, Source | None]:
    """The config to train, what to resume from ('auto', a checkpoint path, or None), and the source a new run
    starts from (`--init`)."""
    overrides = explicit_overrides(args)
    if not args.resume:
        assert args.preset is not None
        cfg, source = with_init(build_config(args.preset, overrides))
        return cfg, None, source
    from harmony.train.resume import resume_point, resumed_config

    point = resume_point(out, args.resume)
    if point.config is None:  # nothing to continue yet: a fresh run into this folder
        if args.preset is None:
            raise ConfigError(f"--resume {args.resume}: {out} holds no run to continue; give --preset to start one")
        cfg, source = with_init(build_config(args.preset, overrides))
        return cfg, args.resume, source
    cfg = resumed_config(point, args.preset, overrides, args.force)
    return cfg, str(point.checkpoint) if point.checkpoint else args.resume, None


def cmd_train(args: argparse.Namespace) -> int:
    if not args.resume and args.preset is None:
        raise ConfigError("--preset is required to start a run (see `harmony presets`)")
    out = _run_folder(args)
    if args.overwrite and continues_in(out, args.resume):
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    cfg, resume, source = resolve_config(args, out)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    from harmony.objectives.registry import check_image_tower
    from harmony.outputs import check_output_dir

    check_image_tower(cfg)  # a CNN with an objective that reads patch tokens: refused before the folder is used
    check_output_dir(out)
    from harmony.train.loop import train

    result = train(
        cfg,
        out,
        resume=resume,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        init=source,
        evaluation=getattr(args, "evaluation", None),
    )
    if result.is_main:
        print(result.summary())
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="pre-train a model", description="Pre-train with a preset and key=value overrides."
    )
    p.add_argument(
        "--preset",
        help="{method}-{size} (see `harmony presets`) or a YAML config file; optional with --resume "
        "(the run's own config is used)",
    )
    p.add_argument(
        "--data", help="builtin:shapes, a .csv/.tsv file, a shard folder, a brace pattern of .tar shards, or a URL spec"
    )
    p.add_argument("--out", help="run folder (default runs/<preset>); must be new or empty unless --resume/--overwrite")
    p.add_argument("--epochs", type=float, help="run length in epochs (train.epochs)")
    p.add_argument("--max-steps", type=int, help="run length in steps (schedules span it); overrides --epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (split over processes)")
    p.add_argument(
        "--accum-steps",
        type=int,
        help="micro-batches per optimiser step (train.accum_steps): exact gradient accumulation, less memory",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (train.device, default auto)")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], help="mixed precision (train.precision, default auto)"
    )
    p.add_argument("--workers", type=int, help="data loader workers per process")
    p.add_argument("--seed", type=int, help="random seed (train.seed)")
    p.add_argument(
        "--init",
        help="start from these weights (model.init): a Harmony run, timm:NAME:FILE, open_clip:NAME:FILE, hf-hub:ORG/NAME, "
        "dino:/ibot:/dinov2:/mae:FILE, or a timm / open_clip / transformers folder; the source decides the architecture",
    )
    p.add_argument(
        "--init-weights", choices=["auto", "student", "teacher"], help="a run's (or DINO/iBOT's) student or EMA teacher"
    )
    p.add_argument("--image-key", help="CSV/TSV column with the image paths (data.csv_image_key)")
    p.add_argument("--caption-key", help="CSV/TSV column with the captions (data.csv_caption_key)")
    p.add_argument(
        "--resume",
        help="'auto' (newest complete checkpoint in --out) or a checkpoint path; the run keeps its own config",
    )
    p.add_argument("--overwrite", action="store_true", help="start over in a used --out (deletes its previous run)")
    p.add_argument(
        "--force", action="store_true", help="with --resume: allow changes that make the run differ (model, data, ...)"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar: one plain line per log step")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")
    p.set_defaults(func=cmd_train)
