"""Every two-rank check of the suite in one launch: `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m tests.two_ranks OUT` (the session fixture `two_ranks` in conftest.py runs it once).

Both ranks join one gloo process group and run each scenario in turn inside it (`harmony train` through
`harmony.cli.main`, which uses the group it finds and leaves it open), each into its own folder
`OUT/<name>/`: `run/` for a training, `rank<r>.log` (what the rank printed), `rank<r>.status` ("ok" or the
traceback). A scenario that fails on both ranks does not stop the others; one that fails on a single rank
leaves the other inside a collective, so the launch stops there and names that scenario in the later ones'
statuses. The tests compare each folder with a one-process reference computed in the pytest process.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from harmony.cli import main

# a collective waits this long for the other rank before failing (a step of these runs takes well under 1 s)
PATIENCE = timedelta(seconds=120)

HARMONY = ("--preset", "harmony-tiny-test", "--batch-size", "8", "--no-progress", "train.log_every=1")
HARMONY_RUN = ("train", *HARMONY, "--max-steps", "5")
SIGLIP_RUN = ("train", "--preset", "siglip-tiny-test", "--batch-size", "8", "--max-steps", "3", "--no-progress")
SIGLIP_RUN += ("train.log_every=1",)
MOCOV3_RUN = ("train", "--preset", "mocov3-tiny-test", "--batch-size", "8", "--max-steps", "3", "--no-progress")
MOCOV3_RUN += ("train.log_every=1",)
MOCOV2_RUN = ("train", "--preset", "mocov2-tiny-test", "--batch-size", "8", "--max-steps", "3", "--no-progress")
MOCOV2_RUN += ("train.log_every=1",)


def three_steps(method: str) -> tuple[str, ...]:
    """`harmony` arguments of a 3-step training of `<method>-tiny-test` at batch 8, every step logged."""
    return ("train", "--preset", f"{method}-tiny-test", "--batch-size", "8", "--max-steps", "3", "--no-progress",
            "train.log_every=1")  # fmt: skip


# the methods whose loss uses the global batch, each compared with one process (tests/test_<method>.py)
GLOBAL_BATCH_METHODS = ("barlowtwins", "vicreg", "swav")
# SwAV with a queue of 16 at batch 8: filled by steps 1 and 2, used at step 3
SWAV_QUEUE = (*three_steps("swav"), "objectives.swav.queue_length=16", "objectives.swav.queue_start_epochs=0")
# FILIP with room to cut: each rank cuts its captions to its own batch's longest, and pads them for the gather
FILIP_RUN = (*three_steps("filip"), "model.context_length=77")
CAPTIONS_RUN = ("train", "--preset", "harmony-tiny-test", "--data", "builtin:shapes", "--workers", "0")
CAPTIONS_RUN += ("--no-progress", "--batch-size", "8", "--max-steps", "3", "model.context_length=77")
CAPTIONS_RUN += ("train.log_every=1",)
MIXED_RUN = ("train", "--preset", "clip-tiny-test", "--data", "builtin:shapes::builtin:shapes:val", "--workers", "0")
MIXED_RUN += ("data.weights=0.3,0.7", "--batch-size", "8", "--max-steps", "3", "--no-progress", "train.log_every=1")
# SimCLR's projector has plain BatchNorm1d layers: over the global batch with several processes
SIMCLR_RUN = three_steps("simclr")
# DINO on a CNN image tower: its BatchNorm layers take the statistics of the global batch
CNN_RUN = ("train", "--preset", "dino-tiny-test", "model.vision=timm:resnet-tiny", "--batch-size", "8")
CNN_RUN += ("--max-steps", "3", "--no-progress", "train.log_every=1")
# evaluation every 2 steps on the built-in val split, in batches of 8 (each rank encodes 2 of its 4)
EVAL_SETTINGS = ("eval.knn_val=builtin:shapes:val", "eval.zeroshot_data=builtin:shapes:val", "eval.workers=0")
EVAL_SETTINGS += ("eval.retrieval_data=builtin:shapes:val", "eval.knn.batch_size=8", "eval.zeroshot.batch_size=8")
EVAL_SETTINGS += ("eval.retrieval.batch_size=8", "train.eval_every=2")
EVAL_RUN = ("train", *HARMONY, "--max-steps", "4", *EVAL_SETTINGS)
# a locked image tower and a text tower held for 2 steps (`model.freeze`, `model.freeze_until_step`)
FROZEN = ("model.freeze=image", "model.freeze_until_step=2")

# scenario -> `harmony` arguments of a two-rank training (its run folder is given as --out)
TRAININGS: dict[str, tuple[str, ...]] = {
    "ddp": (*HARMONY_RUN, "train.strategy=ddp"),
    "fsdp": (*HARMONY_RUN, "train.strategy=fsdp"),
    "ddp_accumulating": (*HARMONY_RUN, "--accum-steps", "2", "train.strategy=ddp"),
    "fsdp_accumulating": (*HARMONY_RUN, "--accum-steps", "2", "train.strategy=fsdp"),
    "ddp_frozen": (*HARMONY_RUN, *FROZEN, "train.strategy=ddp"),
    "fsdp_frozen": (*HARMONY_RUN, *FROZEN, "train.strategy=fsdp"),
    "siglip": SIGLIP_RUN,
    "mocov3": MOCOV3_RUN,
    "mocov2": MOCOV2_RUN,
    "cut_captions": CAPTIONS_RUN,  # each rank cuts its captions to its own batch's length
    "mixed_sources": MIXED_RUN,  # two sources drawn by weight, each rank its places of every batch
    "cnn_dino": CNN_RUN,
    "simclr": SIMCLR_RUN,
    **{method: three_steps(method) for method in GLOBAL_BATCH_METHODS},
    "swav_queue": SWAV_QUEUE,
    "filip": FILIP_RUN,
    "eval_ddp": (*EVAL_RUN, "train.strategy=ddp"),  # each rank encodes its share of the evaluation sets
    "eval_fsdp": (*EVAL_RUN, "train.strategy=fsdp"),  # ... from the gathered shards of the weights
}


def text_distill_and_sharded_clipping(folder: Path) -> None:
    from tests.test_fidelity import text_distill_and_clipping_on_this_rank

    text_distill_and_clipping_on_this_rank(dist.get_rank(), folder)


def simclr_global_batch(folder: Path) -> None:
    from tests.test_simclr import contrast_this_ranks_rows

    contrast_this_ranks_rows(dist.get_rank(), folder)


def global_batchnorm(folder: Path) -> None:
    from tests.test_global_batchnorm import normalise_this_ranks_rows

    normalise_this_ranks_rows(dist.get_rank(), folder)


def checkpoint_write_failure(folder: Path) -> None:
    """Rank 0 cannot write its checkpoint (a full disk): both ranks end with one line and an exit code, none waits
    for the other in a collective. Each rank's exit code goes to `code<rank>`."""
    from harmony.core import checkpoint as ckpt

    original = ckpt.save_atomic

    def full_disk(state: object, path: Path) -> None:
        raise ckpt.CheckpointWriteError(f"no space left on the device to write '{path}'")

    if dist.get_rank() == 0:
        ckpt.save_atomic = full_disk  # type: ignore[assignment]
    try:
        code = main([*three_steps("clip"), "--out", str(folder / "run")])
    finally:
        ckpt.save_atomic = original  # type: ignore[assignment]
    (folder / f"code{dist.get_rank()}").write_text(str(code))


