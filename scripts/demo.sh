#!/usr/bin/env bash
# The main job on its default: `fssam deploy --config small` (export every stage with the parity
# gate, write a Triton model repository, start tritonserver on 127.0.0.1, run one episode through
# it, compare with eager PyTorch, print a latency summary). Random-init weights unless
# FSSAM_CHECKPOINT names a checkpoint; the output says which.
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=()
if [ -n "${FSSAM_CHECKPOINT:-}" ]; then ckpt=(--checkpoint "$FSSAM_CHECKPOINT"); fi
fssam deploy --config small "${ckpt[@]}" --out out/deploy
