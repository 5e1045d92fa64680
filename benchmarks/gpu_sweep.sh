#!/usr/bin/env bash
# What the 6-minute check (benchmarks/gpu_check.sh) leaves out: imagegpt-small fp16 generation at batch 256
# (igpt-fast alone, whole images; its target is 3.0 ms/step), then the launch-heuristic sweep (fp16, batch 1, 2, 4, 8,
# 64: every decode-step row first, then kernel rows) in the time that is left. gpu_check.sh OUT SECONDS runs it with
# what its SECONDS leave; it also runs alone, as a device call of its own.
#
#   benchmarks/gpu_sweep.sh OUT_DIR [SECONDS]
#
# SECONDS (default 380) bounds the whole script; give the device call about 40 s more (its limit is 10 minutes).
# Everything lands in OUT_DIR: install.log (unless this checkout is installed already), b256/ and sweep/
# (results.json, summary.txt each). Same machine assumptions as gpu_check.sh: torch, triton and transformers
# installed, nothing downloaded. Then, wherever OUT_DIR came back to, keep each sweep's winner as the default
# (decode-step rows decide) and delete the losing code paths.

set -u -o pipefail
export PYTHONUNBUFFERED=1
# `python3 -m` from the checkout would put it first on sys.path, where its top-level kernels/ shadows Hugging Face's
# `kernels` package, which transformers >= 5.25 imports (the transformers anchors). igpt_fast comes from the install.
export PYTHONSAFEPATH=1

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUT_DIR [SECONDS]" >&2
    exit 2
fi
budget=${2:-380}
if ! [[ $budget =~ ^[0-9]+$ ]] || [ "$budget" -lt 120 ]; then
    echo "$0: SECONDS must be a whole number of at least 120, got '$budget'" >&2
    exit 2
fi
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "$0: no CUDA GPU is visible to torch here; this sweep is for a GPU machine" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2

failed=()
installed_here='import pathlib, sys, igpt_fast
sys.exit(pathlib.Path(igpt_fast.__file__).resolve().parent != pathlib.Path("igpt_fast").resolve())'
if python3 -c "$installed_here" 2>/dev/null; then
    echo "== install: this checkout is installed already"
else
    echo "== install ($(date +%T))"
    timeout -k 5 60 python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 ||
        failed+=(install)
fi

echo "== batch 256 ($(date +%T))"
timeout -k 10 60 python3 -m igpt_fast.benchmark --sizes core --dtypes float16 --batches 256 --systems igpt-fast \
    --tasks generate,complete --out "$OUT/b256" --time-limit 40 >"$OUT/b256.log" 2>&1 || failed+=(b256)
tail -n 8 "$OUT/b256/summary.txt" 2>/dev/null

left=$((budget - SECONDS - 15))
if [ $left -lt 60 ]; then  # under a minute the sweep measures next to nothing (and `timeout 0` would not stop it)
    echo "== sweep skipped: ${left} s left"
else
    echo "== sweep, ${left} s ($(date +%T))"
    timeout -k 10 "$left" python3 -m igpt_fast.benchmark --tasks sweep --dtypes float16 --batches 1,2,4,8,64 \
        --systems igpt-fast --out "$OUT/sweep" --time-limit $((left - 25)) >"$OUT/sweep.log" 2>&1 || failed+=(sweep)
    # The verdicts of the decode-step rows, the ones that decide defaults, from whatever results.json holds (a
    # cut-short run too).
    python3 -m igpt_fast.benchmark --from-json "$OUT/sweep/results.json" --out "$OUT/sweep" >/dev/null 2>&1
    sed -n '/^Sweep: /,/^$/p' "$OUT/sweep/summary.txt" 2>/dev/null
fi

if [ ${#failed[@]} -ne 0 ]; then
    echo "== failed: ${failed[*]}"
    exit 1
fi
