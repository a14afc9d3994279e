"""Reproduction suites: which methods, what data and budget (the same for every method), which
evaluations, which metrics make the report's table, and the numbers a paper reports for them.

A suite is a YAML file; the built-in ones live in `harmony/presets/suites/`, and a user points
`harmony repro --suite my_suite.yaml` at their own shards and evaluation sets:

```yaml
description: Table 1 on my data
size: vit-s16                    # every method runs as {method}-{size}
methods: [clip, slip, maskclip, ibot, mae, harmony]   # METHOD@LABEL: METHOD's preset, with per_method settings
ablations: [clip+ibot, clip+ibot+soft, clip+ibot+soft+mae, clip+mlm, clip+mlm+tdist]
variables:                       # named paths, given as `--set name=value`; ${name} in train/eval
  shards: WebDataset shards of image-caption pairs
  imagenet: {description: class folders train/ and val/, default: /data/imagenet}
train:
  data: ${shards}
  overrides: [train.epochs=25]   # applied to every method
  per_method:                    # applied to one method, after `overrides`
    maskclip: [teacher.schedule=linear]
eval:
  data: ${imagenet}/val          # the labelled / captioned evaluation set
  train: ${imagenet}/train       # training split for knn / linear / segment / detect
  weights: auto                  # auto (the EMA teacher where complete) or student
  tasks:                         # name -> protocol settings; `protocol`, `data` and `train` default to
    zeroshot: {}                 # the name, eval.data and eval.train, so one protocol can run on several sets
    knn: {}
    linear: {}
    zeroshot-color: {protocol: zeroshot, data: "builtin:shapes:val:color"}
columns:                         # table columns: label -> task.metric
  zero-shot top-1: zeroshot.top1
  k-NN top-1: knn.k20_top1
tables:                          # the report's tables, instead of one of every method (optional):
  - {title: Masked image modelling, methods: [mae, ibot, harmony]}   # a title, rows, columns (default: above)
paper:                           # the reported numbers (in %), method -> column -> value
  source: Table 1
  results:
    clip: {zero-shot top-1: 16.7}
```
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from harmony.config import ConfigError, from_dict

SUITES = resources.files("harmony") / "presets" / "suites"
REFERENCE = re.compile(r"\$\{([^}]*)\}")


@dataclass
class Variable:
    """A named value of a suite (a data path, a sample count), given on the command line as `--set name=value`."""

    description: str = ""
    default: str | None = None


@dataclass
class TrainSpec:
    data: str = "builtin:shapes"
    overrides: list[str] = field(default_factory=list)
    per_method: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One evaluation of a suite: protocol, evaluation data, training split ('' = the protocol's own
    default beside the data) and protocol settings."""

    name: str
    protocol: str
    data: str
    train: str
    settings: dict[str, Any]


@dataclass
class EvalSpec:
    data: str = "builtin:shapes:val"
    train: str = ""
    workers: int = 2
    # which weights are evaluated: auto = the EMA teacher when it covers every tower (the papers'
    # practice), else the student; short runs should say `student` (their teacher lags far behind)
    weights: Literal["auto", "student"] = "auto"
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        """A task of the suite: `protocol`, `data` and `train` default to the task's name, `eval.data` and
        `eval.train`; the rest of its entry are the protocol's settings."""
        settings = dict(self.tasks[name])
        protocol, data = settings.pop("protocol", name), settings.pop("data", self.data)
        return Task(name, protocol, data, settings.pop("train", "") or self.train, settings)


@dataclass
class TableSpec:
    """One table of the report: its rows (methods of the suite) and columns (the suite's when empty)."""

    title: str = ""
    methods: list[str] = field(default_factory=list)
    columns: dict[str, str] = field(default_factory=dict)


