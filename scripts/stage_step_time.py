"""Seconds per training step of a stage, over steps [skip, skip + n), as `mm train` runs them
(data, forward, backward, optimizer). To compare two versions of the code, run it from two
checkouts in turn (each process imports the `mm` beside it when run with PYTHONPATH set to its
checkout), alternating, a few times each: this machine's speed drifts by 20-50% within an hour.

    python3 scripts/stage_step_time.py configs/demo/speech_adapter.yaml --out /tmp/t \
        [--skip 20] [--steps 30] [key=value ...]

The run directory is removed first (a leftover checkpoint would resume past the timed steps).
"""
from __future__ import annotations

import argparse
import shutil
import time

import mm.train as train_mod
from mm.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    skip, n, mark = a.skip, a.steps, {}
    get = train_mod.get_objective

    def timed_objective(name):
        cls = get(name)

        class Timed(cls):
            def batch(self, step):
                if step == skip:
                    mark["t"] = time.perf_counter()
                elif step == skip + n:
                    print(f"{(time.perf_counter() - mark['t']) / n * 1000:.1f} ms/step over steps "
                          f"{skip}-{skip + n - 1}", flush=True)
                return super().batch(step)
        return Timed

    train_mod.get_objective = timed_objective
    shutil.rmtree(a.out, ignore_errors=True)
    cfg = load_config(a.config, [f"out={a.out}", f"optim.steps={skip + n + 1}", "checkpoint_every=100000"]
                      + a.overrides)
    train_mod.train(cfg, progress=False)
    shutil.rmtree(a.out, ignore_errors=True)


if __name__ == "__main__":
    main()
