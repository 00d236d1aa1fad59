#!/usr/bin/env bash
# The GPU check of issue 6 in one command for a lent device machine whose image has torch but
# not open_clip (docs/PERFORMANCE_LOG.md, "GPU run"). Here, first:
#   bash scripts/device_bench.sh --fetch     # downloads the wheels into .whl (git-ignored)
# then on the device machine, carrying .whl:
#   OUT=$OUT bash scripts/device_bench.sh    # installs them into /tmp/site, runs bench_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0"
if [ "${1:-}" = "--fetch" ]; then  # the device image's Python is 3.12
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl $WHEELS
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  echo "installing $(ls .whl | tr '\n' ' ')"
  timeout -k 5 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
mkdir -p "${OUT:=$PWD/bench_out}"
# the fused cross-entropy's kernel against its torch-ops form (scripts/ce_bench.py, ~20 s)
[ "${MM_CE_BENCH:-1}" = 0 ] || timeout -k 5 90 python3 scripts/ce_bench.py 2>&1 | tee "$OUT/ce.txt"
exec bash scripts/bench_gpu.sh
