"""Reproduction suites: which methods, what data and budget (the same for every method), which
evaluations, and which metrics make the report's table.

A suite is a YAML file; the built-in ones live in `harmony/presets/suites/`, and a user points
`harmony repro --suite my_suite.yaml` at their own shards and evaluation sets:

```yaml
description: Table 1 on my data
size: vit-s16                    # every method runs as {method}-{size}
methods: [clip, slip, maskclip, ibot, mae, harmony]
ablations: [clip+ibot, clip+ibot+soft, clip+ibot+soft+mae, clip+mlm, clip+mlm+tdist]
train:
  data: shards/{00000..00331}.tar
  overrides: [train.epochs=25]   # applied to every method
eval:
  data: imagenet/val             # the labelled / captioned evaluation set
  train: imagenet/train          # training split for knn / linear / segment / detect
  weights: auto                  # auto (the EMA teacher where complete) or student
  tasks:                         # name -> protocol settings; `protocol` and `data` default to the
    zeroshot: {}                 # name and eval.data, so one protocol can run on several sets
    knn: {}
    linear: {}
    zeroshot-color: {protocol: zeroshot, data: builtin:shapes:val:color}
columns:                         # table columns: label -> task.metric
  zero-shot top-1: zeroshot.top1
  k-NN top-1: knn.k20_top1
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from harmony.config import ConfigError, from_dict

SUITES = resources.files("harmony") / "presets" / "suites"


@dataclass
class TrainSpec:
    data: str = "builtin:shapes"
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalSpec:
    data: str = "builtin:shapes:val"
    train: str = ""
    workers: int = 2
    # which weights are evaluated: auto = the EMA teacher when it covers every tower (the papers'
    # practice), else the student; short runs should say `student` (their teacher lags far behind)
    weights: Literal["auto", "student"] = "auto"
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def task(self, name: str) -> tuple[str, str, dict[str, Any]]:
        """(protocol, data, protocol settings) of a task: `protocol` and `data` default to the task's
        name and `eval.data`; the rest of its entry are the protocol's settings."""
        settings = dict(self.tasks[name])
        return settings.pop("protocol", name), settings.pop("data", self.data), settings


@dataclass
class Suite:
    name: str = ""
    description: str = ""
    size: str = "tiny"
    methods: list[str] = field(default_factory=list)
    ablations: list[str] = field(default_factory=list)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    columns: dict[str, str] = field(default_factory=dict)

    def presets(self, with_ablations: bool) -> list[str]:
        methods = self.methods + (self.ablations if with_ablations else [])
        return [f"{m}-{self.size}" for m in dict.fromkeys(methods)]


def suite_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in SUITES.iterdir() if p.name.endswith(".yaml"))


def load_suite(name: str) -> Suite:
    """A built-in suite by name or a suite YAML file; mistakes are ConfigErrors naming the key."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"suite file '{name}' does not exist")
        text, label = path.read_text(), path.stem
    elif name in suite_names():
        text, label = (SUITES / f"{name}.yaml").read_text(), name
    else:
        raise ConfigError(
            f"unknown suite '{name}': built-in suites are {', '.join(suite_names())}, or give a .yaml file"
        )
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"suite '{name}' is not a mapping")
    suite: Suite = from_dict(Suite, data)
    suite.name = suite.name or label
    if not suite.methods:
        raise ConfigError(f"suite '{name}': 'methods' lists no method")
    from harmony.eval.suite import PROTOCOLS

    for task in suite.eval.tasks:
        protocol = suite.eval.task(task)[0]
        if protocol not in PROTOCOLS:
            raise ConfigError(f"suite '{name}': task '{task}' names no evaluation protocol ({', '.join(PROTOCOLS)})")
    for column, source in suite.columns.items():
        task = source.split(".", 1)[0]
        if "." not in source or task not in suite.eval.tasks:
            raise ConfigError(
                f"suite '{name}': column '{column}' reads '{source}', but task '{task}' is not in eval.tasks"
            )
    return suite
