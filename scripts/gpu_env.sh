# Sourced (by scripts/gpu_check.sh, or by hand: `source scripts/gpu_env.sh`) in the repository root on
# a machine the kit of scripts/gpu_deps.sh was carried to: puts .gpu-deps/site, tritonclient (its
# wheels installed under $FSSAM_GPU_WORK/serving) and the wheel's tritonserver (unpacked under
# $FSSAM_GPU_WORK/site) on PYTHONPATH, each only where `python` lacks it. Without .gpu-deps/:
# nothing. Needs `python`: the interpreter that will run fssam (the image's).
if [ -d .gpu-deps/site ]; then
    _work="${FSSAM_GPU_WORK:-/tmp/fssam-gpu-work}"
    _paths="$PWD/.gpu-deps/site"
    if [ -d .gpu-deps/wheels ] && ! python -c "import tritonclient.http" 2>/dev/null; then
        python -m pip install --quiet --upgrade --no-index --no-deps --no-compile --target "$_work/serving" .gpu-deps/wheels/*.whl \
            && _paths="$_paths:$_work/serving"
    fi
    _version=$(python -c "import sys; print('%d.%d' % sys.version_info[:2])")
    _kit=.gpu-deps/tritonserver-cp${_version/./}.tar.xz
    if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pytriton') is None)"; then
        if [ -f "$_kit" ]; then
            mkdir -p "$_work/site" && tar -xJf "$_kit" -C "$_work/site" && _paths="$_paths:$_work/site"
        else
            echo "gpu_env: no $_kit in the kit (it has: $(cd .gpu-deps && ls tritonserver-*.tar.xz 2>/dev/null | tr '\n' ' ')): no tritonserver for this Python; build the kit with \`bash scripts/gpu_deps.sh --python $_version\`" >&2
        fi
    fi
    export PYTHONPATH="$_paths:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_env: PYTHONPATH=$PYTHONPATH" >&2
    unset _work _paths _kit _version
fi
