#!/usr/bin/env bash
# The GPU check of issue 6 in one script, about 4 minutes on one H100/H200 (hard limit 270 s):
#   1. the GPU-marked tests: fast decoding with CUDA graphs gives the reference tokens, the fused
#      loss's Triton kernel the torch-ops result, a training stage the CPU's losses (~30 s);
#   2. `mm bench --shapes 1b-xattn`: ours against HF Mllama at Llama-3.2-1B text shapes with
#      a ViT-H/14 at one 560 px tile, bf16 (with MM_GPU_PROFILE=1 also profiler tables: one
#      training step per side and encoder mode, one generation call per side and batch); then, while the run is
#      younger than MM_BENCH_DEADLINE seconds, a pass of ours with regional torch.compile
#      (frozen-encoder mode first). The JSON is rewritten
#      after every part, and a part that fails is recorded while the others still run.
# Results go to $OUT (default ./bench_out): env.txt (GPU, versions, GPU tests), bench.txt,
# bench.log, bench.json, profiles.txt. MM_GPU_LIMIT (s), MM_BENCH_DEADLINE, MM_GPU_PROFILE=1 adjust it.
# The interpreter is $PYTHON, else `python`, else `python3` (device images may have only python3).
# Packages the device image lacks travel as wheels: see docs/PERFORMANCE_LOG.md, "GPU run".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out}
mkdir -p "$OUT"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$(date +%s)
LIMIT=${MM_GPU_LIMIT:-270}
PY=${PYTHON:-$(command -v python || command -v python3)}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
  timeout -k 5 60 "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  echo "--- GPU tests"
  timeout -k 5 90 "$PY" -m pytest -q -m gpu tests/mm/test_bench.py tests/mm/test_train.py -p no:cacheprovider 2>&1 | tail -15
  echo "--- $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/env.txt"

left=$(( LIMIT - ($(date +%s) - start) ))
prof=""
# MM_GPU_PROFILE=1: profiler tables too (they take ~60 s, which can push the compile pass past
# its deadline, as they did on 2026-11-28)
[ "${MM_GPU_PROFILE:-0}" = 1 ] && prof=$(mktemp -d)
MM_BENCH_PROFILE=$prof MM_BENCH_COMPILE=${MM_BENCH_COMPILE:-1} MM_BENCH_DEADLINE=${MM_BENCH_DEADLINE:-130} \
  timeout -k 5 "$left" "$PY" -m mm.cli bench --shapes 1b-xattn --json "$OUT/bench.json" \
  2> "$OUT/bench.log" | tee "$OUT/bench.txt"
rc=${PIPESTATUS[0]}
[ -n "$prof" ] && cat "$prof"/*.txt > "$OUT/profiles.txt" 2>/dev/null
if [ "$rc" -ne 0 ]; then
  echo "bench exit status $rc (1: a part failed, see FAILED lines and bench.log; 124: cut by the timeout, bench.json holds the parts measured)" | tee -a "$OUT/bench.txt"
  grep -B2 -A12 "FAILED" "$OUT/bench.log" | tail -60
  tail -5 "$OUT/bench.log"
  [ "$rc" -ne 1 ] && [ -s "$OUT/bench.json" ] && "$PY" -c "import json, sys; from mm.bench import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$OUT/bench.json" | tee -a "$OUT/bench.txt"
fi
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"
