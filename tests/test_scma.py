"""SCMA reference vs a literal re-statement of the formula (ARCHITECTURE.md section 2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fssam.ops.scma.reference import scma_reference


def literal_scma(q, k, v, masks, shot):
    """The official attention branch written out step by step (with the released code's two
    defects fixed: the masked-average helper, and each shot indexing its own mask).
    q (b, n, N, c); k, v (b, n, T, c); masks (b*shot, 1, h, w)."""
    b, heads, num_pixel, c = q.shape
    h = w = int(math.isqrt(num_pixel))
    masks = masks.view(b, shot, 1, h, w)
    k_qry = k[:, :, shot * num_pixel : (shot + 1) * num_pixel, :]
    k_qry_norm = torch.norm(k_qry, 2, -1, True)
    cos_norms = []
    for idx in range(shot):
        k_sup = k[:, :, idx * num_pixel : (idx + 1) * num_pixel, :]
        k_sup = k_sup.permute(0, 1, 3, 2).reshape(b * heads, c, h, w)
        mask = masks[:, idx].unsqueeze(1).expand(-1, heads, -1, -1, -1).reshape(b * heads, 1, h, w)
        pooled = F.avg_pool2d(k_sup * mask, (h, w)) * h * w
        area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
        proto = (pooled / area).view(b, heads, c).unsqueeze(2)  # b, n, 1, c
        proto_norm = torch.norm(proto, 2, -1, True)
        cos = (proto @ k_qry.transpose(-2, -1)) / (proto_norm @ k_qry_norm.transpose(-2, -1) + 1e-7)
        cos = (cos - cos.min(-1)[0].unsqueeze(-1)) / (cos.max(-1)[0].unsqueeze(-1) - cos.min(-1)[0].unsqueeze(-1) + 1e-7)
        cos_norms.append(cos)
    cos_norm = torch.cat(cos_norms, dim=2).mean(2, True)
    k_1 = k[:, :, : shot * num_pixel].reshape(b, heads, shot, num_pixel, c).mean(2)
    v_1 = v[:, :, : shot * num_pixel].reshape(b, heads, shot, num_pixel, c).mean(2)
    k = torch.cat([k_1, k[:, :, shot * num_pixel :]], dim=-2)
    v = torch.cat([v_1, v[:, :, shot * num_pixel :]], dim=-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(c)
    att_sup, att_qq, att_pts = att[..., :num_pixel], att[..., num_pixel : 2 * num_pixel], att[..., 2 * num_pixel :]
    att_norm = (att_qq - att_qq.min(-1)[0].unsqueeze(-1)) / (
        att_qq.max(-1)[0].unsqueeze(-1) - att_qq.min(-1)[0].unsqueeze(-1) + 1e-7
    )
    att_norm = att_norm + (cos_norm - 1.0)
    bias = att_norm.clone()
    bias[bias > 0] = 0
    att_qq = att_qq + bias * 10.0
    weights = torch.softmax(torch.cat([att_sup, att_qq, att_pts], dim=-1), dim=-1)
    return weights @ v


def _inputs(b, heads, shots, pointers, side=6, c=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    q = torch.randn(b, heads, n, c, generator=g)
    k = torch.randn(b, heads, (shots + 1) * n + pointers, c, generator=g)
    v = torch.randn(b, heads, (shots + 1) * n + pointers, c, generator=g)
    masks = (torch.rand(b, shots, n, generator=g) > 0.6).float()
    masks[:, :, 0] = 1  # at least one foreground token per shot
    return q, k, v, masks


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("pointers", [0, 8, 24])
@pytest.mark.parametrize("heads", [1, 2])
def test_paper_mode_matches_literal_formula(shots, pointers, heads):
    q, k, v, masks = _inputs(2, heads, shots, pointers)
    side = int(math.isqrt(q.shape[2]))
    expected = literal_scma(q, k, v, masks.reshape(2 * shots, 1, side, side), shots)
    got = scma_reference(q, k, v, masks, mode="paper")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shots", [1, 5])
def test_official_mode_matches_released_5shot_behaviour(shots):
    """The released 5-shot code passes only the first mask: SCMA then sees one shot, and the
    calibrated block is the N keys after the first support (the second support memory)."""
    q, k, v, masks = _inputs(1, 1, shots, 8)
    side = int(math.isqrt(q.shape[2]))
    expected = literal_scma(q, k, v, masks[:, :1].reshape(1, 1, side, side), 1)
    got = scma_reference(q, k, v, masks, mode="official")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_modes_agree_for_one_shot_and_differ_for_five():
    q, k, v, masks = _inputs(1, 1, 1, 8)
    torch.testing.assert_close(scma_reference(q, k, v, masks, "paper"), scma_reference(q, k, v, masks, "official"))
    q, k, v, masks = _inputs(1, 1, 5, 8)
    assert (scma_reference(q, k, v, masks, "paper") - scma_reference(q, k, v, masks, "official")).abs().max() > 1e-3


def test_each_shot_uses_its_own_mask():
    """Paper mode depends on every shot's mask; official mode only on the first."""
    q, k, v, masks = _inputs(1, 1, 5, 8)
    changed = masks.clone()
    changed[:, 3] = 1 - changed[:, 3]
    changed[:, 3, 0] = 1
    assert (scma_reference(q, k, v, masks, "paper") - scma_reference(q, k, v, changed, "paper")).abs().max() > 1e-4
    torch.testing.assert_close(scma_reference(q, k, v, masks, "official"), scma_reference(q, k, v, changed, "official"))