@dataclass
class PaperResults:
    """What a paper reports for the suite's table: `results[method][column]` in %, `source` saying where."""

    source: str = ""
    results: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class Suite:
    name: str = ""
    description: str = ""
    size: str = "tiny"
    methods: list[str] = field(default_factory=list)
    ablations: list[str] = field(default_factory=list)
    variables: dict[str, Variable] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # the variables' values this suite was loaded with
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    columns: dict[str, str] = field(default_factory=dict)
    tables: list[TableSpec] = field(default_factory=list)
    paper: PaperResults = field(default_factory=PaperResults)

    def presets(self, with_ablations: bool) -> list[str]:
        methods = self.methods + (self.ablations if with_ablations else [])
        return [f"{m}-{self.size}" for m in dict.fromkeys(methods)]

    def method_of(self, preset: str) -> str:
        return preset[: -len(self.size) - 1] if preset.endswith(f"-{self.size}") else preset

    def preset_of(self, run: str) -> str:
        """The preset a run of the suite trains: `dino@resnet-tiny` (a method entry `dino@resnet`, which
        differs from `dino` by its per-method settings) trains `dino-tiny`."""
        return f"{self.method_of(run).split('@', 1)[0]}-{self.size}"

    def overrides_for(self, preset: str) -> list[str]:
        """A method's training settings: the suite's for every method, then the method's own."""
        return [*self.train.overrides, *self.train.per_method.get(self.method_of(preset), [])]


def suite_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in SUITES.iterdir() if p.name.endswith(".yaml"))


def _suite_text(name: str) -> tuple[str, str]:
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"suite file '{name}' does not exist")
        return path.read_text(), path.stem
    if name in suite_names():
        return (SUITES / f"{name}.yaml").read_text(), name
    raise ConfigError(f"unknown suite '{name}': built-in suites are {', '.join(suite_names())}, or give a .yaml file")


