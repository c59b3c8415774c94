#!/usr/bin/env bash
# Run HERE (not on the device) before the calls: what each device `run` call of README.txt
# sends (the working tree that travels: tracked + untracked-not-ignored files, plus the call's
# carry list), against the 64 MiB limit. Exits 1 if any call is over LIMIT_MIB (63.5 by default,
# a little under 64 for safety).
# Source: bench/gpu_kit/sizes.sh; bench/gpu_kit/build.sh copies it into .gpu/ (edit it there).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
LIMIT_MIB=${LIMIT_MIB:-63.5}
NB_LLVM=$(ls .gpu/nbwhl/llvmlite-*.whl 2>/dev/null | head -1)
NB_NUMBA=$(ls .gpu/nbwhl/numba-*.whl 2>/dev/null | head -1)

bytes() { local t=0 s; for p in "$@"; do s=$(du -sb --apparent-size "$p" 2>/dev/null | cut -f1); t=$((t + ${s:-0})); done; echo $t; }
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{t+=$1} END {print t+0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }

calls=(
  "1|bash .gpu/setup.sh|.gpu/setup.sh .gpu/dev.sh .gpu/chunks.json .gpu/src.tar.gz .gpu/llama_cpp .gpu/mwhl"
  "2|bash .gpu/dev.sh numba|.gpu/dev.sh .gpu/chunks.json $NB_LLVM"
  "3|bash .gpu/dev.sh chunk 0|.gpu/dev.sh .gpu/chunks.json .gpu/m0"
  "4|bash .gpu/dev.sh chunk 1|.gpu/dev.sh .gpu/chunks.json .gpu/m1"
  "5|bash .gpu/dev.sh chunk 2|.gpu/dev.sh .gpu/chunks.json .gpu/m2"
  "6|bash .gpu/dev.sh chunk 3|.gpu/dev.sh .gpu/chunks.json .gpu/m3"
  "7|bash .gpu/dev.sh chunk 4 numba envoy wait|.gpu/dev.sh .gpu/chunks.json .gpu/m4 $NB_NUMBA .gpu/envoywhl"
  "8|bash .gpu/dev.sh wait bench|.gpu/dev.sh .gpu/chunks.json"
)
echo "working tree that travels with every call: $(mib "$tree") MiB"
rc=0
for c in "${calls[@]}"; do
    IFS='|' read -r n cmd carry <<<"$c"
    # shellcheck disable=SC2086
    b=$(bytes $carry); total=$((b + tree))
    over=$(awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {print (t / 1048576 > l) ? "OVER" : "ok"}')
    [ "$over" = ok ] || rc=1
    printf 'call %s: %-45s carry %6s MiB + tree = %6s MiB %s  (%d paths)\n' "$n" "$cmd" "$(mib "$b")" "$(mib "$total")" "$over" "$(wc -w <<<"$carry")"
    printf '        carry: [%s]\n' "$(sed 's/ /, /g' <<<"$carry")"
done
exit $rc
