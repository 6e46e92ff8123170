#!/bin/sh
# One device run on a GPU machine that has no network and only this checkout: the environment
# first, then bench_align_step.py (ALIGN_SECONDS, default 150; 0 skips it), then bench_scale.py for the
# rest of the time limit, their results and logs into $OUT.
# Inputs: bench-inputs/ (python benchmarks/bench_scale.py --export-inputs bench-inputs --pool 512).
#   sh benchmarks/device_scale.sh [geometry=1b] [seconds=480] [extra bench_scale options]
# e.g. the 1b run after 2026-12-04's (which measured the pipelines and stage 1):
#   OUT=$OUT sh benchmarks/device_scale.sh 1b 420 --no-pipelines --dense-examples 0
set -u
GEOM=${1:-1b}
LIMIT=${2:-480}
[ $# -ge 2 ] && shift 2 || shift $#
OUT=${OUT:-/tmp/iprox-device-out}
WORK=/tmp/iprox-bench-scale
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, torch.cuda.is_available())"
  for m in pyarrow accelerate gguf tqdm scipy; do python3 -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1; done
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
ALIGN_SECONDS=${ALIGN_SECONDS:-150}
START=$(date +%s)
if [ "$ALIGN_SECONDS" -gt 0 ]; then
  timeout "$ALIGN_SECONDS" python3 benchmarks/bench_align_step.py --inputs bench-inputs --geometry "$GEOM" --dtype bf16 \
    --steps 3 --rounds 2 --max-length 512 > "$OUT/align_step.log" 2>&1
  echo "exit status $?" >> "$OUT/align_step.log"
  cp benchmarks/results/align_step.json "$OUT/" 2>/dev/null
  tail -n 12 "$OUT/align_step.log"
fi
LIMIT=$((LIMIT - $(date +%s) + START))
timeout "$LIMIT" python3 benchmarks/bench_scale.py --inputs bench-inputs --geometry "$GEOM" --dtype bf16 --pool 512 \
  --max-length 512 --work "$WORK" "$@" > "$OUT/bench.log" 2>&1
echo "exit status $?" >> "$OUT/bench.log"
for d in "$WORK/$GEOM"-*; do
  cp "$d/partial.json" "$OUT/" 2>/dev/null
  for r in target iprox; do cp "$d/run-$r/pipeline.json" "$OUT/pipeline-$r.json" 2>/dev/null; done
done
cp benchmarks/results/scale.json "$OUT/" 2>/dev/null
tail -n 40 "$OUT/bench.log"
