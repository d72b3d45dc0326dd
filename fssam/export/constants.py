"""Position embeddings computed once, at the export's fixed image size, so an exported graph holds
them as constants instead of the subgraph that makes them.

They depend on parameters and the image size only (the batch is the one dynamic dimension), so
every runtime would fold the subgraph itself when it loads the file; but OpenVINO folds SAM 2's
Hiera position embedding (a bicubic resize of its pos_embed to the stride-4 grid, plus the tiled
window embedding) with reference kernels that walk coordinates one element at a time: about 27 s
of every compile of a small graph on two cores, and NNCF compiles a graph several times. The
values are sam2's own functions' results (no second copy of the math): each is computed here by
calling the module's own method, and only while a graph is traced.
"""

from __future__ import annotations

import contextlib

import torch

from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.sam.prompt_encoder import PromptEncoder


def _hiera_grid(hiera: Hiera, image_size: int) -> tuple[int, int]:
    stride = hiera.patch_embed.proj.stride
    return image_size // stride[0], image_size // stride[1]


@contextlib.contextmanager
def folded_position_embeddings(model: torch.nn.Module, image_size: int, context=contextlib.nullcontext):
    """While inside: every Hiera's `_get_pos_embed` at the grid of `image_size` and every SAM 2
    prompt encoder's `get_dense_pe` answer a buffer holding their own result, computed under
    `context` (the trace's own: bf16 autocast for a bf16 export), so the values are those the
    traced subgraph would give; another size still runs the method. The modules are restored on
    leaving, also on an error."""
    patched = []
    try:
        with torch.no_grad(), context():
            for module in model.modules():
                if isinstance(module, Hiera):
                    grid = _hiera_grid(module, image_size)
                    original = module._get_pos_embed
                    module.register_buffer("_folded_pos_embed", original(grid).detach().clone(), persistent=False)

                    def pos_embed(hw, module=module, grid=grid, original=original):
                        return module._folded_pos_embed if tuple(int(v) for v in hw) == grid else original(hw)

                    module._get_pos_embed = pos_embed
                    patched.append((module, "_get_pos_embed", "_folded_pos_embed"))
                elif isinstance(module, PromptEncoder):
                    module.register_buffer("_folded_dense_pe", module.get_dense_pe().detach().clone(), persistent=False)
                    module.get_dense_pe = lambda module=module: module._folded_dense_pe
                    patched.append((module, "get_dense_pe", "_folded_dense_pe"))
        yield
    finally:
        for module, method, buffer in patched:
            del module.__dict__[method]  # the class's method again
            delattr(module, buffer)


__all__ = ["folded_position_embeddings"]
