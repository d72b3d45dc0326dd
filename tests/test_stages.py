"""Each stage vs a literal re-statement of the official code, and stages composed == forward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import random_episode


def _gap(feat, mask):
    """The official Weighted_GAP: masked average pooling with a 5e-4 area epsilon."""
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(feat * mask, (h, w)) * h * w / area


def _cos_map(query, proto):
    q = query.flatten(2)  # b, c, hw
    s = proto.flatten(2).transpose(-2, -1)  # b, 1, c
    sim = (s @ q) / (torch.norm(s, 2, 2, True) @ torch.norm(q, 2, 1, True) + 1e-7)
    sim = sim.max(1)[0]
    return (sim - sim.min(1)[0].unsqueeze(1)) / (sim.max(1)[0].unsqueeze(1) - sim.min(1)[0].unsqueeze(1) + 1e-7)


def literal_prior(query_feat, support_feats, support_masks, size):
    """Official generate_prior_proto(normalize=True) per shot, then the 5-shot mean."""
    b, _, g, _ = query_feat.shape
    fg_list, ae_list = [], []
    for i in range(support_feats.shape[1]):
        mask = F.interpolate(support_masks[:, i : i + 1], size=(g, g), mode="bilinear", align_corners=True)
        fg = _cos_map(query_feat, _gap(support_feats[:, i], mask)).view(b, 1, g, g)
        bg = _cos_map(query_feat, _gap(support_feats[:, i], 1 - mask)).view(b, 1, g, g)
        fg = F.interpolate(fg, size=size, mode="bilinear", align_corners=True)
        bg = F.interpolate(bg, size=size, mode="bilinear", align_corners=True)
        corr = fg - bg
        corr[corr < 0] = 0
        corr = corr.view(b, -1)
        corr = (corr - corr.min(1)[0].unsqueeze(1)) / (corr.max(1)[0].unsqueeze(1) - corr.min(1)[0].unsqueeze(1) + 1e-7)
        fg_list.append(fg)
        ae_list.append(corr.view(b, 1, *size))
    return torch.cat(fg_list, 1).mean(1, True), torch.cat(ae_list, 1).mean(1, True)


def literal_refine(sup_mem, sup_masks, qry_fg_mem, qry_ae_mem, prior_fg, prior_ae, num_refine, version):
    """Official mem_refine loop (the 5-shot generate_prior_mem averages shots)."""
    b, k, m, h, w = sup_mem.shape
    size = (h, w)
    sup_fg = F.interpolate(sup_masks, size=size, mode="bilinear", align_corners=True)
    prior_fg = F.interpolate(prior_fg, size=size, mode="bilinear", align_corners=True)
    prior_ae = F.interpolate(prior_ae, size=size, mode="bilinear", align_corners=True)

    def prior_mem(qry, sup, mask):
        return _cos_map(qry, _gap(sup, mask)).view(b, 1, h, w)

    to_sup = torch.cat([prior_mem(qry_fg_mem, sup_mem[:, i], sup_fg[:, i : i + 1]) for i in range(k)], 1).mean(1, True)
    for _ in range(num_refine):
        p = prior_mem(qry_fg_mem, qry_ae_mem, prior_ae) + (to_sup - 1.0)
        p[p < 0] = 0
        if version == "v2":
            p = p.view(b, 1, -1)
            p = (p - p.min(-1)[0].unsqueeze(-1)) / (p.max(-1)[0].unsqueeze(-1) - p.min(-1)[0].unsqueeze(-1) + 1e-7)
            p = p.view(b, 1, h, w)
        qry_ae_mem = qry_fg_mem * p + qry_ae_mem * (1.0 - p)
        prior_ae = (prior_fg * p + prior_ae * (1.0 - p)).view(b, 1, -1)
        prior_ae = (prior_ae - prior_ae.min(-1)[0].unsqueeze(-1)) / (
            prior_ae.max(-1)[0].unsqueeze(-1) - prior_ae.min(-1)[0].unsqueeze(-1) + 1e-7
        )
        prior_ae = prior_ae.view(b, 1, h, w)
    return qry_ae_mem, prior_ae


@pytest.mark.parametrize("shots", [1, 5])
def test_prior_matches_official(tiny_model, shots):
    g = torch.Generator().manual_seed(shots)
    query_feat = torch.randn(2, 24, 5, 5, generator=g)
    support_feats = torch.randn(2, shots, 24, 5, 5, generator=g)
    _, _, masks = random_episode(2, shots, 64, seed=shots)
    prior_fg, prior_ae = tiny_model.prior(query_feat, support_feats, masks)
    expected_fg, expected_ae = literal_prior(query_feat, support_feats, masks, (64, 64))
    torch.testing.assert_close(prior_fg, expected_fg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior_ae, expected_ae, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_refine_matches_official(shots, version):
    from fssam.model.refine import iterative_memory_refinement

    g = torch.Generator().manual_seed(7)
    sup_mem = torch.randn(2, shots, 8, 4, 4, generator=g)
    fg_mem, ae_mem = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    prior_fg, prior_ae = torch.rand(2, 1, 64, 64, generator=g), torch.rand(2, 1, 64, 64, generator=g)
    _, _, masks = random_episode(2, shots, 64, seed=3)
    got = iterative_memory_refinement(sup_mem, masks, fg_mem, ae_mem, prior_fg, prior_ae, 3, version)
    expected = literal_refine(sup_mem, masks, fg_mem, ae_mem, prior_fg, prior_ae, 3, version)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_memory_encoder_matches_sam2_mask_as_output(tiny_model):
    """Stage 4 == sam2's own `_use_mask_as_output` + `_encode_new_memory`, as the official code calls them."""
    sam2 = tiny_model.sam2
    query, _, masks = random_episode(2, 1, 64, seed=4)
    prior = torch.rand(2, 1, 64, 64)
    prior[1] = 0  # an all-zero prompt: the no-object pointer path
    with torch.no_grad():
        s0, s1, s2 = tiny_model.image_encoder(query)
        for mask in (masks[:, :1], prior):
            memory, pointer = tiny_model.memory_encoder(s0, s1, s2, mask)
            out = sam2._use_mask_as_output(s2, [s0, s1], mask)
            feats = [x.flatten(2).permute(2, 0, 1) for x in (s0, s1, s2)]
            sizes = [tuple(x.shape[-2:]) for x in (s0, s1, s2)]
            expected_memory, _ = sam2._encode_new_memory(feats, sizes, out[4], out[6], is_mask_from_pts=False)
            torch.testing.assert_close(pointer, out[5], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(memory, expected_memory, atol=1e-5, rtol=1e-5)


def test_head_decoder_matches_sam2_when_object_present(tiny_model):
    """Where sam2 sees an object, our decoder call equals sam2's `_forward_sam_heads` (multimask, best IoU)."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(50.0)  # object always present
        query, _, _ = random_episode(2, 1, 64, seed=5)
        s0, s1, s2 = model.image_encoder(query)
        low, ious, _, _ = model._sam_heads(s2, s0, s1, None, True)
        out = model.sam2._forward_sam_heads(s2, None, None, [s0, s1], multimask_output=True)
        best = ious.argmax(1)
        torch.testing.assert_close(low[torch.arange(2), best].unsqueeze(1), out[3], atol=1e-5, rtol=1e-5)


def test_head_keeps_logits_without_object(tiny_model):
    """The official head does not replace the mask by -1024 when the object score is negative."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(-50.0)
        query, supports, masks = random_episode(1, 1, 64, seed=6)
        logits = model(query, supports, masks)
    assert logits.abs().max() < 1000


@pytest.mark.parametrize("shots", [1, 5])
def test_stages_composed_equal_forward(tiny_model, shots):
    m = tiny_model
    query, supports, masks = random_episode(2, shots, 64, seed=shots)
    with torch.no_grad():
        expected = m(query, supports, masks)
        flat = supports.flatten(0, 1)
        sup_dino = m.prior_backbone(flat).unflatten(0, (2, shots))
        qry_dino = m.prior_backbone(query)
        s0, s1, s2 = m.image_encoder(query)
        t0, t1, t2 = m.image_encoder(flat)
        sup_mem, sup_ptr = m.memory_encoder(t0, t1, t2, masks.flatten(0, 1).unsqueeze(1))
        sup_mem, sup_ptr = sup_mem.unflatten(0, (2, shots)), sup_ptr.unflatten(0, (2, shots))
        prior_fg, prior_ae = m.prior(qry_dino, sup_dino, masks)
        fg_mem, _ = m.memory_encoder(s0, s1, s2, prior_fg)
        ae_mem, ae_ptr = m.memory_encoder(s0, s1, s2, prior_ae)
        refined, _ = m.refine(sup_mem, masks, fg_mem, ae_mem, prior_fg, prior_ae)
        logits = m.head(s0, s1, s2, sup_mem, sup_ptr, refined, ae_ptr, masks)
    assert logits.shape == (2, 1, 64, 64)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_batch_items_are_independent(tiny_model):
    query, supports, masks = random_episode(3, 2, 64, seed=9)
    with torch.no_grad():
        batched = tiny_model(query, supports, masks)
        single = torch.cat([tiny_model(query[i : i + 1], supports[i : i + 1], masks[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_ignore_label_is_background(tiny_model):
    query, supports, masks = random_episode(1, 1, 64, seed=10)
    ignored = masks.clone()
    ignored[..., :4, :] = 255
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(query, supports, ignored), tiny_model(query, supports, masks))


def test_scma_modes_are_wired():
    """The model's config option reaches every SCMA layer; 5-shot outputs differ between modes."""
    from fssam.model import build

    official = build("tiny", seed=0, scma_mode="official")
    paper = build("tiny", seed=0, scma_mode="paper")
    assert all(layer.cross_attn_image.scma_mode == "official" for layer in official.sam2.memory_attention.layers)
    assert all(layer.cross_attn_image.scma_mode == "paper" for layer in paper.sam2.memory_attention.layers)
    query, supports, masks = random_episode(1, 5, 64, seed=11)
    with torch.no_grad():
        assert (official(query, supports, masks) - paper(query, supports, masks)).abs().max() > 1e-4
