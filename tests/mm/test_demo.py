"""`mm demo --seed`: every training stage's seed moves by the same offset; nothing else does."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm.config import load_config
from mm.demo import IMAGE_STAGES, configs_dir, run_image


@pytest.mark.parametrize("seed", [0, 7])
def test_demo_seed_offsets_every_image_stage(tmp_path: Path, monkeypatch, seed: int):
    import mm.evaluate
    import mm.runs
    import mm.train

    seen = []
    monkeypatch.setattr(mm.train, "train", lambda cfg: seen.append(cfg))

    def fake_load_run(run):
        cfg = load_config(configs_dir() / "demo" / f"{IMAGE_STAGES[-1]}.yaml")
        return None, type("L", (), {"tokenizer": None})(), {}, cfg

    monkeypatch.setattr(mm.runs, "load_run", fake_load_run)
    result = {"exact_match": 1.0, "n": 1, "bad": 0, "samples": []}
    monkeypatch.setattr(mm.evaluate, "evaluate", lambda *a, **k: {"caption": result, "vqa": result})
    run_image(tmp_path, fast=True, llm_spec="smollm2", seed=seed)
    written = [load_config(configs_dir() / "demo" / f"{s}.yaml").seed for s in IMAGE_STAGES]
    assert [c.stage for c in seen] == list(IMAGE_STAGES)
    assert [c.seed for c in seen] == [s + seed for s in written]
    # the evaluation data do not move with the seed
    assert all(src.get("seed", 0) == 0 for src in seen[-1].eval.sources)
