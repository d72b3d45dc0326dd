"""Build sam2's SAM2Base from a config, as the official FSSAM sam2 configs do (SAM 2 at 512 px).

The memory attention uses fssam's subclasses (real RoPE, SCMA); parameter names are sam2's.
"""

from __future__ import annotations

from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam2_base import SAM2Base

from fssam.model.attention import (
    RotaryAttention,
    SupportCalibratedAttention,
    SupportCalibratedLayer,
    SupportCalibratedMemoryAttention,
)
from fssam.model.config import FSSAMConfig


def _sine(num_pos_feats: int, image_size: int) -> PositionEmbeddingSine:
    return PositionEmbeddingSine(num_pos_feats=num_pos_feats, normalize=True, temperature=10000, image_size=image_size)


def build_sam2(cfg: FSSAMConfig) -> SAM2Base:
    hiera = cfg.hiera
    feat_sizes = (cfg.feature_size, cfg.feature_size)
    image_encoder = ImageEncoder(
        scalp=1,
        trunk=Hiera(
            embed_dim=hiera.embed_dim,
            num_heads=hiera.num_heads,
            stages=hiera.stages,
            global_att_blocks=hiera.global_att_blocks,
            window_pos_embed_bkg_spatial_size=hiera.window_pos_embed_bkg_spatial_size,
            window_spec=hiera.window_spec,
        ),
        neck=FpnNeck(
            position_encoding=_sine(cfg.hidden_dim, cfg.image_size),
            d_model=cfg.hidden_dim,
            backbone_channel_list=list(hiera.backbone_channel_list),
            fpn_top_down_levels=[2, 3],
            fpn_interp_model="nearest",
        ),
    )
    layer = SupportCalibratedLayer(
        activation="relu",
        cross_attention=SupportCalibratedAttention(
            rope_theta=10000.0,
            feat_sizes=feat_sizes,
            rope_k_repeat=True,
            embedding_dim=cfg.hidden_dim,
            num_heads=cfg.memory_attention_heads,
            downsample_rate=1,
            dropout=0.1,
            kv_in_dim=cfg.memory_dim,
            scma_mode=cfg.scma_mode,
        ),
        d_model=cfg.hidden_dim,
        dim_feedforward=cfg.memory_attention_ffn,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        self_attention=RotaryAttention(
            rope_theta=10000.0,
            feat_sizes=feat_sizes,
            embedding_dim=cfg.hidden_dim,
            num_heads=cfg.memory_attention_heads,
            downsample_rate=1,
            dropout=0.1,
        ),
    )
    memory_attention = SupportCalibratedMemoryAttention(
        d_model=cfg.hidden_dim, pos_enc_at_input=True, layer=layer, num_layers=cfg.memory_attention_layers
    )
    memory_encoder = MemoryEncoder(
        out_dim=cfg.memory_dim,
        position_encoding=_sine(cfg.memory_dim, cfg.image_size),
        mask_downsampler=MaskDownSampler(embed_dim=cfg.hidden_dim, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(
            CXBlock(dim=cfg.hidden_dim, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
            num_layers=2,
        ),
        in_dim=cfg.hidden_dim,
    )
    return SAM2Base(
        image_encoder=image_encoder,
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        num_maskmem=cfg.num_maskmem,
        image_size=cfg.image_size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=False,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        compile_image_encoder=False,
    )