@pytest.mark.parametrize("shots", [1, 5])
def test_constant_scores_and_empty_mask_match_literal_formula(shots):
    """Degenerate inputs: every score row constant (max == min, so the normalised block is 0/1e-7)
    and no support foreground (the prototype is 0 / 5e-4 = 0, every cosine 0): finite, and the
    literal formula's values, not only finite ones."""
    q, k, v, masks = _inputs(1, 1, shots, 4)
    q = torch.zeros_like(q)  # every score row constant: max == min
    masks = torch.zeros_like(masks)  # no support foreground
    out = scma_reference(q, k, v, masks)
    side = int(math.isqrt(q.shape[2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, literal_scma(q, k, v, masks.reshape(shots, 1, side, side), shots),
                               rtol=1e-5, atol=1e-6)


def test_unknown_mode_is_an_error():
    q, k, v, masks = _inputs(1, 1, 1, 0)
    with pytest.raises(ValueError, match="scma mode"):
        scma_reference(q, k, v, masks, mode="nope")


def test_model_helpers_are_the_reference_ones():
    """The prior generator and the refinement use SCMA's masked average and min-max
    normalisation: one implementation (fssam.model.scma only re-exports them)."""
    import fssam.model.prior as prior
    import fssam.model.refine as refine
    import fssam.ops.scma.reference as reference

    assert prior.masked_average is reference.masked_average
    assert prior.min_max_normalise is refine.min_max_normalise is reference.min_max_normalise
    assert prior.COSINE_EPS == reference.COSINE_EPS


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("shots,pointers", [(1, 0), (5, 8)])
def test_op_on_cpu_is_the_reference(shots, pointers, mode):
    """torch.ops.fssam.scma (a triton_op: Triton kernels on CUDA) runs the reference on CPU tensors,
    bit for bit, in eager and in a torch.export'ed program (where it stays one node)."""
    import fssam.ops.scma  # noqa: F401  (registers the op)

    inputs = _inputs(2, 2, shots, pointers)
    expected = scma_reference(*inputs, mode=mode)
    assert torch.equal(torch.ops.fssam.scma(*inputs, mode), expected)

    class Module(torch.nn.Module):
        def forward(self, q, k, v, masks):
            return torch.ops.fssam.scma(q, k, v, masks, mode)

    program = torch.export.export(Module(), inputs)
    assert [n.target for n in program.graph.nodes if n.op == "call_function"] == [torch.ops.fssam.scma.default]
    assert torch.equal(program.module()(*inputs), expected)
