"""Downstream evaluation of pre-trained checkpoints, one module per protocol.

Every protocol is a function `run_<task>(pretrained, data_spec, device, ..., **settings)` returning a
result dict (task, checkpoint, dataset, settings, metrics, time_s): `zeroshot`, `retrieval`, `knn`,
`linear`, `finetune`, `segment`, `detect`, `attention`. `harmony.eval.suite` has the registry
(`PROTOCOLS`), `run_task(name, ...)` and `run_suite(...)`; `harmony.eval.summary.write_report` turns
suite results of several checkpoints into one markdown report with plots. Settings default to
CPU-sized budgets on `builtin:` data and paper-sized ones otherwise (`harmony.eval.settings`).
"""
