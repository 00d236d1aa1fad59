"""``mm demo``: the Llama 3 recipe end to end on this machine's CPU, on real data.

Image part: contrastive pre-training of a small ViT on easy-vqa, then adapter pre-training at
low resolution and annealing at higher resolution with the frozen SmolLM2; evaluation on
easy-vqa's test split. Video and speech parts build on the image run. Writes
``metrics.json`` in ``--out``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
INSTALLED_CONFIGS = Path("share") / "mm-frozen" / "configs"  # under sys.prefix (pyproject data-files)
IMAGE_STAGES = ("image_encoder_pretrain", "image_adapter_pretrain", "image_anneal")


def configs_dir() -> Path:
    """The repository's ``configs/`` (a checkout, or an editable install), else the copy that
    a regular install puts under ``<sys.prefix>/share/mm-frozen/configs``."""
    for d in (CONFIGS, Path(sys.prefix) / INSTALLED_CONFIGS):
        if d.is_dir():
            return d
    raise FileNotFoundError(f"{CONFIGS}: configs folder not found, nor {Path(sys.prefix) / INSTALLED_CONFIGS} "
                            "(install the package with pip from the repository)")


def demo_config(stage: str, overrides=()):
    """The resolved config of one of the demo's stages (``configs/demo/STAGE.yaml``) with
    dotted overrides."""
    from mm.config import load_config

    return load_config(configs_dir() / "demo" / f"{stage}.yaml", list(overrides))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_image(out: Path, *, fast: bool, llm_spec: str, seed: int = 0) -> dict:
    from mm.evaluate import evaluate
    from mm.runs import load_run
    from mm.train import train

    seconds = {}
    prev = None
    for stage in IMAGE_STAGES:
        ov = [f"out={out / stage}", f"model.llm={llm_spec}"]
        if prev:
            ov.append(f"init_from={prev}")
        if fast:
            ov += ["optim.steps=3", "optim.warmup_steps=1", "optim.batch_size=4"]
        cfg = demo_config(stage, ov)
        cfg.seed += seed
        t = time.time()
        print(f"[image] {stage}: training {cfg.optim.steps} steps ...", flush=True)
        train(cfg)
        seconds[stage] = round(time.time() - t, 1)
        print(f"[image] {stage}: {seconds[stage]} s", flush=True)
        prev = out / stage
    t = time.time()
    model, llm, types, cfg = load_run(prev)
    sources = cfg.eval.sources
    if fast:
        sources = [dict(s, limit=16) for s in sources]
    print(f"[image] evaluating on easy-vqa test ...", flush=True)
    res = evaluate(model, types, llm.tokenizer, sources, batch_size=cfg.eval.batch_size,
                   preprocess=cfg.data.preprocess, max_new_tokens=8, prefix_cache=cfg.eval.prefix_cache)
    seconds["eval"] = round(time.time() - t, 1)
    for task in ("caption", "vqa"):
        for s in res.get(task, {}).get("samples", []):
            print(f"  {Path(s['image']).name:>10}  {s['question']!r:<45} -> {s['prediction']!r:<16} (ref {s['reference']!r})")
    return {
        "image.caption_exact_match": res["caption"]["exact_match"],
        "image.caption_n": res["caption"]["n"],
        "image.vqa_accuracy": res["vqa"]["exact_match"],
        "image.vqa_n": res["vqa"]["n"],
        "image.seconds": seconds,
        "image.seconds_total": round(sum(seconds.values()), 1),
        "image.samples": res["caption"]["samples"] + res["vqa"]["samples"],
    }


def run_demo(out: Path, *, stages: list[str], fast: bool = False, llm_spec: str = "smollm2",
             seed: int = 0) -> dict:
    """Train and evaluate the chosen parts; ``seed`` is added to every training stage's own
    seed (initialisation, draw order, masking), the data stay the same: 0 runs the configs
    as written, other values show the run-to-run spread."""
    from mm.config import ModelConfig
    from mm.llm import load_frozen_llm, text_fingerprint
    from mm.runs import get_llm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in stages if s not in ("image", "video", "speech")]
    if unknown:
        raise ValueError(f"demo: unknown stages {unknown}; choose from image, video, speech")
    t0 = time.time()
    llm = get_llm(ModelConfig(llm=llm_spec))
    metrics: dict = {"machine": machine(), "llm": llm_spec, "fast": fast, "seed": seed}
    if "image" in stages:
        metrics.update(run_image(out / "image", fast=fast, llm_spec=llm_spec, seed=seed))
    if "video" in stages:
        from mm.video import run_video_demo
        image_run = out / "image" / IMAGE_STAGES[-1]
        if not (image_run / "model").exists():
            raise ValueError(f"{image_run}: the video part needs the image part's run (add image to --stages)")
        metrics.update(run_video_demo(out / "video", image_run=image_run, llm_spec=llm_spec, fast=fast,
                                      seed=seed))
    if "speech" in stages:
        from mm.speech import run_speech_demo
        metrics.update(run_speech_demo(out / "speech", llm_spec=llm_spec, fast=fast, seed=seed))
    # Bit-for-bit proof: the in-memory LLM after all stages, and a fresh load from disk,
    # both hash to the fingerprint taken when it was first loaded.
    after = text_fingerprint(llm.model)
    fresh = load_frozen_llm(llm_spec).fingerprint
    metrics["text_weights_unchanged"] = after == llm.fingerprint == fresh
    metrics["text_weights_fingerprint"] = llm.fingerprint
    metrics["seconds_total"] = round(time.time() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("samples")}, indent=2))
    print(f"metrics written to {out / 'metrics.json'}")
    return metrics
