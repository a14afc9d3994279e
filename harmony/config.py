"""Typed configuration: dataclasses are the source of truth, `key=value` overrides and the YAML presets of
`harmony.presets` layer on top; every mistake is a one-line `ConfigError` naming the key (`validate`: checks beyond types)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from harmony.eval_config import EvalConfig, check_eval
from harmony.models.parts import parse_pattern
from harmony.models.sizes import CNN_PREFIX, TEXT_SIZES, VISION_SIZES, CNNSize, TextSize, VisionSize, cnn_size
from harmony.objective_config import HeadConfig, ObjectivesConfig
from harmony.typed import NONE_WORDS, ConfigError, from_dict, merge, to_dict

__all__ = ["Config", "ConfigError", "dump_yaml", "from_dict", "set_override", "to_dict", "upgrade_keys", "validate"]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """`vision` / `text` name a size (`harmony.models.sizes`), `vision` also a timm CNN (`timm:resnet50`,
    `timm:resnet-tiny`: a pooled image tower without patch tokens); a model started from another library's weights
    (`model.init`) records that source's architecture in `vision_arch` / `text_arch`, which then decide (and
    `vision` / `text` only name the source).

    `freeze` lists what of the towers is not trained (`harmony.models.parts`): `image` / `text` (a whole tower),
    or one part of one: `TOWER.embed` (the embedding stage), `TOWER.blocks.I` or `TOWER.blocks.I-J` (blocks I to
    J, from 0), `TOWER.norm` (the final norm), `image.patch_embed`, `image.pos_embed`, `image.cls_token`,
    `image.mask_token`, `image.norm_pre`, `text.token_embedding`, `text.positional_embedding`. `image` with a
    CLIP preset is LiT (a locked image tower). `freeze_until_step` N > 0 trains neither tower (projections, heads
    and decoders do train) before step N; from N on both train, except what `freeze` names."""

    vision: str = "tiny-test"
    text: str = "tiny-test"
    vision_arch: VisionSize | None = None
    text_arch: TextSize | None = None
    # the weights a new run starts from (`--init`, harmony.weights.resolve): a Harmony run, timm, open_clip,
    # transformers' CLIP or an official DINO/iBOT/DINOv2/MAE checkpoint; `init_weights` picks a run's student
    # or EMA teacher (auto: the teacher where it holds every tower)
    init: str = ""
    init_weights: Literal["auto", "student", "teacher"] = "auto"
    embed_dim: int = 512
    context_length: int = 77
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    # "jax": xavier-uniform linears, lecun-normal patch embedding (big_vision, MAE); "timm": trunc-normal
    # 0.02. The jax scheme leaves the early plateau of small ViTs far sooner (docs/tuning.md).
    vision_init: Literal["jax", "timm"] = "jax"
    head: HeadConfig = field(default_factory=HeadConfig)
    freeze: list[str] = field(default_factory=list)
    freeze_until_step: int = 0

    def vision_spec(self) -> VisionSize:
        """The ViT image tower's architecture: `vision_arch`, else the named size (see `cnn_spec` for a CNN)."""
        return self.vision_arch or VISION_SIZES[self.vision]

    def cnn_spec(self) -> CNNSize | None:
        """The CNN image tower `vision` names (`timm:NAME`), or None for a ViT."""
        return None if self.vision_arch else cnn_size(self.vision)

    def image_tower(self) -> VisionSize | CNNSize:
        return self.cnn_spec() or self.vision_spec()

    def patch_size(self) -> int:
        """The side image crops must be a multiple of: the ViT's patch; 1 for a CNN (any size)."""
        return 1 if self.cnn_spec() else self.vision_spec().patch_size

    def text_spec(self) -> TextSize:
        return self.text_arch or TEXT_SIZES[self.text]


# ----------------------------------------------------------------------------------------------
# Data, optimisation, training
# ----------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Multi-crop augmentation (iBOT's recipe). Probabilities are per crop; `*_blur` are per global crop."""

    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    flip: float = 0.5
    color_jitter: float = 0.8
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.2
    global_blur: tuple[float, float] = (1.0, 0.1)
    global_solarize: tuple[float, float] = (0.0, 0.2)
    local_blur: float = 0.5


@dataclass
class BuiltinDataConfig:
    """The generated `builtin:shapes` dataset."""

    image_size: int = 64
    num_train: int = 10000
    num_val: int = 1000
    seed: int = 0
    mismatch_rate: float = 0.1


