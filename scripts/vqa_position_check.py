"""Can the image adapters learn to compare a question with the image? A check on easy-vqa's
held-out ``val`` images (never its test split).

Trains ``--steps`` steps of the anneal stage's settings, cross-attention included, on "is
there a {colour} shape?" alone (half "yes", half "no", ``fit`` images) from an image run, once
for each ``--where``: ``after`` the question (the end of the user's turn), ``answer`` (the
demo's placement: from the assistant header's last token on) or ``before`` it (``media:
before``), then scores yes and no separately on ``val``:

    python3 scripts/vqa_position_check.py --init RUN/image/image_anneal --out /tmp/vqa_check
    python3 scripts/vqa_position_check.py --init RUN/image/image_anneal --out /tmp/vqa_check --where answer

For a clean check, ``--init`` should be a run whose stages used ``split: fit`` (the demo's
own run has seen the ``val`` images in training).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mm.data import load_source
from mm.demo import demo_config
from mm.infer import answer_records, exact_match
from mm.runs import load_run
from mm.sources.easy_vqa import COLORS, records
from mm.train import train


def write_manifest(split: str, path: Path) -> None:
    rng = random.Random(0)
    rows = []
    for r in records(split, task="caption"):
        colour = r["text"].split()[1]
        other = rng.choice([c for c in COLORS if c != colour])
        rows += [{"image": r["image"], "question": f"is there a {colour} shape?", "text": "yes"},
                 {"image": r["image"], "question": f"is there a {other} shape?", "text": "no"}]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --where: (the manifest's media key, the modality's placement)
PLACES = {"after": ("after", "after_question"), "answer": ("after", "before_answer"),
          "before": ("before", "after_question")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", required=True, help="an image run (e.g. RUN/image/image_anneal)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=256, help="val questions scored")
    ap.add_argument("--where", nargs="+", choices=sorted(PLACES), default=["after", "before"],
                    help="where the image is seen from")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("fit", "val"):
        write_manifest(split, out / f"{split}.jsonl")
    for where in a.where:
        media, placement = PLACES[where]
        cfg = demo_config("image_anneal",
                          [f"out={out / where}", f"init_from={a.init}", f"optim.steps={a.steps}",
                           f"optim.warmup_steps={min(5, a.steps)}",
                           "optim.lr=1e-3", f"model.modalities.image.adapter.placement={placement}"])
        cfg.trainable = [*cfg.trainable, "image.xattn"]  # trained here; the demo's anneal keeps it frozen
        cfg.data.sources = [{"type": "manifest", "path": str(out / "fit.jsonl"), "media": media}]
        model, llm, types, run_cfg = load_run(train(cfg, progress=False))
        recs = load_source({"type": "manifest", "path": str(out / "val.jsonl"), "media": media}, types)[:a.n]
        preds = answer_records(model, types, llm.tokenizer, recs, batch_size=128,
                               preprocess=run_cfg.data.preprocess, max_new_tokens=3)
        for answer in ("yes", "no"):
            hits = [exact_match(p, r["text"]) for p, r in zip(preds, recs) if r["text"] == answer]
            print(f"image seen {where}: val '{answer}' right {sum(hits)}/{len(hits)}", flush=True)


if __name__ == "__main__":
    main()
