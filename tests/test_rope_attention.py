"""Real-arithmetic RoPE and the memory attention subclasses vs sam2's own modules."""


import pytest
import torch
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis
from sam2.modeling.sam.transformer import RoPEAttention

from fssam.model.attention import RotaryAttention, SupportCalibratedAttention
from fssam.model.rope import axial_rotary_angles, rotate


@pytest.mark.parametrize("dim,side", [(64, 8), (256, 32), (16, 4)])
@pytest.mark.parametrize("repeats", [1, 3])
def test_real_rope_equals_complex_rope(dim, side, repeats):
    g = torch.Generator().manual_seed(dim + side)
    q = torch.randn(2, 1, side * side, dim, generator=g)
    k = torch.randn(2, 1, repeats * side * side, dim, generator=g)
    expected_q, expected_k = apply_rotary_enc(q, k, compute_axial_cis(dim, side, side), repeat_freqs_k=repeats > 1)
    angles = axial_rotary_angles(dim, side, side)
    torch.testing.assert_close(rotate(q, angles.cos(), angles.sin()), expected_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(rotate(k, angles.cos(), angles.sin()), expected_k, atol=1e-6, rtol=0)


def _pair(cls_ours, **kwargs):
    torch.manual_seed(0)
    theirs = RoPEAttention(**kwargs)
    ours = cls_ours(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def test_rotary_attention_equals_sam2_rope_attention():
    theirs, ours = _pair(RotaryAttention, embedding_dim=32, num_heads=1, feat_sizes=(4, 4))
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(ours(x, x, x), theirs(x, x, x), atol=1e-5, rtol=1e-5)


def test_cross_attention_without_masks_equals_sam2():
    kwargs = dict(embedding_dim=32, num_heads=1, feat_sizes=(4, 4), rope_k_repeat=True, kv_in_dim=8)
    theirs, ours = _pair(SupportCalibratedAttention, **kwargs)
    q = torch.randn(2, 16, 32)
    memory = torch.randn(2, 3 * 16 + 8, 8)
    expected = theirs(q, memory.clone(), memory.clone(), num_k_exclude_rope=8)
    torch.testing.assert_close(ours(q, memory, memory, num_k_exclude_rope=8), expected, atol=1e-5, rtol=1e-5)


def test_memory_attention_without_calibration_equals_sam2(tiny_model):
    """Our batch-first SCMA memory attention with no masks is sam2's MemoryAttention."""
    ours = tiny_model.sam2.memory_attention
    cfg = tiny_model.config
    side = cfg.feature_size
    layer = MemoryAttentionLayer(
        activation="relu",
        cross_attention=RoPEAttention(
            embedding_dim=cfg.hidden_dim, num_heads=1, feat_sizes=(side, side), rope_k_repeat=True,
            kv_in_dim=cfg.memory_dim, dropout=0.1,
        ),
        d_model=cfg.hidden_dim,
        dim_feedforward=cfg.memory_attention_ffn,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        self_attention=RoPEAttention(embedding_dim=cfg.hidden_dim, num_heads=1, feat_sizes=(side, side), dropout=0.1),
    )
    theirs = MemoryAttention(d_model=cfg.hidden_dim, pos_enc_at_input=True, layer=layer, num_layers=len(ours.layers))
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    n, pointers = side * side, 8
    g = torch.Generator().manual_seed(1)
    curr, curr_pos = torch.randn(2, n, cfg.hidden_dim, generator=g), torch.randn(2, n, cfg.hidden_dim, generator=g)
    memory = torch.randn(2, 2 * n + pointers, cfg.memory_dim, generator=g)
    memory_pos = torch.randn(2, 2 * n + pointers, cfg.memory_dim, generator=g)
    with torch.no_grad():
        expected = theirs(
            curr=curr.transpose(0, 1), memory=memory.transpose(0, 1).clone(), curr_pos=curr_pos.transpose(0, 1),
            memory_pos=memory_pos.transpose(0, 1), num_obj_ptr_tokens=pointers,
        ).transpose(0, 1)
        got = ours(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens=pointers)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
