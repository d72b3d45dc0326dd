"""SAM 2 memory attention with real-arithmetic RoPE and Support-Calibrated cross-attention.

Subclasses of sam2's modules: parameter names and checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.sam.transformer import RoPEAttention
from torch import Tensor

from fssam.model.rope import axial_rotary_angles, rotate
from fssam.ops.scma import scma  # the custom op; the reference or one ONNX node while exporting


class RotaryAttention(RoPEAttention):
    """sam2's RoPEAttention with the rotation in cos/sin instead of complex numbers."""

    def __init__(self, *args, rope_theta: float = 10000.0, feat_sizes=(32, 32), **kwargs):
        super().__init__(*args, rope_theta=rope_theta, feat_sizes=feat_sizes, **kwargs)
        del self.freqs_cis  # the complex table is not used (nor exportable)
        angles = axial_rotary_angles(self.internal_dim // self.num_heads, feat_sizes[0], feat_sizes[1], rope_theta)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)  # (N, c/2)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def _project(self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int):
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, H, N, c)
        k = self._separate_heads(self.k_proj(k), self.num_heads)  # (B, H, T, c)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        if q.shape[-2] != self.rope_cos.shape[0]:
            raise ValueError(f"query has {q.shape[-2]} tokens, RoPE table expects {self.rope_cos.shape[0]}")
        num_k_rope = k.shape[-2] - num_k_exclude_rope
        q = rotate(q, self.rope_cos, self.rope_sin)
        k = torch.cat([rotate(k[:, :, :num_k_rope], self.rope_cos, self.rope_sin), k[:, :, num_k_rope:]], dim=2)
        return q, k, v

    def forward(self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int = 0) -> Tensor:
        q, k, v = self._project(q, k, v, num_k_exclude_rope)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)
        return self.out_proj(self._recombine_heads(out))


class SupportCalibratedAttention(RotaryAttention):
    """Cross-attention to memory whose pseudo-query scores are calibrated by the support (SCMA)."""

    def __init__(self, *args, scma_mode: str = "paper", **kwargs):
        super().__init__(*args, **kwargs)
        self.scma_mode = scma_mode

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, num_k_exclude_rope: int = 0, support_masks: Tensor | None = None
    ) -> Tensor:
        if support_masks is None:
            return super().forward(q, k, v, num_k_exclude_rope)
        q, k, v = self._project(q, k, v, num_k_exclude_rope)
        out = scma(q, k, v, support_masks, self.scma_mode)
        return self.out_proj(self._recombine_heads(out))


class SupportCalibratedLayer(MemoryAttentionLayer):
    """One memory-attention layer: self-attention, SCMA cross-attention, MLP."""

    def forward(self, tgt, memory, pos=None, query_pos=None, num_k_exclude_rope: int = 0, support_masks=None):
        tgt = self._forward_sa(tgt, query_pos)
        tgt2 = self.norm2(tgt)
        tgt2 = self.cross_attn_image(
            q=tgt2 + query_pos if self.pos_enc_at_cross_attn_queries else tgt2,
            k=memory + pos if self.pos_enc_at_cross_attn_keys else memory,
            v=memory,
            num_k_exclude_rope=num_k_exclude_rope,
            support_masks=support_masks,
        )
        tgt = tgt + self.dropout2(tgt2)
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(self.norm3(tgt)))))
        return tgt + self.dropout3(tgt2)


class SupportCalibratedMemoryAttention(MemoryAttention):
    """sam2's MemoryAttention, batch first, passing the support masks to every cross-attention."""

    def forward(self, curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens: int = 0, support_masks=None):
        # curr (B, N, C), curr_pos (B, N, C), memory (B, T, M), memory_pos (B, T, M)
        output = curr + 0.1 * curr_pos if self.pos_enc_at_input else curr
        for layer in self.layers:
            output = layer(
                tgt=output,
                memory=memory,
                pos=memory_pos,
                query_pos=curr_pos,
                num_k_exclude_rope=num_obj_ptr_tokens,
                support_masks=support_masks,
            )
        return self.norm(output)