@dataclass
class DataConfig:
    """Loader settings. `csv_*` name the columns of a .csv/.tsv spec (open_clip's convention);
    `csv_separator` is auto (from the extension), comma, tab or one character. Images above
    `max_image_pixels` are refused unread. `shuffle_buffer` 0 keeps shard samples in stored order.
    `alpha_background` is the colour transparent pixels are composited on (white, black, gray, #rrggbb, r,g,b).
    `weights`: one per `::`-separated part of `data_spec`, which then become separate sources, each sample drawn
    from part i with probability weights[i] / sum(weights) (`harmony.data.mixing`); without them `::` joins the
    parts into one source. `epoch_size` (0: the data's size; the sources' sizes summed under mixing) is the
    samples per epoch of remote shards or a mix."""

    num_workers: int = 2
    weights: list[float] = field(default_factory=list)
    epoch_size: int = 0
    shuffle_buffer: int = 1000
    resample_shards: bool = False
    pin_memory: bool = True
    csv_image_key: str = "filepath"
    csv_caption_key: str = "caption"
    csv_separator: str = "auto"
    max_image_pixels: int = 8192 * 8192
    alpha_background: str = "white"
    device_augment: str = "auto"  # auto (on for CUDA) | true | false: decode + crop on the device
    # batch: captions are cut after the batch's longest one (rounded up to 8), exact for the causal text tower;
    # context: every batch padded to model.context_length (fixed shapes)
    caption_padding: Literal["batch", "context"] = "batch"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)


