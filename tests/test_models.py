from __future__ import annotations

import pytest
import torch

from harmony.models.pair import ImageTextModel
from harmony.models.text import TextTower
from harmony.models.tokenizer import PAD_ID, CaptionTokenizer
from harmony.models.vision import VisionTower


def tower() -> VisionTower:
    torch.manual_seed(0)
    return VisionTower("tiny-test", img_size=32).eval()


def test_plain_forward_is_timm_forward_features() -> None:
    t = tower()
    x = torch.randn(2, 3, 32, 32)
    out = t(x)
    assert out.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(out, t.vit.forward_features(x))


def test_any_input_size_interpolates_positions() -> None:
    t = tower()
    assert t(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 32)
    assert t(torch.randn(1, 3, 96, 96)).shape == (1, 1 + 144, 32)


def test_ibot_mask_replaces_patch_embeddings_with_mask_token() -> None:
    t = tower()
    x = torch.randn(2, 3, 32, 32)
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    torch.testing.assert_close(t(x, mask=none), t(x))
    mask = none.clone()
    mask[0, 1, 2] = True
    masked = t(x, mask=mask)
    assert masked.shape == (2, 17, 32)
    torch.testing.assert_close(masked[1], t(x)[1])  # untouched image
    # by hand: patch embeddings with the masked one swapped for the mask token
    emb = t.vit.patch_embed(x)
    emb[0, 1, 2] = t.mask_token[0, 0]
    manual = t.vit.norm(t.vit.blocks(t.vit._pos_embed(emb)))
    torch.testing.assert_close(masked, manual)


def test_mae_dropping_keeps_listed_patches_and_cls() -> None:
    t = tower()
    x = torch.randn(2, 3, 32, 32)
    keep_all = torch.arange(16).repeat(2, 1)
    torch.testing.assert_close(t(x, keep_index=keep_all), t(x))
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
    out = t(x, keep_index=keep)
    assert out.shape == (2, 5, 32)
    seq = t.vit._pos_embed(t.vit.patch_embed(x))
    sub = torch.stack([torch.cat([seq[i, :1], seq[i, 1:][keep[i]]]) for i in range(2)])
    torch.testing.assert_close(out, t.vit.norm(t.vit.blocks(sub)))


def test_truncation_keeps_end_of_text() -> None:
    tok = CaptionTokenizer(context_length=8)
    ids = tok("one two three four five six seven eight nine ten eleven twelve")[0]
    assert ids[0].item() == tok.sot_id and ids[-1].item() == tok.eot_id
    short = tok("a red circle")[0]
    real = (short != PAD_ID).sum().item()
    assert short[real - 1].item() == tok.eot_id and (short[real:] == PAD_ID).all()
    assert tok.mask_id == 49408 and tok.vocab_size == 49409


def test_text_pooling_finds_eot_even_with_mask_ids() -> None:
    tok = CaptionTokenizer(context_length=12)
    torch.manual_seed(0)
    text = TextTower("tiny-test", tok.vocab_size, 12, tok.eot_id).eval()
    ids = tok(["a big red circle", "two blue stars"])
    ids[0, 2] = tok.mask_id  # [MASK] is the largest id: argmax pooling would pick it
    feats = text(ids)
    pooled = text.pool(feats, ids)
    eot = [(row == tok.eot_id).nonzero()[0, 0].item() for row in ids]
    torch.testing.assert_close(pooled, torch.stack([feats[0, eot[0]], feats[1, eot[1]]]))


def test_text_tower_is_causal() -> None:
    tok = CaptionTokenizer(context_length=12)
    torch.manual_seed(0)
    text = TextTower("tiny-test", tok.vocab_size, 12, tok.eot_id).eval()
    a = tok("a big red circle on the left")
    b = a.clone()
    b[0, 5:] = 100
    fa, fb = text(a), text(b)
    torch.testing.assert_close(fa[0, :5], fb[0, :5])
    assert not torch.allclose(fa[0, 5:], fb[0, 5:])


def test_logit_scale_is_clamped_and_embeddings_normalised() -> None:
    tok = CaptionTokenizer(context_length=12)
    model = ImageTextModel("tiny-test", "tiny-test", 16, 32, tok.vocab_size, 12, tok.eot_id, logit_scale_init=500.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-6)  # exp(log 100) in float32
    img = model.encode_image(torch.randn(3, 3, 32, 32))
    txt = model.encode_text(tok(["a", "b", "c"]))
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
