"""The image demo's run-to-run spread, measured on easy-vqa's held-out ``val`` images (never
its test split): the demo's three image stages on the ``fit`` images, once per seed, each
scored on ``val`` with VQA broken down by kind of question.

    python3 scripts/image_seed_spread.py --out /tmp/spread --seeds 0 1 2
    python3 scripts/image_seed_spread.py --out /tmp/spread --seeds 0 1 2 \\
        --anneal optim.lr=1e-3 --name anneal_1e-3

Seed s adds 10 s to each LM stage's configured seed. The contrastive encoder stage runs once
(as configured) and is shared, or, with ``--encoder`` overrides (given to all three stages,
e.g. the encoder's tile size), once for the variant; ``--adapter`` / ``--anneal``
take config overrides for the two LM stages; a variant that changes only the anneal reuses
the adapter stage of ``--reuse NAME`` (an earlier variant in the same ``--out``). Each
seed's result is a JSON line on stdout and in ``OUT/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from mm.data import load_source
from mm.demo import IMAGE_STAGES, demo_config
from mm.infer import answer_records, exact_match
from mm.runs import load_run
from mm.sources.easy_vqa import COLORS
from mm.train import train


def fit_sources(cfg) -> list[dict]:
    return [dict(s, split="fit") if s.get("type") == "easy-vqa" else s for s in cfg.data.sources]


def kind(question: str, answer: str) -> str:
    if answer in ("yes", "no"):
        form = "negated" if re.search(r"\bnot\b|\bno\b", question) else "plain"
        return f"{form} -> {answer}"
    return "colour" if answer in COLORS else "shape"


def score(run: Path, *, captions: int, questions: int) -> dict:
    model, llm, types, cfg = load_run(run)
    # score with the media where training put them (``media: before`` on every source)
    before = all(src.get("media") == "before" for src in cfg.data.sources)
    res: dict = {}
    for task, n in (("caption", captions), ("vqa", questions)):
        recs = load_source({"type": "easy-vqa", "split": "val", "task": task, "limit": n, "seed": 0,
                            **({"media": "before"} if before else {})}, types)
        preds = answer_records(model, types, llm.tokenizer, recs, batch_size=128,
                               preprocess=cfg.data.preprocess, max_new_tokens=8)
        ok = [exact_match(p, r["text"]) for r, p in zip(recs, preds)]
        res[task] = round(sum(ok) / len(ok), 4)
        if task == "vqa":
            kinds = defaultdict(list)
            for r, hit in zip(recs, ok):
                kinds[kind(r["question"], r["text"])].append(hit)
            res["vqa_by_kind"] = {k: f"{sum(v)}/{len(v)}" for k, v in sorted(kinds.items())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--name", default="demo", help="this variant's name (a folder under --out)")
    ap.add_argument("--encoder", nargs="*", default=[],
                    help="overrides for all three stages; the variant then trains its own encoder")
    ap.add_argument("--adapter", nargs="*", default=[], help="overrides for image_adapter_pretrain")
    ap.add_argument("--anneal", nargs="*", default=[], help="overrides for image_anneal")
    ap.add_argument("--reuse", help="take the adapter stage of this earlier variant")
    ap.add_argument("--captions", type=int, default=400, help="val images captioned (400: all)")
    ap.add_argument("--questions", type=int, default=600, help="val questions asked")
    ap.add_argument("--after-adapter", action="store_true", help="also score the adapter stage")
    a = ap.parse_args()
    out = Path(a.out)
    encoder_stage, adapter_stage, anneal_stage = IMAGE_STAGES
    encoder = out / a.name / encoder_stage if a.encoder else out / encoder_stage
    if not (encoder / "model").exists():
        cfg = demo_config(encoder_stage, [f"out={encoder}"] + a.encoder)
        cfg.data.sources = fit_sources(cfg)
        train(cfg, progress=False)
    for seed in a.seeds:
        run = out / a.name / f"seed{seed}"
        prev, seconds, res = encoder, {}, {"name": a.name, "seed": seed, "encoder": a.encoder, "adapter": a.adapter,
                                           "anneal": a.anneal}
        stages = [(adapter_stage, a.encoder + a.adapter), (anneal_stage, a.encoder + a.anneal)]
        if a.reuse:
            prev, stages = out / a.reuse / f"seed{seed}" / adapter_stage, stages[1:]
        for stage, overrides in stages:
            cfg = demo_config(stage, [f"out={run / stage}", f"init_from={prev}"] + overrides)
            cfg.seed += 10 * seed  # seed s: 10 s added to each stage's own seed
            cfg.data.sources = fit_sources(cfg)
            t = time.time()
            train(cfg, progress=False)
            seconds[stage] = round(time.time() - t, 1)
            if stage == adapter_stage and a.after_adapter:
                res["after_adapter"] = score(run / stage, captions=a.captions, questions=a.questions)
            prev = run / stage
        res.update(score(prev, captions=a.captions, questions=a.questions), seconds=seconds)
        line = json.dumps(res)
        print(line, flush=True)
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
