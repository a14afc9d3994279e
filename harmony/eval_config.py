"""The `eval` config section: evaluation during training (`train.eval_every`), torch-free so configs load
without the models.

A task runs when its data is given: `zeroshot_data` (class folders), `knn_val` (and `knn_train`, else the
training split found next to it, as `harmony eval knn` finds it), `retrieval_data` (image-caption pairs). The
mappings `zeroshot`, `knn` and `retrieval` take the settings of `harmony eval <task>` by their flag names
(`eval.knn.temperature=0.1`, `eval.zeroshot.templates=openai`); they are checked against that protocol's
settings when the run starts (`harmony.eval.during`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from harmony.typed import ConfigError

EVAL_TASKS = ("zeroshot", "knn", "retrieval")
# `eval/<metric>` or `eval/<student|teacher>/<metric>`, where a metric starts with its task's name
EVAL_METRIC = re.compile(r"^eval/(?:(student|teacher)/)?([a-z]+)_\w+$")


@dataclass
class EvalConfig:
    zeroshot_data: str = ""
    knn_train: str = ""
    knn_val: str = ""
    retrieval_data: str = ""
    # data loader workers that decode the evaluation sets (once per run)
    workers: int = 2
    zeroshot: dict[str, Any] = field(default_factory=dict)
    knn: dict[str, Any] = field(default_factory=lambda: {"ks": [20]})
    retrieval: dict[str, Any] = field(default_factory=dict)

    def tasks(self) -> list[str]:
        """The tasks whose data is given, in `EVAL_TASKS` order."""
        given = {"zeroshot": self.zeroshot_data, "knn": self.knn_val, "retrieval": self.retrieval_data}
        return [task for task in EVAL_TASKS if given[task]]


def check_eval(section: EvalConfig, eval_every: int, keep_best: str) -> None:
    """`train.eval_every`, the `eval` data and `train.keep_best` against each other, each mistake one line."""
    if eval_every < 0:
        raise ConfigError(f"config key 'train.eval_every' must be >= 0 (0: only at the end), got {eval_every}")
    if section.workers < 0:
        raise ConfigError(f"config key 'eval.workers' must be >= 0, got {section.workers}")
    if section.knn_train and not section.knn_val:
        raise ConfigError("config key 'eval.knn_train' is set without 'eval.knn_val' (the split k-NN is scored on)")
    tasks = section.tasks()
    if eval_every and not tasks:
        raise ConfigError(
            "config key 'train.eval_every' is set but no evaluation data is: give eval.zeroshot_data, eval.knn_val "
            "(with eval.knn_train) or eval.retrieval_data"
        )
    found = EVAL_METRIC.match(keep_best)
    if keep_best.startswith("eval/") and (found is None or found.group(2) not in EVAL_TASKS):
        raise ConfigError(
            f"config key 'train.keep_best' names '{keep_best}', which is not an evaluation metric "
            "(eval/<task>_<metric> or eval/<student|teacher>/<task>_<metric>, e.g. eval/knn_top1)"
        )
    if found is not None and found.group(2) not in tasks:
        data = {"zeroshot": "eval.zeroshot_data", "knn": "eval.knn_val", "retrieval": "eval.retrieval_data"}
        raise ConfigError(
            f"config key 'train.keep_best' names '{keep_best}', which this run never logs: "
            f"{data[found.group(2)]} is not set"
        )