def frozen_resumed(strategy: str) -> Callable[[Path], None]:
    def check(folder: Path) -> None:
        from tests.test_freeze import resume_after_the_warm_up_on_this_rank

        resume_after_the_warm_up_on_this_rank(strategy, folder)

    return check


CHECKS: dict[str, Callable[[Path], None]] = {
    "text_distill_and_sharded_clipping": text_distill_and_sharded_clipping,
    "global_batchnorm": global_batchnorm,
    "simclr_global_batch": simclr_global_batch,
    "checkpoint_write_failure": checkpoint_write_failure,
    "ddp_frozen_resumed": frozen_resumed("ddp"),
    "fsdp_frozen_resumed": frozen_resumed("fsdp"),
}


def training(args: tuple[str, ...]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        code = main([*args, "--out", str(folder / "run")])
        if code != 0:
            raise RuntimeError(f"harmony {' '.join(args)} exited with {code}")

    return run


SCENARIOS: dict[str, Callable[[Path], None]] = {
    **{name: training(args) for name, args in TRAININGS.items()},
    **CHECKS,
}


def run_scenario(name: str, folder: Path, threads: int) -> str:
    """Run one scenario on this rank; its status ('ok' or the traceback)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)  # what the launch asked for, whatever an earlier scenario set
    with open(folder / f"rank{dist.get_rank()}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            SCENARIOS[name](folder)
        except (Exception, SystemExit):
            traceback.print_exc()
            return traceback.format_exc()
    return "ok"


def run_all(out: Path) -> None:
    dist.init_process_group("gloo", timeout=PATIENCE)
    rank, threads = dist.get_rank(), int(os.environ.get("OMP_NUM_THREADS", "1"))
    names = list(SCENARIOS)
    try:
        for i, name in enumerate(names):
            status = run_scenario(name, out / name, threads)
            (out / name / f"rank{rank}.status").write_text(status)
            try:
                dist.monitored_barrier(timeout=PATIENCE)
            except RuntimeError as exc:
                for later in names[i + 1 :]:
                    (out / later).mkdir(parents=True, exist_ok=True)
                    reason = (
                        f"not run: scenario {name} failed on one rank only ({exc}), which leaves the group unusable"
                    )
                    (out / later / f"rank{rank}.status").write_text(reason)
                raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_all(Path(sys.argv[1]))
