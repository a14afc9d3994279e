"""Captions are cut after the batch's longest one (`data.caption_padding=batch`): same numbers, less compute."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harmony.config import ConfigError, set_override, validate
from harmony.core.distributed import DistInfo
from harmony.data.loader import build_train_data
from harmony.data.sources import BuiltinSource
from harmony.data.views import collate, trim_captions, view_maker_for
from harmony.models.tokenizer import CaptionTokenizer, mask_caption
from harmony.objectives.base import StepInfo
from harmony.train.task import PretrainTask
from tests.conftest import RESUMABLE, Cli, TwoRanks, tiny
from tests.test_distributed import LOSSES, records
from tests.two_ranks import CAPTIONS_RUN

TOK = CaptionTokenizer(77)
CAPTIONS = ["a big red circle on a blue ground", "two stars", "one green square in the upper left corner", "a dot"]


def caption_samples(captions: list[str], tokenizer: CaptionTokenizer = TOK) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    samples = []
    for caption in captions:
        ids = tokenizer(caption)[0]
        masked, where = mask_caption(ids, tokenizer.word_positions(ids), 0.5, tokenizer.mask_id, gen)
        samples.append(
            {"text": ids, "text_real": tokenizer.real_positions(ids), "text_masked": masked, "text_mask": where}
        )
    return samples


def test_collate_cuts_captions_after_the_longest_and_indexes_the_same_tokens() -> None:
    samples = caption_samples(CAPTIONS)
    longest = max(int(s["text_real"].sum()) for s in samples)
    full, cut = collate(samples, trim=False), collate(samples)
    assert full["text"].shape == (4, 77)
    assert cut["text"].shape == (4, -(-longest // 8) * 8) and cut["text"].shape[1] >= longest
    for key in ("text", "text_real", "text_masked", "text_mask"):
        assert torch.equal(cut[key], full[key][:, : cut[key].shape[1]]), key
        assert not full[key][:, cut[key].shape[1] :].any(), key  # only padding (id 0) was cut
    # the flat indices are in the cut layout and still pick the same tokens, with the same weights
    assert torch.equal(cut["text"].flatten()[cut["mlm_index"]], full["text"].flatten()[full["mlm_index"]])
    assert torch.equal(cut["text"].flatten()[cut["text_real_index"]], full["text"].flatten()[full["text_real_index"]])
    assert torch.equal(cut["mlm_in_real"], full["mlm_in_real"])
    assert torch.equal(cut["text_distill_weight"], full["text_distill_weight"])


def test_a_caption_that_fills_the_context_keeps_it_and_lengths_never_pass_it() -> None:
    long = " ".join(["red"] * 100)
    assert collate(caption_samples([long, "a dot"]))["text"].shape == (2, 77)
    tokenizer = CaptionTokenizer(20)  # 18 words + start + end: rounding up to 8 would give 24
    assert collate(caption_samples([" ".join(["blue"] * 17)], tokenizer))["text"].shape == (1, 20)
    assert collate(caption_samples(["a"]))["text"].shape == (1, 8)
    assert trim_captions({"global": torch.zeros(1)}) == {"global": torch.zeros(1)}


@pytest.mark.parametrize(
    "preset", ["harmony-tiny-test", "clip+mlm+tdist-tiny-test", "siglip-tiny-test", "align-tiny-test"]
)
def test_cut_captions_give_the_losses_and_gradients_of_padded_ones(preset: str) -> None:
    """Exact because the text tower is causal, or, bidirectional (ALIGN's), masks the padding out of its keys
    (and the MLM decoder masks the padding)."""
    torch.manual_seed(0)
    cfg = tiny(preset, "model.context_length=77")
    maker = view_maker_for(cfg)
    task = PretrainTask(cfg, maker.tokenizer)
    source = BuiltinSource("train", cfg)
    samples = [maker(source.load(i).image, source.load(i).caption, seed=i) for i in range(6)]
    results = []
    for trim in (False, True):
        batch = collate(samples, trim=trim)
        assert (batch["text"].shape[1] < 77) == trim
        task.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        loss, metrics = task.step_losses(batch, StepInfo(10, 8))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
        results.append(({k: float(v) for k, v in metrics.items() if v.numel() == 1}, grads))
    (padded, padded_grads), (cut, cut_grads) = results
    assert padded.keys() == cut.keys() and len(padded) >= 2
    for key in padded:
        assert cut[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-6), key
    assert padded_grads.keys() == cut_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(cut_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_bidirectional_tower_reads_the_whole_caption_and_never_its_padding() -> None:
    """Its first token sees the words after it (a causal tower's would see itself alone), and a caption's
    features are the same however far its batch is padded."""
    torch.manual_seed(0)
    cfg = tiny("align-tiny-test", "model.context_length=77")
    tokenizer = CaptionTokenizer(77)
    model = PretrainTask(cfg, tokenizer).student
    assert model.text is not None and not model.text.spec.causal
    ids = tokenizer(["a red circle", "a red square", "a big green star in the upper corner"])
    with torch.no_grad():
        padded = model.encode_text(ids)
        cut = model.encode_text(ids[:, :16])
        garbage = model.encode_text(torch.where(tokenizer.real_positions(ids), ids, 320))  # padding of other ids
    torch.testing.assert_close(cut, padded)
    torch.testing.assert_close(garbage, padded)
    assert not torch.allclose(padded[0], padded[1], atol=1e-4)  # the first token read the last word
    bad = set_override(cfg, "model.text_arch={causal: true, pool: first}")
    with pytest.raises(ConfigError, match="first token"):
        validate(bad)


@pytest.mark.parametrize("device_augment", ["false", "true"])
def test_caption_padding_reaches_the_loaders_batches(device_augment: str) -> None:
    widths = {}
    for padding in ("batch", "context"):
        cfg = tiny(
            "clip-tiny-test",
            "model.context_length=77",
            f"data.caption_padding={padding}",
            f"data.device_augment={device_augment}",
            "data.num_workers=0",
            "train.batch_size=4",
        )
        data = build_train_data(cfg, view_maker_for(cfg), DistInfo(), torch.device("cpu"))
        batch = next(iter(data.batches(0)))
        widths[padding] = batch["text"].shape[1]
        assert batch["text_real"].shape == batch["text"].shape
    assert widths["context"] == 77 and widths["batch"] < 77 and widths["batch"] % 8 == 0


def test_a_run_records_its_padding_and_may_change_it_on_resume(
    tmp_path: Path, cli: Cli, one_rank: Callable[..., Path]
) -> None:
    run = tmp_path / "run"
    first = cli("train", *RESUMABLE, "--out", str(run), "--max-steps", "2", "data.caption_padding=context")
    assert first.returncode == 0, first.stderr
    assert "caption_padding: context" in (run / "config.yaml").read_text()
    resume = ("--resume", "auto", "--max-steps", "4", "data.caption_padding=batch")
    second = cli("train", *RESUMABLE, "--out", str(run), *resume)
    assert second.returncode == 0, second.stderr
    assert "data.caption_padding: 'context' -> 'batch'" in second.stdout
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    refs = records(one_rank("train", *RESUMABLE, "--max-steps", "4"))
    assert sorted(rows) == [1, 2, 3, 4]
    for step in rows:
        for key in ("loss", "loss_clip", "loss_mlm", "loss_text_distill"):
            assert rows[step][key] == pytest.approx(refs[step][key], rel=1e-4, abs=1e-5), (step, key)
    bad = cli("train", *RESUMABLE, "--out", str(tmp_path / "bad"), "data.caption_padding=none")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "data.caption_padding" in bad.stderr


def test_ranks_cutting_to_different_lengths_give_the_one_process_numbers(
    two_ranks: TwoRanks, one_rank: Callable[..., Path]
) -> None:
    """Each rank cuts its own share of the batch, to its own length; the losses are those of one process
    padding every caption to the context."""
    cfg = tiny("harmony-tiny-test", "model.context_length=77", "train.batch_size=8")
    widths = [
        [batch["text"].shape[1] for _, batch in zip(range(3), data.batches(0))]
        for data in (
            build_train_data(cfg, view_maker_for(cfg), DistInfo(rank, 2, rank), torch.device("cpu")) for rank in (0, 1)
        )
    ]
    assert widths[0] != widths[1] and max(max(w) for w in widths) < 77
    refs = records(one_rank(*CAPTIONS_RUN, "data.caption_padding=context"))
    rows = records(two_ranks.folder("cut_captions") / "run")
    assert sorted(rows) == [1, 2, 3]
    for step in rows:
        for key in LOSSES:
            assert rows[step][key] == pytest.approx(refs[step][key], rel=1e-5, abs=1e-6), (step, key)
