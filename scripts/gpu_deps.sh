#!/usr/bin/env bash
# For a GPU machine that has torch and triton but not fssam's other pure-Python dependencies and no
# network (the lent H100/H200 images): copy them from this machine's site-packages into .gpu-deps/
# (git-ignored), to be carried along with the tree. On the GPU machine:
#   PYTHONPATH=$PWD/.gpu-deps:$PWD bash scripts/gpu_check.sh
# Usage: bash scripts/gpu_deps.sh   (replaces .gpu-deps/ only; nothing else is touched)
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(sam2 timm hydra omegaconf antlr4 iopath portalocker huggingface_hub)
site=$(python -c "import sam2, os; print(os.path.dirname(os.path.dirname(sam2.__file__)))")
tmp=$(mktemp -d .gpu-deps.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
for name in "${packages[@]}"; do
    [ -d "$site/$name" ] || { echo "gpu_deps: $name is not installed in $site (run scripts/install.sh first)" >&2; exit 1; }
    cp -r "$site/$name" "$tmp/"
done
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
rm -rf .gpu-deps
mv "$tmp" .gpu-deps
trap - EXIT
echo "gpu_deps: ${packages[*]} -> .gpu-deps/ ($(du -sh .gpu-deps | cut -f1))"