def _declared(name: str, raw: Any) -> dict[str, Variable]:
    """The `variables` section: `name: description` or `name: {description: ..., default: ...}`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"suite '{name}': 'variables' must map names to descriptions")
    declared: dict[str, Variable] = {}
    for var, spec in raw.items():
        spelled = {"description": spec} if isinstance(spec, str) else spec
        if not isinstance(spelled, dict):
            raise ConfigError(f"suite '{name}': variable '{var}' needs a description (or description and default)")
        declared[str(var)] = from_dict(Variable, spelled, prefix=f"variables.{var}")
    return declared


def variable_values(name: str, declared: dict[str, Variable], given: dict[str, str]) -> dict[str, str]:
    """Every declared variable's value: given, else its default; an unknown or missing name is one ConfigError."""
    for var in given:
        if var not in declared:
            close = difflib.get_close_matches(var, sorted(declared), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(declared) or "none"
            raise ConfigError(f"suite '{name}' has no variable '{var}'{hint} (its variables: {known})")
    missing = [var for var, spec in declared.items() if var not in given and spec.default is None]
    if missing:
        needs = "; ".join(f"{var}: {declared[var].description}" for var in missing)
        sets = " ".join(f"{var}=..." for var in missing)
        raise ConfigError(f"suite '{name}' needs --set {sets} ({needs})")
    return {var: given.get(var, spec.default or "") for var, spec in declared.items()}


def substitute(node: Any, values: dict[str, str], suite: str, where: str) -> Any:
    """`node` with every `${name}` in its strings replaced by the variable's value."""
    if isinstance(node, dict):
        return {k: substitute(v, values, suite, f"{where}.{k}") for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values, suite, where) for v in node]
    if not isinstance(node, str):
        return node

    def value(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in values:
            raise ConfigError(f"suite '{suite}': {where} uses ${{{var}}}, which 'variables' does not declare")
        return values[var]

    return REFERENCE.sub(value, node)


def parse_assignments(items: list[str], flag: str) -> dict[str, str]:
    """`name=value` words as a mapping; a word without '=' is one ConfigError naming the flag."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{flag} '{item}' is not of the form name=value")
        out[key.strip()] = value
    return out


def load_suite(name: str, given: dict[str, str] | None = None) -> Suite:
    """A built-in suite by name or a suite YAML file, its variables filled from `given` (then their defaults);
    mistakes are ConfigErrors naming the key."""
    text, label = _suite_text(name)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"suite '{name}' is not a mapping")
    declared = _declared(name, data.pop("variables", None))
    values = variable_values(name, declared, given or {})
    for section in ("train", "eval"):
        if section in data:
            data[section] = substitute(data[section], values, name, section)
    suite: Suite = from_dict(Suite, data)
    suite.name, suite.variables, suite.values = suite.name or label, declared, values
    check_suite(suite)
    return suite


def check_suite(suite: Suite) -> None:
    """What the types cannot say: methods listed, tasks that name protocols and their settings, columns that
    read tasks, per-method settings and paper numbers for methods and columns of the suite."""
    from harmony.eval.suite import PROTOCOLS

    name = suite.name
    if not suite.methods:
        raise ConfigError(f"suite '{name}': 'methods' lists no method")
    for task_name in suite.eval.tasks:
        task = suite.eval.task(task_name)
        if task.protocol not in PROTOCOLS:
            raise ConfigError(
                f"suite '{name}': task '{task_name}' names no evaluation protocol ({', '.join(PROTOCOLS)})"
            )
        known = {f.name for f in fields(PROTOCOLS[task.protocol].defaults)}
        unknown = sorted(set(task.settings) - known)
        if unknown:
            raise ConfigError(
                f"suite '{name}': task '{task_name}' ({task.protocol}) has no setting '{unknown[0]}' "
                f"(its settings: {', '.join(sorted(known))})"
            )
    for column, source in suite.columns.items():
        task_name = source.split(".", 1)[0]
        if "." not in source or task_name not in suite.eval.tasks:
            raise ConfigError(
                f"suite '{name}': column '{column}' reads '{source}', but task '{task_name}' is not in eval.tasks"
            )
    listed = set(suite.methods) | set(suite.ablations)
    for index, table in enumerate(suite.tables):
        for method in table.methods:
            if method not in listed:
                raise ConfigError(
                    f"suite '{name}': tables[{index}] lists '{method}', which is not in methods or ablations"
                )
        for column, source in table.columns.items():
            if "." not in source or source.split(".", 1)[0] not in suite.eval.tasks:
                raise ConfigError(
                    f"suite '{name}': tables[{index}] column '{column}' reads '{source}', not a task's metric"
                )
    for section, methods in (("train.per_method", suite.train.per_method), ("paper.results", suite.paper.results)):
        for method in methods:
            if method not in listed:
                raise ConfigError(f"suite '{name}': {section} names '{method}', which is not in methods or ablations")
    for method, reported in suite.paper.results.items():
        for column in reported:
            if column not in suite.columns:
                raise ConfigError(f"suite '{name}': paper.results.{method} names column '{column}', not in columns")


def adjusted(
    suite: Suite,
    size: str | None = None,
    methods: list[str] | None = None,
    train_set: list[str] | None = None,
    eval_set: list[str] | None = None,
    workers: int | None = None,
) -> Suite:
    """The suite at another size, with fewer methods, extra training settings for every method (after the
    suite's), other task settings (`task.setting=value`) or evaluation loader workers: a smaller budget for a
    quick check."""
    from harmony.eval.settings import parse_value
    from harmony.eval.suite import PROTOCOLS

    listed = suite.methods + suite.ablations
    unknown = [m for m in methods or [] if m not in listed]
    if unknown:
        raise ConfigError(f"--methods: '{unknown[0]}' is not a method of suite '{suite.name}' ({', '.join(listed)})")
    tasks = {task: dict(entry) for task, entry in suite.eval.tasks.items()}
    for key, text in parse_assignments(eval_set or [], "--eval-set").items():
        task_name, _, setting = key.partition(".")
        if task_name not in tasks or not setting:
            raise ConfigError(f"--eval-set '{key}': name a task of the suite and its setting ({', '.join(tasks)})")
        protocol = suite.eval.task(task_name).protocol
        defaults = {f.name: getattr(PROTOCOLS[protocol].full, f.name) for f in fields(PROTOCOLS[protocol].full)}
        if setting in ("data", "train"):
            tasks[task_name][setting] = text
        elif setting not in defaults:
            raise ConfigError(f"--eval-set '{key}': {protocol} has no setting '{setting}' ({', '.join(defaults)})")
        else:
            tasks[task_name][setting] = parse_value(defaults[setting], text)
    chosen = [m for m in suite.methods if m in methods] if methods else suite.methods
    ablations = [m for m in suite.ablations if m in methods] if methods else suite.ablations
    train = replace(suite.train, overrides=[*suite.train.overrides, *(train_set or [])])
    return replace(
        suite,
        size=size or suite.size,
        methods=chosen or ablations,
        ablations=ablations if chosen else [],
        train=train,
        eval=replace(suite.eval, tasks=tasks, workers=suite.eval.workers if workers is None else workers),
    )
