"""Every loss against an independent, direct computation of its formula (docs/design.md, "Objectives")."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from harmony.data.masking import block_mask, patch_loss_weights
from harmony.objectives.centering import Center, mean_entropy, sharpen
from harmony.objectives.clip import clip_hard_loss, clip_soft_loss, contrastive_logits, soft_targets
from harmony.objectives.ibot import ibot_cls_loss, ibot_patch_loss
from harmony.objectives.mae import mae_loss, normalized_patches, patchify
from harmony.objectives.masked_distill import masked_distill_loss
from harmony.objectives.mlm import mlm_loss
from harmony.objectives.simclr import simclr_loss
from harmony.objectives.text_distill import text_distill_loss

torch.manual_seed(0)


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def ce(p: list[float] | torch.Tensor, logits: torch.Tensor) -> float:
    """CE(p, softmax(logits)) = -sum_j p_j log softmax(logits)_j, computed element by element."""
    z = max(float(v) for v in logits)
    log_norm = z + math.log(sum(math.exp(float(v) - z) for v in logits))
    return -sum(float(pj) * (float(lj) - log_norm) for pj, lj in zip(p, logits))


def test_clip_hard_loss_is_symmetric_infonce() -> None:
    img, txt, s = unit(5, 8), unit(5, 8), torch.tensor(7.0, dtype=torch.float64)
    lpi, lpt = contrastive_logits(img, txt, img, txt, s)
    got = clip_hard_loss(lpi, lpt, offset=0)
    L = s * img @ txt.T
    i2t = sum(ce(F.one_hot(torch.tensor(i), 5), L[i]) for i in range(5)) / 5
    t2i = sum(ce(F.one_hot(torch.tensor(i), 5), L.T[i]) for i in range(5)) / 5
    assert math.isclose(got.item(), 0.5 * (i2t + t2i), rel_tol=1e-6)


def test_clip_hard_loss_local_rows_against_global_columns() -> None:
    img, txt, s = unit(6, 4), unit(6, 4), torch.tensor(3.0, dtype=torch.float64)
    full = clip_hard_loss(*contrastive_logits(img, txt, img, txt, s), offset=0)
    halves = [
        clip_hard_loss(*contrastive_logits(img[r * 3 : r * 3 + 3], txt[r * 3 : r * 3 + 3], img, txt, s), offset=r * 3)
        for r in range(2)
    ]
    assert math.isclose(full.item(), (halves[0] + halves[1]).item() / 2, rel_tol=1e-6)  # float32 logits


def test_clip_soft_loss_uses_teacher_similarity_targets() -> None:
    img, txt, s = unit(4, 8), unit(4, 8), torch.tensor(10.0, dtype=torch.float64)
    t_img, t_txt = unit(4, 8), unit(4, 8)
    lpi, lpt = contrastive_logits(img, txt, img, txt, s)
    p_i2t, p_t2i = soft_targets(t_img, t_txt, t_img, t_txt, 0.1)
    got = clip_soft_loss(lpi, lpt, p_i2t, p_t2i)
    L = s * img @ txt.T
    P_i2t = torch.softmax(t_img @ t_txt.T / 0.1, dim=1)
    P_t2i = torch.softmax(t_txt @ t_img.T / 0.1, dim=1)
    expected = 0.5 * (sum(ce(P_i2t[i], L[i]) for i in range(4)) / 4 + sum(ce(P_t2i[i], L.T[i]) for i in range(4)) / 4)
    assert math.isclose(got.item(), expected, rel_tol=1e-5)
    # identity targets recover the hard loss
    eye = torch.eye(4, dtype=torch.float64)
    assert math.isclose(clip_soft_loss(lpi, lpt, eye, eye).item(), clip_hard_loss(lpi, lpt, 0).item(), rel_tol=1e-6)


def test_ibot_cls_loss_averages_all_cross_view_pairs() -> None:
    G, V, B, K = 2, 5, 3, 6
    student = torch.randn(V, B, K, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(G, B, K, dtype=torch.float64), dim=-1)
    got = ibot_cls_loss(student, teacher, student_temp=0.1)
    total, pairs = 0.0, 0
    for q in range(G):
        for v in range(V):
            if v == q:
                continue
            total += sum(ce(teacher[q, b], student[v, b] / 0.1) for b in range(B)) / B
            pairs += 1
    assert pairs == G * V - G
    assert math.isclose(got.item(), total / pairs, rel_tol=1e-6)


def test_ibot_patch_loss_averages_per_image_then_images_then_crops() -> None:
    G, B, N, K = 2, 3, 5, 4
    masks = torch.rand(G, B, N) < 0.5
    masks[0, 1] = False  # an image without masked tokens still counts in its crop's mean (as 0)
    masks[1, 2, 0] = True
    index, weight = patch_loss_weights(masks)
    student_all = torch.randn(G, B, N, K, dtype=torch.float64)
    teacher_all = torch.softmax(torch.randn(G, B, N, K, dtype=torch.float64), dim=-1)
    got = ibot_patch_loss(student_all.reshape(-1, K)[index], teacher_all.reshape(-1, K)[index], weight.double(), 0.1)
    crop_losses = []
    for g in range(G):
        per_image = []
        for b in range(B):
            tokens = [n for n in range(N) if masks[g, b, n]]
            per_image.append(
                sum(ce(teacher_all[g, b, n], student_all[g, b, n] / 0.1) for n in tokens) / max(len(tokens), 1)
            )
        crop_losses.append(sum(per_image) / B)
    assert math.isclose(got.item(), sum(crop_losses) / G, rel_tol=1e-6)


def test_centering_and_sharpening() -> None:
    center = Center(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 6.0]])
    probs = sharpen(logits, center.value, 0.04)
    torch.testing.assert_close(probs, torch.softmax(logits / 0.04, dim=-1))
    center.observe(logits)
    torch.testing.assert_close(center.value, torch.zeros(1, 3))  # applied only at update()
    center.update()
    torch.testing.assert_close(center.value, 0.1 * logits.mean(dim=0, keepdim=True))
    torch.testing.assert_close(sharpen(logits, center.value, 0.5), torch.softmax((logits - center.value) / 0.5, dim=-1))


def test_target_entropy_is_log_k_for_uniform_and_zero_for_one_hot() -> None:
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    expected = (math.log(4) + 0.0 + math.log(2)) / 3
    assert float(mean_entropy(probs)) == pytest.approx(expected, rel=1e-6)
    assert float(mean_entropy(probs[:0])) == 0.0


def test_mae_loss_on_normalised_patches_of_removed_positions() -> None:
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch (row 0, col 1) of image 1, pixel (r, c, channel) order
    torch.testing.assert_close(patches[1, 1].view(4, 4, 3), images[1, :, 0:4, 4:8].permute(1, 2, 0))
    target = normalized_patches(patches)
    p = patches[0, 2]
    torch.testing.assert_close(target[0, 2], (p - p.mean()) / (p.var() + 1e-6).sqrt())
    pred = torch.randn_like(patches)
    removed = torch.tensor([[0, 3], [1, 2]])
    got = mae_loss(
        pred.gather(1, removed[..., None].expand(-1, -1, 48)), target.gather(1, removed[..., None].expand(-1, -1, 48))
    )
    expected = sum(((pred[i, j] - target[i, j]) ** 2).mean().item() for i in range(2) for j in removed[i].tolist()) / 4
    assert math.isclose(got.item(), expected, rel_tol=1e-6)


def test_mlm_normalises_by_global_count_text_distill_by_token_weight() -> None:
    logits = torch.randn(5, 11, dtype=torch.float64)
    targets = torch.tensor([1, 4, 4, 0, 10])
    got = mlm_loss(logits, targets, torch.tensor(5.0))
    expected = sum(ce(F.one_hot(targets[i], 11), logits[i]) for i in range(5)) / 5
    assert math.isclose(got.item(), expected, rel_tol=1e-6)
    teacher = torch.softmax(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    student = torch.randn(5, 7, dtype=torch.float64)
    got = text_distill_loss(student, teacher, 0.1, torch.full((5,), 1 / 5, dtype=torch.float64))
    assert math.isclose(got.item(), sum(ce(teacher[i], student[i] / 0.1) for i in range(5)) / 5, rel_tol=1e-6)
    got = masked_distill_loss(student, teacher, 0.1)
    assert math.isclose(got.item(), sum(ce(teacher[i], student[i] / 0.1) for i in range(5)) / 5, rel_tol=1e-6)


def test_simclr_nt_xent() -> None:
    a, b, tau = unit(4, 6), unit(4, 6), 0.1
    got = simclr_loss(a, b, a, b, tau, offset=0)

    def view_loss(q: torch.Tensor, pos: torch.Tensor, same: torch.Tensor) -> float:
        total = 0.0
        for i in range(4):
            logits = [float(q[i] @ pos[j] / tau) for j in range(4)] + [
                float(q[i] @ same[j] / tau) for j in range(4) if j != i
            ]
            p = [1.0 if j == i else 0.0 for j in range(len(logits))]
            total += ce(p, torch.tensor(logits))
        return total / 4

    expected = 0.5 * (view_loss(a, b, a) + view_loss(b, a, b))
    assert math.isclose(got.item(), expected, rel_tol=1e-5)


def test_block_mask_reaches_ratio_in_blocks() -> None:
    rng = random.Random(0)
    for ratio in (0.1, 0.3, 0.5):
        mask = block_mask((14, 14), ratio, rng, min_patches=16)
        target = round(ratio * 196)
        assert mask.sum() <= target and mask.sum() >= 0.6 * target
    assert block_mask((14, 14), 0.0, rng).sum() == 0
