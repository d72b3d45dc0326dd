#!/usr/bin/env bash
# The kit for a lent GPU machine whose image has torch, triton and nvcc but not fssam's other
# packages, and no network: .gpu-deps/ (git-ignored), carried with the tree (the device tool's
# carry [".gpu-deps"]; the tree and the kit must stay under its 64 MiB). scripts/gpu_check.sh finds
# and uses it there by itself.
#   site/      fssam's pure-Python dependencies, copied from this machine's site-packages (sam2, hydra,
#              omegaconf, antlr4, iopath, portalocker; timm and huggingface_hub so that the versions
#              tested here are the ones run there)
#   wheels/    tritonclient (HTTP, the same version as here) and the compiled packages its HTTP client
#              needs, for the GPU's Python, from PyPI (`--no-serving`: left out)
#   tritonserver-cpXY.tar.xz  the nvidia-pytriton wheel's tritonserver, Python backend and bundled
#              libraries with only that Python's backend stub (the wheel is 55 MB, this about 27 MB)
# Usage: bash scripts/gpu_deps.sh [--python 3.12] [--no-serving]   (replaces .gpu-deps/ only)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=3.12  # the lent images' (device tool, KINDS.md)
serving=1
while [ $# -gt 0 ]; do
    case $1 in
        --python) python_version=$2; shift 2 ;;
        --no-serving) serving=0; shift ;;
        *) echo "gpu_deps: unknown argument $1 (usage: bash scripts/gpu_deps.sh [--python 3.12] [--no-serving])" >&2; exit 2 ;;
    esac
done
tag=cp${python_version/./}
packages=(sam2 timm hydra omegaconf antlr4 iopath portalocker huggingface_hub)
site=$(python -c "import sam2, os; print(os.path.dirname(os.path.dirname(sam2.__file__)))")
tmp=$(mktemp -d .gpu-deps.tmp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/site"
for name in "${packages[@]}"; do
    [ -d "$site/$name" ] || { echo "gpu_deps: $name is not installed in $site (run scripts/install.sh first)" >&2; exit 1; }
    cp -r "$site/$name" "$tmp/site/"
done
find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
if [ "$serving" = 1 ]; then
    root=$(python -c "import importlib.util, os; s = importlib.util.find_spec('pytriton'); print(os.path.dirname(list(s.submodule_search_locations)[0]) if s else '')")
    [ -n "$root" ] && [ -d "$root/nvidia_pytriton.libs" ] || {
        echo "gpu_deps: the nvidia-pytriton wheel is not installed here (bash scripts/install.sh serving), or run with --no-serving" >&2; exit 1; }
    [ -x "$root/pytriton/tritonserver/python_backend_stubs/$python_version/triton_python_backend_stub" ] || {
        echo "gpu_deps: the nvidia-pytriton wheel has no Python backend stub for Python $python_version" >&2; exit 1; }
    # the server, its Python backend and libraries, one stub; not the other Pythons' stubs nor the bundled libpython they need
    excludes=()
    for stub in "$root"/pytriton/tritonserver/python_backend_stubs/*; do
        [ "$(basename "$stub")" = "$python_version" ] || excludes+=(--exclude="pytriton/tritonserver/python_backend_stubs/$(basename "$stub")")
    done
    [ "$python_version" = 3.13 ] || excludes+=(--exclude='nvidia_pytriton.libs/libpython3*')
    tar -C "$root" "${excludes[@]}" --exclude=__pycache__ -cf - pytriton nvidia_pytriton.libs | xz -T0 -6 >"$tmp/tritonserver-$tag.tar.xz"
    client=$(python -c "import importlib.metadata as m; print(m.version('tritonclient'))")
    # tritonclient.http's compiled needs (urllib3, certifi, numpy and aiohttp are in the images), as wheels:
    # gpu_check.sh installs them there (30 MB installed, 6 MB as wheels)
    python -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp/wheels" --python-version "$python_version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        "tritonclient==$client" geventhttpclient python-rapidjson gevent 'greenlet<3.4' zope.event zope.interface brotli \
        2> >(grep -v "^WARNING: Location" >&2)
fi
rm -rf .gpu-deps
mv "$tmp" .gpu-deps
trap - EXIT
echo "gpu_deps: .gpu-deps/ for Python $python_version: $(du -sh .gpu-deps | cut -f1) (site: ${packages[*]}$([ "$serving" = 1 ] && echo "; serving: tritonclient $client, tritonserver"))"