@dataclass
class OptimConfig:
    """AdamW; `lr` is per 256 images of global batch (lr_actual = lr * batch_size / 256)."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 3.0
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    # per_param: each parameter's gradient norm is clipped at clip_grad separately (DINO, iBOT, the code
    # behind the paper); global: the norm of all gradients together (torch's clip_grad_norm_)
    clip_mode: Literal["per_param", "global"] = "per_param"
    # layer-wise lr decay (BEiT): a tower's layer l of L blocks gets lr x layer_decay ** (L + 1 - l), the
    # embedding stage being layer 0 and what follows the blocks (and projections, heads, decoders) scale 1;
    # 1.0: off (harmony.models.parts)
    layer_decay: float = 1.0


@dataclass
class TeacherConfig:
    """EMA teachers: momentum goes start -> end over training with the given schedule."""

    momentum_start: float = 0.996
    momentum_end: float = 1.0
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass
class TrainConfig:
    epochs: float = 25.0
    batch_size: int = 768
    max_steps: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 3
    compile: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    threads: int = 0
    max_bad_steps: int = 20
    # gradient accumulation: each rank's share of batch_size in this many micro-batches, one optimiser step,
    # exactly the numbers of the whole batch (harmony.train.accumulate); trades time for memory
    accum_steps: int = 1
    # evaluation (the `eval` section's tasks) every this many steps and at the end; 0: at the end only
    eval_every: int = 0
    keep_best: str = ""  # a logged metric: checkpoints/best.pt is the checkpoint of its best value
    keep_best_mode: Literal["max", "min"] = "max"
    wandb: str = ""  # a Weights & Biases project that also receives the scalars and the config


@dataclass
class Config:
    name: str = "custom"
    data_spec: str = "builtin:shapes"
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys renamed since runs were written: {old dotted key: new keys}. Stored configs (checkpoints, config.yaml),
# YAML files and overrides that use an old key get its value under the new ones, so old runs resume unchanged.
RENAMED_KEYS: dict[str, tuple[str, ...]] = {
    "objectives.ibot.teacher_temp_patch_start": ("objectives.ibot.teacher_temp_start",),
    "objectives.ibot.teacher_temp_patch_end": ("objectives.ibot.teacher_temp_end",),
    "objectives.masked_distill.teacher_temp": (
        "objectives.masked_distill.teacher_temp_start",
        "objectives.masked_distill.teacher_temp_end",
    ),
}


# Keys removed since runs were written, none of which any code read: stored configs and YAML files that hold one
# load without it (and without a note, since dropping it changes nothing); an override that sets one is refused.
REMOVED_KEYS: frozenset[str] = frozenset({"data.augment.eval_resize_ratio"})


def _parent(data: dict[str, Any], dotted: str) -> tuple[Any, str]:
    """(the mapping in `data` that holds the dotted key's leaf, or None; the leaf's name)."""
    *parents, leaf = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    return node, leaf


def upgrade_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a nested config mapping) with every renamed key moved to its new name(s) and every removed key
    dropped; an old key's value wins over the new key's, since it is the one the user or the stored run gave."""
    out = copy.deepcopy(data)
    for old, new in RENAMED_KEYS.items():
        node, leaf = _parent(out, old)
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            for key in new:
                node[key.rsplit(".", 1)[1]] = value
    for removed in REMOVED_KEYS:
        node, leaf = _parent(out, removed)
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def set_override(cfg: Config, assignment: str) -> Config:
    """Apply one `dotted.key=value` override and re-validate the whole config."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{assignment}' has an empty key")
    if key in REMOVED_KEYS:
        raise ConfigError(f"config key '{key}' was removed (it had no effect); leave it out")
    # The text goes to the field's type as is (so '1e-3', ',' or a path survive); only an explicit
    # {mapping} or [list] is parsed as YAML, and null/none switches a section off.
    value: Any = raw
    if raw.strip().lower() in NONE_WORDS:
        value = None
    elif raw.strip().startswith(("{", "[")):
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}': '{raw}' is not a valid YAML mapping or list") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return from_dict(Config, upgrade_keys(merge(to_dict(cfg), nested)))


def validate(cfg: Config) -> None:
    """Semantic checks beyond types, each naming its key."""
    from harmony.core.colors import parse_background

    if cfg.model.vision_arch is None and cfg.model.vision not in VISION_SIZES and not cfg.model.cnn_spec():
        raise ConfigError(
            f"config key 'model.vision' must be one of {', '.join(VISION_SIZES)} or a timm CNN ({CNN_PREFIX}NAME, "
            f"e.g. {CNN_PREFIX}resnet50, {CNN_PREFIX}resnet-tiny), got {cfg.model.vision!r}"
        )
    if cfg.model.text_arch is None and cfg.model.text not in TEXT_SIZES:
        raise ConfigError(f"config key 'model.text' must be one of {', '.join(TEXT_SIZES)}, got {cfg.model.text!r}")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "model.embed_dim": cfg.model.embed_dim,
        "model.context_length": cfg.model.context_length,
        "data.augment.global_size": cfg.data.augment.global_size,
        "data.augment.local_size": cfg.data.augment.local_size,
        "data.builtin.image_size": cfg.data.builtin.image_size,
        "optim.lr": cfg.optim.lr,
        "train.accum_steps": cfg.train.accum_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(
            f"config key 'train.accum_steps' ({cfg.train.accum_steps}) must divide train.batch_size "
            f"({cfg.train.batch_size}) into equal micro-batches"
        )
    text = cfg.model.text_spec()
    if text.causal and text.pool == "first":
        raise ConfigError("config key 'model.text': a causal text tower pooled at its first token sees one token")
    patch = cfg.model.patch_size()
    for key, size in {"global_size": cfg.data.augment.global_size, "local_size": cfg.data.augment.local_size}.items():
        if size % patch:
            raise ConfigError(
                f"config key 'data.augment.{key}' ({size}) must be a multiple of the patch size {patch} "
                f"(e.g. {max(round(size / patch), 1) * patch})"
            )
    _validate_freezing(cfg)
    check_eval(cfg.eval, cfg.train.eval_every, cfg.train.keep_best)
    if cfg.model.context_length < 3:
        raise ConfigError("config key 'model.context_length' must be at least 3 (start, one word, end)")
    for key, value in {"train.max_steps": cfg.train.max_steps, "data.num_workers": cfg.data.num_workers}.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    probs = {
        "data.augment.flip": cfg.data.augment.flip,
        "data.augment.color_jitter": cfg.data.augment.color_jitter,
        "data.augment.grayscale": cfg.data.augment.grayscale,
        "data.augment.local_blur": cfg.data.augment.local_blur,
        "data.builtin.mismatch_rate": cfg.data.builtin.mismatch_rate,
    }
    sections = cfg.objectives.sections()
    for name, section in sections.items():
        for other, why in section.excludes.items():
            if other in sections:
                raise ConfigError(f"config keys 'objectives.{name}' and 'objectives.{other}' cannot be combined: {why}")
    shared: dict[str, tuple[str, object]] = {}
    for name, section in sections.items():
        weight = getattr(section, "weight", 1.0)
        if weight <= 0:
            raise ConfigError(
                f"config key 'objectives.{name}.weight' must be positive, got {weight}: "
                + ("a negative weight maximises the loss" if weight < 0 else "a zero weight trains nothing from it")
                + f"; switch the objective off with objectives.{name}=null"
            )
        if cfg.train.batch_size < section.min_batch:
            raise ConfigError(
                f"config key 'train.batch_size' must be at least {section.min_batch} with objectives.{name}, got "
                f"{cfg.train.batch_size}: {section.min_batch_reason}"
            )
        section.check(f"objectives.{name}")
        probs |= {f"objectives.{name}.{sub}": value for sub, value in section.probabilities().items()}
        for sub, value in section.positives().items():
            if value <= 0:
                raise ConfigError(f"config key 'objectives.{name}.{sub}' must be positive, got {value}")
        for what, (sub, setting) in section.shared().items():
            first_key, first = shared.setdefault(what, (f"objectives.{name}.{sub}", setting))
            if setting != first:
                raise ConfigError(
                    f"config keys '{first_key}' and 'objectives.{name}.{sub}' must match: both objectives read {what}"
                )
    for key, value in probs.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}' must be a probability in [0, 1], got {value}")
    _check_weights(cfg)
    if str(cfg.data.device_augment).lower() not in ("auto", "true", "false"):
        raise ConfigError(
            f"config key 'data.device_augment' must be auto, true or false, got {cfg.data.device_augment!r}"
        )
    try:
        parse_background(cfg.data.alpha_background)
    except ValueError as exc:
        raise ConfigError(f"config key 'data.alpha_background': {exc}") from None
    if not sections:
        raise ConfigError("config key 'objectives' enables no objective; a method needs at least one")
    for name, section in sections.items():
        for other, why in section.requires.items():
            if other not in sections:
                raise ConfigError(f"config key 'objectives.{name}' needs 'objectives.{other}', {why}")


def _check_weights(cfg: Config) -> None:
    """`data.weights`: one positive weight per `::`-separated source of `data_spec`."""
    weights, sources = cfg.data.weights, cfg.data_spec.split("::")
    if weights and len(weights) != len(sources):
        raise ConfigError(
            f"config key 'data.weights' gives {len(weights)} weight(s) for the {len(sources)} source(s) of data_spec "
            f"'{cfg.data_spec}' (its '::'-separated parts): give one weight per source"
        )
    for weight, spec in zip(weights, sources):
        if weight <= 0:
            raise ConfigError(
                f"config key 'data.weights' must be positive, got {weight:g} for '{spec}': leave the source out of "
                "data_spec instead"
            )


def _validate_freezing(cfg: Config) -> None:
    """`model.freeze` patterns (grammar and block ranges), `model.freeze_until_step`, `optim.layer_decay`."""
    cnn = cfg.model.cnn_spec()
    depths = {"image": 0 if cnn else cfg.model.vision_spec().depth, "text": cfg.model.text_spec().layers}
    if cnn and (cfg.optim.layer_decay != 1.0 or any(p.strip().startswith("image.") for p in cfg.model.freeze)):
        key = "optim.layer_decay" if cfg.optim.layer_decay != 1.0 else "model.freeze"
        raise ConfigError(
            f"config key '{key}': the CNN image tower {cfg.model.vision} has no ViT blocks or parts; freeze whole "
            "towers (model.freeze=image), without layer decay"
        )
    for pattern in cfg.model.freeze:
        try:
            parse_pattern(pattern, depths)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.freeze': {exc}") from None
    if cfg.model.freeze_until_step < 0:
        raise ConfigError(f"config key 'model.freeze_until_step' must be >= 0, got {cfg.model.freeze_until_step}")
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"config key 'optim.layer_decay' must be in (0, 1] (1: off), got {cfg.optim.layer_decay}")


def check_batch_per_process(cfg: Config, processes: int) -> None:
    """Each process's share of the global batch against what the enabled objectives need per process."""
    per_process = cfg.train.batch_size // max(processes, 1)
    for name, section in cfg.objectives.sections().items():
        if per_process < section.min_batch_per_process and processes == 1:
            raise ConfigError(
                f"config key 'train.batch_size' must be at least {section.min_batch_per_process} with "
                f"objectives.{name}, got {cfg.train.batch_size}: {section.min_batch_reason}"
            )
        if per_process < section.min_batch_per_process:
            raise ConfigError(
                f"config key 'train.batch_size' ({cfg.train.batch_size}) gives each of the {processes} processes "
                f"{per_process} image(s); objectives.{name} needs at least {section.min_batch_per_process} per "
                f"process: {section.min_batch_reason}"
            )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
