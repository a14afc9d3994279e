"""`--init SOURCE` (`model.init`) to a `Source`: local files only, nothing is downloaded.

runs/clip, runs/clip/checkpoints/last.pt     a Harmony run or checkpoint (any method)
timm:MODEL_NAME:FILE                         a timm state dict (.safetensors, .pth, .bin)
open_clip:MODEL_NAME:FILE                    open_clip weights of one of its built-in configs
hf-hub:ORG/NAME                              a transformers CLIP model in the local Hugging Face cache
dino:FILE, ibot:FILE, dinov2:FILE, mae:FILE  the official checkpoints (also KIND:TIMM_NAME:FILE)
FOLDER                                       a timm local-dir, an open_clip or a transformers CLIP folder
"""

from __future__ import annotations

from pathlib import Path

from harmony.core.errors import CheckpointError, ConfigError
from harmony.weights import harmony_source, hf_source, official, open_clip_source, timm_source
from harmony.weights.source import Source

SCHEMES = ("timm", "open_clip", "hf-hub", *official.KINDS)


def open_init_source(spec: str, weights: str = "auto") -> Source:
    """The source `spec` names (module doc); one line naming what is wrong otherwise."""
    scheme, _, rest = spec.partition(":")
    if scheme in SCHEMES and rest:
        return _scheme(scheme, rest, weights, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(path, weights)
    if path.is_file():
        return harmony_source.harmony_run(path, weights)
    if scheme and rest and len(scheme) > 1:  # a scheme, not a Windows drive letter
        raise ConfigError(
            f"--init {spec}: unknown source kind '{scheme}'; use one of {', '.join(SCHEMES)}, a folder or a file"
        )
    raise CheckpointError(f"--init {spec}: no such file or folder")


def _scheme(scheme: str, rest: str, weights: str, spec: str) -> Source:
    if scheme == "hf-hub":
        return hf_source.folder(hf_source.hub_folder(rest), label=spec)
    name, _, file = rest.rpartition(":") if scheme in ("timm", "open_clip") else ("", "", rest)
    if scheme in official.KINDS:
        name, _, file = rest.partition(":") if ":" in rest and not Path(rest).exists() else ("", "", rest)
        return official.official(scheme, Path(file).expanduser(), name or None, weights)
    if not name or not file:
        raise ConfigError(f"--init {spec}: give {scheme}:MODEL_NAME:FILE")
    path = Path(file).expanduser()
    if scheme == "timm":
        return timm_source.timm_file(name, path)
    return open_clip_source.named(name, path)


def _folder(path: Path, weights: str) -> Source:
    if (path / open_clip_source.CONFIG).is_file():
        return open_clip_source.folder(path)
    if hf_source.is_hf_clip(path):
        return hf_source.folder(path)
    if (path / "config.json").is_file():
        return timm_source.timm_folder(path)
    if (path / "checkpoints").is_dir() or (path / "last.pt").is_file():
        return harmony_source.harmony_run(path, weights)
    raise CheckpointError(
        f"--init {path}: a folder that holds no known layout (a Harmony run, an open_clip folder with "
        f"{open_clip_source.CONFIG}, a transformers CLIP folder or a timm folder with config.json)"
    )
