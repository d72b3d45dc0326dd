#!/usr/bin/env bash
# The main job on its default: `fssam deploy --config small` (export the two deployable graphs with
# the parity gate, make the graph plan of this machine: every runtime and precision it runs timed
# and gated per graph, int8 included; write a Triton model repository (the `fssam` ensemble) for
# the fastest that passed per graph, start tritonserver on 127.0.0.1 with its response cache, check
# the served answers against eager PyTorch, print latency against eager fp32 and eager bf16
# autocast, throughput and payload). Random-init weights unless FSSAM_CHECKPOINT names a
# checkpoint; the output says which.
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=()
if [ -n "${FSSAM_CHECKPOINT:-}" ]; then ckpt=(--checkpoint "$FSSAM_CHECKPOINT"); fi
fssam deploy --config small "${ckpt[@]}" --out out/deploy
