"""`harmony export`: the command (formats in `to_timm`, `to_open_clip`, `to_hf`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harmony.export.common import ExportError, check_exportable
from harmony.export.to_hf import export_hf
from harmony.export.to_open_clip import export_open_clip
from harmony.export.to_timm import check_timm_out, export_timm
from harmony.loading import Pretrained


def no_text_tower(pretrained: Pretrained) -> str:
    """Why the loaded weights have no text tower, and what to export instead."""
    from harmony.objectives.registry import needs_for_config

    if needs_for_config(pretrained.config).needs_text:
        return "--format open_clip needs a text tower; this run's teacher has none: export it with --weights student"
    return (
        f"--format open_clip needs a text tower; method {pretrained.config.name} trains none: export the image "
        "tower with --format timm"
    )


def cmd_export(args: argparse.Namespace) -> int:
    from harmony.loading import load
    from harmony.outputs import OutputError, check_output_dir, check_output_file

    out = Path(args.out)
    if args.format == "timm":  # all before the (slow) checkpoint load
        check_timm_out(out)
        check_output_file(out)
        taken = [p for p in (out, out.with_suffix(".json")) if p.exists()]
    else:
        check_output_dir(out)
        taken = sorted(out.iterdir()) if out.is_dir() else []
    if taken and not args.overwrite:
        names = ", ".join(str(p) for p in taken[:3]) + (", ..." if len(taken) > 3 else "")
        raise OutputError(f"--out {out}: {names} already exist(s); give --overwrite to replace an earlier export")
    pretrained = load(args.checkpoint, weights=args.weights)
    if args.format == "open_clip" and pretrained.model.text is None:
        raise ExportError(no_text_tower(pretrained))
    if args.format != "timm":
        check_exportable(pretrained.model, args.format, pretrained.config.model.vision)
    provenance = {
        "checkpoint": str(pretrained.path.resolve()),
        "weights": pretrained.weights,
        "step": pretrained.step,
        "method": pretrained.config.name,
        "vision": pretrained.config.model.vision,
        "text": pretrained.config.model.text if pretrained.model.has_text else None,
    }
    if args.format == "timm":
        written = export_timm(pretrained.model, out, provenance)
        usage = json.loads(written[1].read_text())["python"]
    elif args.format == "open_clip":
        written = export_open_clip(pretrained.model, out, provenance, pretrained.logit_bias)
        usage = f"open_clip.create_model_and_transforms('local-dir:{out.resolve()}')"
    else:
        written = export_hf(pretrained.model, out, provenance, pretrained.logit_bias)
        kind = json.loads((out / "harmony_export.json").read_text())["class"]
        usage = f"transformers.{kind}.from_pretrained('{out.resolve()}')"
    print(f"exported the {pretrained.weights} weights (step {pretrained.step}) for {args.format}:")
    for path in written:
        print(f"  {path}")
    print(f"load with: {usage}")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export encoders for timm, open_clip or transformers",
        description="Write a checkpoint's vision tower for timm, or its towers for open_clip or transformers.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--format",
        required=True,
        choices=["timm", "open_clip", "hf"],
        help="timm: vision tower; open_clip: both towers; hf: a transformers folder (CLIPModel, CLIPVisionModel, ViTModel)",
    )
    p.add_argument("--out", required=True, help="timm: a .safetensors file (+ .json sidecar); open_clip, hf: a folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    p.add_argument(
        "--weights",
        choices=["auto", "student", "teacher"],
        default="auto",
        help="auto: the EMA teacher where it has every tower, else the student",
    )
    p.set_defaults(func=cmd_export)
