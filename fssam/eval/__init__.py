"""Few-shot evaluation: mIoU / FB-IoU on PASCAL-5i or COCO-20i through any backend (the `fssam eval` library).

The episodes are the official test's (fssam.data.sample_episodes: same lists, seed 321, the
DataLoader's 32-worker draws replayed), so every backend sees the same episodes in the same
order and their figures compare one to one. Per episode, as the official test:
query and supports resized to S x S (image bilinear as float32, label nearest), support masks
0/1/255 (255 = ignore, background for the model), logits resized back to the original label
size (bilinear, align_corners=True), sigmoid >= 0.5, IoU over pixels not labelled 255.

Mask agreement between backends: every result lists, per episode, a hash and the foreground
count of the predicted mask; `save_masks` also writes the masks themselves (packed bits,
compressed npz). `compare` checks that another result ran the same episodes and reports
per-episode mask IoU (when it saved its masks) or identical-mask fraction (from the hashes otherwise).

* `make_backend(name, ...)` -> `Backend`: eager, onnx, openvino, tensorrt or triton (fssam.eval.backends).
* `run_eval(backend, specs, classes, root, dataset)` -> (result, masks) (fssam.eval.run).
* `compare`, `save_masks`, `load_masks` (fssam.eval.agreement); `load_result`, `write_json`,
  `format_table` (fssam.eval.results).
* `check_eager_precision`, `eager_forward`: eager fp32 / bf16 autocast, shared with `fssam predict`.
"""

from fssam.eval.agreement import compare, load_masks, save_masks
from fssam.eval.backends import BACKENDS, Backend, make_backend
from fssam.eval.precision import check_eager_precision, eager_forward
from fssam.eval.results import FORMAT, load_result, write_json
from fssam.eval.run import mask_digest, run_eval

__all__ = [
    "BACKENDS",
    "FORMAT",
    "Backend",
    "make_backend",
    "run_eval",
    "compare",
    "save_masks",
    "load_masks",
    "load_result",
    "write_json",
    "mask_digest",
    "check_eager_precision",
    "eager_forward",
]
