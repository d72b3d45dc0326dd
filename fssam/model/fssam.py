"""The FSSAM model: six stages (ARCHITECTURE.md section 3) composed by `forward`.

Shapes: B episodes, K shots, S image size (512), g DINOv2 grid (40), D DINOv2 width (768),
C SAM 2 width (256), M memory width (64), h = w = S / 16, N = h * w.
Images are RGB in 0..255 at S x S; masks are binary (0/1) at S x S.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fssam.model.config import FSSAMConfig
from fssam.model.dino import IMAGENET_MEAN, IMAGENET_STD, PriorBackbone
from fssam.runtime import contract
from fssam.runtime.contract import encode_support, run_episode, segment
from fssam.model.prior import pseudo_prompts
from fssam.model.refine import iterative_memory_refinement
from fssam.model.sam2_assembly import build_sam2

MASK_LOGIT_SCALE, MASK_LOGIT_BIAS = 20.0, -10.0  # sam2: a mask used as output becomes logits +-10


class FSSAM(nn.Module):
    def __init__(self, config: FSSAMConfig):
        super().__init__()
        self.config = config
        self.sam2 = build_sam2(config)
        self.dino = PriorBackbone(config.dino)
        size = config.feature_size
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():  # sine position encodings depend on shapes only
            query_pos = self.sam2.image_encoder.neck.position_encoding(torch.zeros(1, config.hidden_dim, size, size))
            memory_pos = self.sam2.memory_encoder.position_encoding(torch.zeros(1, config.memory_dim, size, size))
        self.register_buffer("query_pos", query_pos.flatten(2).transpose(1, 2).clone(), persistent=False)  # (1, N, C)
        self.register_buffer("memory_pos", memory_pos.flatten(2).transpose(1, 2).clone(), persistent=False)  # (1, N, M)
        self.random_init_seed: int | None = None  # set by build() when no checkpoint was loaded

    # ---------------------------------------------------------------- stage 1
    def prior_backbone(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2 features (n, D, g, g) of images (n, 3, S, S)."""
        return self.dino(images)

    # ---------------------------------------------------------------- stage 2
    def image_encoder(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hiera + FPN features of images (n, 3, S, S): (n, C/8, 4h, 4w), (n, C/4, 2h, 2w), (n, C, h, w)."""
        x = (images / 255.0 - self.pixel_mean) / self.pixel_std
        features = self.sam2.forward_image(x)["backbone_fpn"]  # levels 0, 1 already projected for the decoder
        # sam2's FPN upsamples in fp32: hand the stages the input's dtype back
        return tuple(f.to(images.dtype) for f in features[:3])

    # ---------------------------------------------------------------- stage 3
    def prior(self, query_features, support_features, support_masks):
        """Pseudo Prompt Generator: prior_fg, prior_ae (B, 1, S, S)."""
        return pseudo_prompts(query_features, support_features, support_masks)

    # ---------------------------------------------------------------- stage 4
    def memory_encoder(self, feat_s0, feat_s1, feat_s2, mask):
        """SAM 2 memory of an image under a mask prompt used as output: memory (n, M, h, w), pointer (n, C).

        mask (n, 1, S, S) in [0, 1]: a ground-truth support mask or a query prior.
        """
        sam2 = self.sam2
        mask = mask.to(feat_s2.dtype)
        pointer = self._object_pointer(feat_s0, feat_s1, feat_s2, mask)
        mask_logits = mask * MASK_LOGIT_SCALE + MASK_LOGIT_BIAS
        mask_for_memory = torch.sigmoid(mask_logits) * sam2.sigmoid_scale_for_mem_enc + sam2.sigmoid_bias_for_mem_enc
        memory = sam2.memory_encoder(feat_s2, mask_for_memory, skip_mask_sigmoid=True)["vision_features"]
        return memory, pointer

    def _object_pointer(self, feat_s0, feat_s1, feat_s2, mask):
        sam2 = self.sam2
        _, _, token, object_score = self._sam_heads(feat_s2, feat_s0, feat_s1, sam2.mask_downsample(mask), False)
        pointer = sam2.obj_ptr_proj(token)
        appearing = (object_score > 0).to(pointer.dtype)  # decoder's view, then the mask's (sam2)
        pointer = appearing * pointer + (1 - appearing) * sam2.no_obj_ptr
        appearing = (mask.flatten(1) > 0).any(dim=1, keepdim=True).to(pointer.dtype)
        return appearing * pointer + (1 - appearing) * sam2.no_obj_ptr

    # ---------------------------------------------------------------- stage 5
    def refine(self, support_memory, support_masks, query_fg_memory, query_ae_memory, prior_fg, prior_ae):
        """Iterative Memory Refinement: refined memory (B, M, h, w), refined prior_ae (B, 1, h, w)."""
        return iterative_memory_refinement(
            support_memory,
            support_masks,
            query_fg_memory,
            query_ae_memory,
            prior_fg,
            prior_ae,
            num_refine=self.config.num_refine,
            version=self.config.refine_version,
        )

    # ---------------------------------------------------------------- stage 6
    def head(self, feat_s0, feat_s1, feat_s2, support_memory, support_pointers, query_memory, query_pointer, support_masks):
        """SCMA memory attention + SAM 2 mask decoder: query mask logits (B, 1, S, S).

        support_memory (B, K, M, h, w), support_pointers (B, K, C), query_memory (B, M, h, w)
        (refined), query_pointer (B, C), support_masks (B, K, S, S).
        """
        b, k, m, h, w = support_memory.shape
        c = feat_s2.shape[1]
        spatial = torch.cat([support_memory, query_memory.unsqueeze(1)], dim=1)  # (B, K+1, M, h, w)
        spatial = spatial.flatten(3).transpose(2, 3).reshape(b, (k + 1) * h * w, m)  # (B, (K+1)N, M)
        pointers = torch.cat([support_pointers, query_pointer.unsqueeze(1)], dim=1)  # (B, K+1, C)
        pointers = pointers.reshape(b, (k + 1) * (c // m), m)  # each pointer split into C/M tokens
        memory = torch.cat([spatial, pointers], dim=1)
        spatial_pos = self.memory_pos + self.sam2.maskmem_tpos_enc[self.sam2.num_maskmem - 1].view(1, 1, m)
        memory_pos = torch.cat(
            [spatial_pos.expand(b, -1, -1).repeat(1, k + 1, 1), torch.zeros_like(pointers)], dim=1
        )
        masks = F.interpolate(support_masks.to(feat_s2.dtype), size=(h, w), mode="nearest").flatten(2)  # (B, K, N)
        curr = feat_s2.flatten(2).transpose(1, 2)  # (B, N, C)
        attended = self.sam2.memory_attention(
            curr=curr,
            memory=memory,
            curr_pos=self.query_pos.expand(b, -1, -1).to(curr.dtype),
            memory_pos=memory_pos.to(memory.dtype),
            num_obj_ptr_tokens=pointers.shape[1],
            support_masks=masks,
        )
        attended = attended.transpose(1, 2).reshape(b, c, h, w)
        low_res, ious, _, _ = self._sam_heads(attended, feat_s0, feat_s1, None, True)
        best = ious.argmax(dim=1).view(b, 1, 1, 1).expand(-1, 1, *low_res.shape[-2:])
        low_res = torch.gather(low_res, 1, best).float()  # (B, 1, 4h, 4w)
        size = self.config.image_size
        return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)

    def _sam_heads(self, features, feat_s0, feat_s1, mask_prompt, multimask: bool):
        """SAM prompt encoder + mask decoder, without sam2's hard no-object masking (as the official code).

        Returns low-res masks (B, 1 or 3, 4h, 4w), IoU estimates, the first output token (B, C), object score.
        """
        b = features.shape[0]
        sam2 = self.sam2
        coords = torch.zeros(b, 1, 2, device=features.device, dtype=features.dtype)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=features.device)
        sparse, dense = sam2.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_prompt)
        masks, ious, tokens, object_score = sam2.sam_mask_decoder(
            image_embeddings=features,
            image_pe=sam2.sam_prompt_encoder.get_dense_pe().to(features.dtype),
            sparse_prompt_embeddings=sparse.to(features.dtype),
            dense_prompt_embeddings=dense.to(features.dtype),
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[feat_s0, feat_s1],
        )
        return masks, ious, tokens[:, 0], object_score

    def to_dtype(self, dtype: torch.dtype) -> "FSSAM":
        """The whole model in `dtype` (fp16/bf16 inference), except the prompt encoder's random
        Fourier matrix, which sam2 always applies to fp32 coordinates."""
        self.to(dtype)
        pe = self.sam2.sam_prompt_encoder.pe_layer
        pe.positional_encoding_gaussian_matrix.data = pe.positional_encoding_gaussian_matrix.data.float()
        return self

    # ---------------------------------------------------------------- composed
    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> dict:
        """Everything an episode needs from the support set (cacheable)."""
        return encode_support(self, support_images, support_masks)

    def segment(self, query_images: torch.Tensor, support: dict) -> torch.Tensor:
        """Query mask logits (B, 1, S, S) given an encoded support set."""
        return segment(self, query_images, support)

    # ---------------------------------------------------------------- the deployable graphs
    def support_encoder(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> tuple:
        """uint8 support images (B, K, 3, S, S) and 0/1 masks (B, K, S, S) -> support_features
        (B, K, D, g, g), support_memory (B, K, M, h, w), support_pointers (B, K, C)."""
        dtype = self.pixel_mean.dtype
        return contract.support_encoder(self, support_images.to(dtype), support_masks.to(dtype))

    def query_segmenter(self, query, support_features, support_memory, support_pointers, support_masks):
        """uint8 query (B, 3, S, S), the support_encoder outputs and uint8 0/1 masks -> logits (B, 1, S, S)."""
        dtype = self.pixel_mean.dtype
        return contract.query_segmenter(self, query.to(dtype), support_features, support_memory, support_pointers,
                                        support_masks.to(dtype))

    def forward(self, query_images, support_images, support_masks):
        """query_images (B, 3, S, S), support_images (B, K, 3, S, S), support_masks (B, K, S, S) with
        values 0/1 (255 = ignore, treated as background as in the official code) -> logits (B, 1, S, S)."""
        return run_episode(self, query_images, support_images, support_masks)
