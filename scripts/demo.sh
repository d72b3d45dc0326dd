#!/usr/bin/env bash
# The main job on its default: a generated 1-shot episode through the eager `small` model
# (random init unless FSSAM_CHECKPOINT is set), writing a mask and an overlay under out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/demo
mkdir -p "$out"
python scripts/make_episode.py "$out"
ckpt=()
if [ -n "${FSSAM_CHECKPOINT:-}" ]; then ckpt=(--checkpoint "$FSSAM_CHECKPOINT"); fi
fssam predict --config small "${ckpt[@]}" --support "$out/support.jpg" --support-mask "$out/support.png" \
    --query "$out/query.jpg" --out "$out/pred.png"
fssam export --config small "${ckpt[@]}" --out out/artifacts-small
