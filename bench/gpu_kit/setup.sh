#!/usr/bin/env bash
# First call of the GPU kit on the bare device machine (.gpu/README.txt), from the repo root:
#   bash .gpu/setup.sh
# 1. untars .gpu/src.tar.gz (pruned llama.cpp of llama-cpp-python 0.3.36) into $GB (/tmp/gb);
# 2. applies docker/patches/llama-cpp-cuda-radix-top-k.patch (PATCH=0 leaves it out);
# 3. starts the CMake CUDA build in the background (setsid nohup; $GB/build.log, then
#    $GB/build.rc), flags as bench/gpu_engine.py's docstring, -j$JOBS (16); CMAKE_EXTRA appends;
# 4. meanwhile installs .gpu/mwhl (and mwhl2, nbwhl, envoywhl where carried) into $SITE
#    (/tmp/site) and copies .gpu/llama_cpp there.
# Source: bench/gpu_kit/setup.sh; bench/gpu_kit/build.sh copies it into .gpu/ (edit it there).
set -uo pipefail
KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$KIT_DIR/.." && pwd)
cd "$ROOT" || exit 1
GB=${GB:-/tmp/gb}
SITE=${SITE:-/tmp/site}
JOBS=${JOBS:-16}
DEV=(bash "$KIT_DIR/dev.sh")
log() { echo "[setup.sh $(date +%H:%M:%S)] $*"; }
t0=$SECONDS

PY=${PY:-$(command -v python3 || echo /opt/torch/.venv/bin/python3)}
export PY GB SITE
log "machine $(cut -c1-8 /proc/sys/kernel/random/boot_id 2>/dev/null); python: $PY ($("$PY" -V 2>&1)); $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"
case $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) in
    3.12) ;;
    *) log "WARNING: the wheels are cp312; this python is $("$PY" -V 2>&1)";;
esac

# --- 1. sources -------------------------------------------------------------------------------
if [ -f "$GB/build.rc" ] || pgrep -f "$GB/build-llama.sh" >/dev/null 2>&1; then
    log "a build already ran or runs in $GB: not starting another (rm -rf $GB to start over)"
    BUILD_STARTED=1
else
    BUILD_STARTED=0
    rm -rf "$GB/llama.cpp" "$GB/kit" "$GB/build"
    mkdir -p "$GB/models"
    tar -xzf .gpu/src.tar.gz -C "$GB" || { log "untar failed"; exit 1; }
    log "sources: $GB/llama.cpp ($(du -sh "$GB/llama.cpp" | cut -f1))"

    # --- 2. the radix top-k patch ---------------------------------------------------------------
    topk=$GB/llama.cpp/ggml/src/ggml-cuda/top-k.cu
    if [ "${PATCH:-1}" = 0 ]; then
        echo "not applied (PATCH=0)" > "$GB/patch.txt"
    else
        p=$ROOT/docker/patches/llama-cpp-cuda-radix-top-k.patch
        [ -f "$p" ] || p=$GB/kit/llama-cpp-cuda-radix-top-k.patch
        if command -v patch >/dev/null && patch -p1 -d "$GB/llama.cpp" < "$p"; then how="patch -p1"
        elif command -v git >/dev/null && (cd "$GB/llama.cpp" && git apply -p1 "$p"); then how="git apply"
        else cp "$GB/kit/top-k.cu.radix" "$topk"; how="copied kit/top-k.cu.radix"; fi
        if cmp -s "$topk" "$GB/kit/top-k.cu.radix"; then
            echo "applied ($how): $(sha256sum "$topk" | cut -c1-16)" > "$GB/patch.txt"
        else
            log "the patched top-k.cu differs from kit/top-k.cu.radix: using the kit's copy"
            cp "$GB/kit/top-k.cu.radix" "$topk"
            echo "applied (kit copy after $how differed)" > "$GB/patch.txt"
        fi
    fi
    log "radix top-k patch: $(cat "$GB/patch.txt")"

    # --- 3. the CUDA build, in its own session so that it outlives this call -------------------
    export PATH="$PATH:/usr/local/cuda/bin:$(dirname "$PY")"
    CMAKE=$(command -v cmake || echo "$(dirname "$PY")/cmake")
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    cat > "$GB/build-llama.sh" <<EOF
#!/usr/bin/env bash
# written by .gpu/setup.sh
export PATH="$PATH"
cd "$GB"
echo "nvcc: $NVCC"; "$NVCC" --version | tail -n 3
echo "cmake: $CMAKE"; "$CMAKE" --version | head -n 1
echo "patch: \$(cat "$GB/patch.txt")"
start=\$(date +%s)
"$CMAKE" -S llama.cpp -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \\
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \\
    -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_CUDA_COMPILER="$NVCC" ${CMAKE_EXTRA:-} \\
  && "$CMAKE" --build build --target llama llama-server llama-batched-bench -j$JOBS
rc=\$?
echo "build rc=\$rc in \$(( \$(date +%s) - start )) s"
echo \$rc > "$GB/build.rc"
EOF
    chmod +x "$GB/build-llama.sh"
    if [ "${NOBUILD:-0}" = 1 ] || { ! command -v nvidia-smi >/dev/null && [ "${FORCE_BUILD:-0}" != 1 ]; }; then
        log "build NOT started (NOBUILD=1 or no nvidia-smi here; FORCE_BUILD=1 forces): $GB/build-llama.sh"
    else
        setsid nohup bash "$GB/build-llama.sh" > "$GB/build.log" 2>&1 < /dev/null &
        disown || true
        BUILD_STARTED=1
        log "build started in the background (log $GB/build.log, rc in $GB/build.rc)"
    fi
fi

# --- 4. Python packages ---------------------------------------------------------------------
rc=0
for d in .gpu/mwhl .gpu/mwhl2; do
    [ -d "$d" ] && { "${DEV[@]}" wheels "$d" || rc=1; }
done
"${DEV[@]}" llama_cpp || rc=1
if ls .gpu/nbwhl/*.whl >/dev/null 2>&1; then "${DEV[@]}" numba || rc=1; fi
if ls .gpu/envoywhl/*.whl >/dev/null 2>&1; then "${DEV[@]}" envoy || rc=1; fi

PYTHONPATH="$SITE:$ROOT/services:$ROOT" "$PY" -c '
import grpc, google.protobuf, pydantic, fastapi, uvicorn, httpx, numpy, llguidance, jinja2, diskcache
print("imports ok: grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "pydantic", pydantic.__version__, "numpy", numpy.__version__, "from", numpy.__file__)
' || { log "imports failed"; rc=1; }

sleep 2
log "build so far: $(tail -n 1 "$GB/build.log" 2>/dev/null)"
log "setup done in $((SECONDS - t0)) s (rc $rc); next: bash .gpu/dev.sh chunk N ... (README.txt)"
exit "$rc"
